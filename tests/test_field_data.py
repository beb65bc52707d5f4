"""Images and masks as they arrive from factories: one decoding policy from import to prediction
(modes, EXIF orientation, 16-bit range), one rule for mask pixels, and every unused source file
reported. Each test makes its own small inputs (modelled on ../shared/cases)."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import func, select

from conftest import SIZE, write
from flawline.catalog import Image
from flawline.data.images import identify_image, to_canonical, white_level
from flawline.data.ingest import import_dataset
from flawline.data.loading import decode_image, decode_mask
from flawline.data.records import fetch, image_records
from flawline.data.split import SplitSpec, assign_splits
from flawline.errors import InvalidInput
from flawline.train import TrainSpec
from flawline.train.runner import finish_run, plan_run, train_local

RNG = np.random.default_rng(7)


def encode(img: PILImage.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gray_tile(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.uniform(90, 160, (6, 6)), np.ones((size // 6, size // 6))).astype(np.uint8)


# -- modes ---------------------------------------------------------------------------------------
def odd_modes(base: np.ndarray) -> dict[str, bytes]:
    """The same picture in the modes field data arrives in (c02-alpha-cmyk)."""
    rgb = PILImage.fromarray(np.stack([base] * 3, -1), "RGB")
    gray = PILImage.fromarray(base, "L")
    rgba = rgb.copy()
    rgba.putalpha(255)
    la = gray.copy()
    la.putalpha(255)
    palette = rgb.convert("P", palette=PILImage.Palette.ADAPTIVE, colors=256)
    return {"rgba.png": encode(rgba), "la.png": encode(la), "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
            "bilevel.png": encode(gray.convert("1")), "palette.png": encode(palette), "gray.png": encode(gray),
            "rgb.png": encode(rgb)}


def test_every_mode_with_a_clear_conversion_decodes_alike_at_import_and_after(catalog, store, tmp_path):
    base = gray_tile(0)
    files = odd_modes(base)
    for name, data in files.items():
        write(tmp_path / "src" / "normal" / name, data)
    report = import_dataset(catalog, store, tmp_path / "src", dataset="modes", workers=4, full_decode=True)
    assert report.new_images == len(files) and not report.skipped and not report.unused
    assign_splits(catalog, "modes", SplitSpec(train=0.0, val=0.0, test=1.0, seed=0))
    got = fetch(store, image_records(catalog, "modes", labelled_only=True), 48)  # what evaluate, training and serving decode
    want = torch.from_numpy(base).float() / 255.0
    for name, img in zip(got.names, got.images):
        if "bilevel" in name:  # 1-bit is dithered: alike block by block
            block = torch.nn.functional.avg_pool2d
            diff = block(img.mean(0)[None], 8) - block(want[None], 8)
            assert float(diff.abs().mean()) < 0.08, name
        else:  # JPEG and palettes round
            assert float((img.mean(0) - want).abs().mean()) < 0.03, name


def test_transparent_pixels_are_refused_at_import_with_one_line_naming_the_file(catalog, store, tmp_path):
    rgba = PILImage.fromarray(np.stack([gray_tile(1)] * 3, -1), "RGB")
    alpha = np.full((48, 48), 255, np.uint8)
    alpha[:8, :8] = 0
    rgba.putalpha(PILImage.fromarray(alpha, "L"))
    write(tmp_path / "src" / "normal" / "ok.png", encode(PILImage.fromarray(gray_tile(2), "L")))
    write(tmp_path / "src" / "normal" / "cutout.png", encode(rgba))
    with pytest.raises(InvalidInput) as err:
        import_dataset(catalog, store, tmp_path / "src", dataset="alpha", workers=2)
    message = str(err.value)
    assert "cutout.png" in message and "transparent" in message and "\n" not in message
    with catalog.session() as s:  # nothing half-written
        assert s.scalar(select(func.count()).select_from(Image)) == 0
    with pytest.raises(InvalidInput, match="transparent"):  # the same rule at prediction
        decode_image(encode(rgba), 32, "cutout.png")


# -- 16-bit ---------------------------------------------------------------------------------------
def sixteen_bit(values: np.ndarray) -> bytes:
    return encode(PILImage.fromarray(values.astype(np.uint16)))


def twelve_bit_tile(seed: int) -> np.ndarray:
    return (gray_tile(seed, SIZE).astype(np.float64) / 160 * 4000).astype(np.uint16)  # 12-bit data in 16 bits


def test_a_hot_pixel_changes_a_16_bit_image_only_where_it_is():
    scene = twelve_bit_tile(3)
    hot = scene.copy()
    hot[5, 5] = 65535
    white = white_level([int(np.percentile(scene, 99.9))])
    assert white == 4095
    a, b = decode_image(sixteen_bit(scene), None, white=white), decode_image(sixteen_bit(hot), None, white=white)
    diff = (a - b).abs()[0]
    assert diff[5, 5] > 0.3 and float(diff.sum() - diff[5, 5]) == 0.0
    assert float(a.mean()) > 0.4  # scaled by the data's range, not by 65535 (which would leave it near black)


def test_a_16_bit_dataset_keeps_its_range_from_import_to_the_model(catalog, store, tmp_path):
    for i in range(16):
        write(tmp_path / "src" / "normal" / f"n{i}.png", sixteen_bit(twelve_bit_tile(10 + i)))
    for i in range(4):
        tile = twelve_bit_tile(40 + i)
        tile[20:36, 20:26] = 200  # a dark scratch
        write(tmp_path / "src" / "defect" / "scratch" / f"d{i}.png", sixteen_bit(tile))
    import_dataset(catalog, store, tmp_path / "src", dataset="deep", workers=4)
    with catalog.session() as s:
        highs = [a["high"] for a in s.scalars(select(Image.attrs))]
    assert len(highs) == 20 and max(highs) < 4096
    assign_splits(catalog, "deep", SplitSpec(train=0.5, val=0.25, test=0.25, seed=0, normal_only_train=True))
    plan = plan_run(catalog, TrainSpec(datasets=["deep"], setting="unsupervised", method="padim",
                                       image_size=SIZE, batch_size=8))
    assert {r.white for r in plan.data.labelled} == {4095}
    detector, history = train_local(store, plan)
    finish_run(catalog, store, plan, detector, history=history)
    assert detector.config.white == 4095
    scene = twelve_bit_tile(99)
    hot = scene.copy()
    hot[30, 30] = 65535
    x = torch.stack([decode_image(sixteen_bit(v), SIZE, white=detector.config.white).expand(3, -1, -1)
                     for v in (scene, hot)])
    pred = detector.predict(x)
    assert pred.is_defect[0] == pred.is_defect[1]
    assert abs(pred.scores[1] - pred.scores[0]) < 0.5 * abs(detector.threshold.value)


# -- orientation ----------------------------------------------------------------------------------
def exif_rotated_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    img = PILImage.fromarray(pixels, "L")
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_gives_the_shown_frame_to_images_and_masks(catalog, store, tmp_path):
    stored = np.zeros((40, 64), np.uint8)  # 64 wide, 40 high as stored
    stored[:, :8] = 255  # a bright band at the stored left edge
    data = exif_rotated_jpeg(stored, 6)  # shown rotated 90 degrees clockwise: 40 wide, 64 high, band on top
    info = identify_image(data, "turned.jpg")
    assert (info.width, info.height) == (40, 64) and info.stored_size == (64, 40)
    shown = decode_image(data, None, "turned.jpg")[0]
    assert shown.shape == (64, 40) and float(shown[:8].mean()) > 0.9 and float(shown[-8:].mean()) < 0.1

    mask_shown = np.zeros((64, 40), np.uint8)
    mask_shown[:8] = 255
    write(tmp_path / "ok" / "defect" / "band" / "turned.jpg", data)
    write(tmp_path / "ok" / "masks" / "defect" / "band" / "turned.png", encode(PILImage.fromarray(mask_shown)))
    assert import_dataset(catalog, store, tmp_path / "ok", dataset="turned", workers=2).masks == 1

    write(tmp_path / "bad" / "defect" / "band" / "turned.jpg", data)
    write(tmp_path / "bad" / "masks" / "defect" / "band" / "turned.png",
          encode(PILImage.fromarray(np.zeros((40, 64), np.uint8))))  # drawn on the stored frame
    with pytest.raises(InvalidInput, match="stored frame.*EXIF orientation 6.*shown frame"):
        import_dataset(catalog, store, tmp_path / "bad", dataset="turned-bad", workers=2)


# -- masks ------------------------------------------------------------------------------------------
def test_masks_stored_as_0_1_and_as_0_255_are_one_and_the_same(catalog, store, tmp_path):
    region = np.zeros((48, 48), np.uint8)
    region[10:20, 12:30] = 1
    for name, scale in (("m01", 1), ("m255", 255)):
        for i in range(3):
            write(tmp_path / name / "defect" / "spot" / f"d{i}.png", encode(PILImage.fromarray(gray_tile(50 + i), "L")))
            write(tmp_path / name / "masks" / "defect" / "spot" / f"d{i}.png",
                  encode(PILImage.fromarray(region * scale)))
        write(tmp_path / name / "normal" / "n0.png", encode(PILImage.fromarray(gray_tile(60), "L")))
        report = import_dataset(catalog, store, tmp_path / name, dataset=name, workers=2)
        assert report.masks == 3
    a, b = (fetch(store, image_records(catalog, n, labelled_only=True), 48).masks for n in ("m01", "m255"))
    assert a.sum() == b.sum() == 3 * region.sum()
    assert np.array_equal(decode_mask(encode(PILImage.fromarray(region)), 48),
                          decode_mask(encode(PILImage.fromarray(region * 255)), 48))
    to_canonical(PILImage.fromarray(region), "m")  # a gray image as it is


def test_every_source_file_the_import_did_not_use_is_listed_with_why(catalog, store, tmp_path):
    src = tmp_path / "src"
    name = unicodedata.normalize("NFC", "rés.png")
    write(src / "defect" / "spot" / name, encode(PILImage.fromarray(gray_tile(70), "L")))
    region = np.zeros((48, 48), np.uint8)
    region[4:9, 4:9] = 255
    # the mask saved under another Unicode normal form (as macOS writes names) still matches
    write(src / "masks" / "defect" / "spot" / unicodedata.normalize("NFD", "rés.png"), encode(PILImage.fromarray(region)))
    write(src / "masks" / "defect" / "spot" / "typo.png", encode(PILImage.fromarray(region)))
    write(src / "normal" / "n0.png", encode(PILImage.fromarray(gray_tile(71), "L")))
    write(src / "notes.txt", b"shift 3")
    write(src / "extra" / "x.png", encode(PILImage.fromarray(gray_tile(72), "L")))
    report = import_dataset(catalog, store, src, dataset="stray", workers=2)
    assert report.masks == 1
    unused = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in report.unused}
    assert unused == {"typo.png": "a mask that matches no image", "notes.txt": "not an image file type",
                      "x.png": "not where the 'folder' layout looks for images"}


@pytest.mark.parametrize("side", [9000, 13000])  # beyond our limit; beyond twice it (Pillow's own error)
def test_an_oversized_image_gets_one_line_and_no_pillow_warning(side, recwarn):
    buf = io.BytesIO()
    PILImage.new("L", (side, side)).save(buf, "PNG")  # zeros: a small file claiming many pixels
    for check in (lambda d: identify_image(d, "huge.png"), lambda d: decode_image(d, 64, "huge.png")):
        with pytest.raises(InvalidInput) as err:
            check(buf.getvalue())
        assert "huge.png" in str(err.value) and "exceeds the limit" in str(err.value) and "\n" not in str(err.value)
    assert not [w for w in recwarn if issubclass(w.category, PILImage.DecompressionBombWarning)]


def test_a_model_made_by_evaluate_keeps_the_16_bit_range_for_predict(settings_env, catalog, store, tmp_path):
    """`flawline evaluate` registers its model with the dataset's white level, so `flawline predict`
    decodes a 16-bit image as the model's training images were decoded."""
    import json

    from typer.testing import CliRunner

    from flawline.catalog.model_versions import load_version
    from flawline.cli.main import app

    for i in range(12):
        write(tmp_path / "src" / "normal" / f"n{i}.png", sixteen_bit(twelve_bit_tile(10 + i)))
    for i in range(3):
        tile = twelve_bit_tile(40 + i)
        tile[20:36, 20:26] = 200
        write(tmp_path / "src" / "defect" / "scratch" / f"d{i}.png", sixteen_bit(tile))
    import_dataset(catalog, store, tmp_path / "src", dataset="deep", workers=4)
    run = CliRunner()
    assert run.invoke(app, ["data", "split", "deep", "--train", "0.6", "--val", "0.2", "--test", "0.2",
                            "--normal-only-train"]).exit_code == 0
    result = run.invoke(app, ["evaluate", "deep", "--method", "padim", "--image-size", str(SIZE)])
    assert result.exit_code == 0, result.output
    assert load_version(catalog, store, "deep-padim").config.white == 4095
    shown = run.invoke(app, ["predict", str(tmp_path / "src" / "normal" / "n0.png"), "--model", "deep-padim:1",
                             "--local", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)[0]["is_defect"] is False  # a normal tile (decoded at 65535 it was a defect)
