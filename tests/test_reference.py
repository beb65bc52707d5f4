"""The reference detector: each image compared with its own defect-free reference image (boards
whose designs all differ, where a detector of normal images alone cannot know what normal is),
in Python and end to end from a manifest with a reference column through `flawline evaluate`."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flawline.errors import InvalidInput
from flawline.evaluate.metrics import roc_auc
from flawline.models import create_detector
from flawline.models.reference import aligned_distance, pair

from conftest import write

SIDE = 128  # boards are drawn at this size; the detector sees them at 256 px


def design(rng: np.random.Generator) -> np.ndarray:
    """One board design: bright traces and pads on a dark substrate [SIDE, SIDE]."""
    board = np.full((SIDE, SIDE), 0.2, np.float32)
    for _ in range(rng.integers(6, 10)):
        y, x = rng.integers(8, SIDE - 8, 2)
        length = rng.integers(20, 60)
        if rng.random() < 0.5:
            board[y:y + 3, min(x, SIDE - 40):min(x, SIDE - 40) + length] = 0.8
        else:
            board[min(y, SIDE - 40):min(y, SIDE - 40) + length, x:x + 3] = 0.8
    for _ in range(rng.integers(5, 9)):
        y, x = rng.integers(4, SIDE - 16, 2)
        h, w = rng.integers(6, 12, 2)
        board[y:y + h, x:x + w] = 0.8
    return board


def capture(board: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A photo of the board: shifted by up to a pixel, brightness and sensor noise."""
    dy, dx = (int(v) for v in rng.integers(-1, 2, 2))
    img = np.roll(board, (dy, dx), (0, 1)) * rng.uniform(0.95, 1.05)
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


def boards(n: int, seed: int, defect: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n tested images, their references (another photo of the same board) and masks: a defect
    is an 8 px short (copper where there was none) or open (none where there was)."""
    rng = np.random.default_rng(seed)
    images, refs, masks = [], [], []
    for _ in range(n):
        b = design(rng)
        ref, img = capture(b, rng), capture(b, rng)
        mask = np.zeros((SIDE, SIDE), bool)
        if defect:
            y, x = rng.integers(10, SIDE - 20, 2)
            mask[y:y + 8, x:x + 8] = True
            img[mask] = np.where(img[mask] > 0.5, 0.2, 0.8)
        images.append(img)
        refs.append(ref)
        masks.append(mask)
    return np.stack(images), np.stack(refs), np.stack(masks)


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)[:, None]


@pytest.fixture(scope="module")
def data():
    return boards(16, 0), boards(10, 1), boards(10, 2, defect=True)


def test_aligned_distance_tolerates_a_shift_within_the_search_window():
    f = torch.rand(1, 4, 6, 6)
    shifted = torch.roll(f, 1, dims=3)
    inner = (slice(None), slice(1, 5), slice(1, 5))
    assert aligned_distance(f, f, 0).abs().max() == 0
    assert aligned_distance(f, shifted, 0)[inner].min() > 0  # compared in place: they differ
    assert aligned_distance(f, shifted, 1)[inner].abs().max() == 0  # one position of search finds it


def test_reference_finds_what_differs_from_each_boards_own_reference(data):
    (ti, tr, _), (ni, nr, _), (di, dr, dm) = data
    labels = [0] * 10 + [1] * 10
    det = create_detector("reference", image_size=256).fit(pair(tensor(ti), tensor(tr)))
    pred = det.predict(pair(tensor(np.r_[ni, di]), tensor(np.r_[nr, dr])))
    assert pred.maps.shape == (20, 256, 256)
    assert roc_auc(labels, pred.scores) >= 0.95
    on_defect = [amap[np.kron(mask, np.ones((2, 2), bool))].max() >= 0.99 * amap.max()
                 for amap, mask in zip(pred.maps[10:], dm)]
    assert sum(on_defect) >= 8, on_defect  # the map peaks on the defect
    # Normal images alone: every board is another design, so nothing is learned about normal.
    padim = create_detector("padim", image_size=256).fit(tensor(ti))
    assert roc_auc(labels, padim.predict(tensor(np.r_[ni, di])).scores) < roc_auc(labels, pred.scores) - 0.2


def test_reference_exports_and_refuses_images_without_references(data, tmp_path):
    from flawline.models.export import check_export, export_onnx

    (ti, tr, _), (ni, nr, _), _ = data
    det = create_detector("reference", image_size=128).fit(pair(tensor(ti[:6]), tensor(tr[:6])))
    drift = check_export(det, export_onnx(det, tmp_path / "ref.onnx"), pair(tensor(ni[:3]), tensor(nr[:3])))
    assert drift["max_rel_score_diff"] < 1e-4
    with pytest.raises(InvalidInput, match=r"reference: expected image/reference pairs \[N, 6, H, W\], got \[2, 1, 128"):
        det.predict(tensor(ni[:2]))
    with pytest.raises(InvalidInput, match="differ in shape"):
        pair(tensor(ni[:2]), tensor(nr[:3]))


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((a * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def manifest_tree(root):  # noqa: ANN001, ANN201
    """Each board: its reference photo and a tested photo, in one preset split (manifest.csv)."""
    rows = []
    parts = {"train": [boards(14, 10)], "test": [boards(8, 11), boards(8, 12, defect=True)]}
    for split, sets in parts.items():
        for s, (images, refs, masks) in enumerate(sets):
            for i, (img, ref, mask) in enumerate(zip(images, refs, masks)):
                name = f"{split}-{s}-{i}"
                write(root / "ref" / f"{name}.png", _png(ref))
                write(root / "img" / f"{name}.png", _png(img))
                rows.append({"file": f"ref/{name}.png", "label": "normal", "split": split, "reference": "", "mask": ""})
                row = {"file": f"img/{name}.png", "label": "defect" if mask.any() else "normal", "split": split,
                       "reference": f"ref/{name}.png", "mask": ""}
                if mask.any():
                    write(root / "masks" / f"{name}.png", _png(mask.astype(np.float32)))
                    row["mask"] = f"masks/{name}.png"
                rows.append(row)
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "split", "reference", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_evaluate_from_a_manifest_with_references(settings_env, tmp_path):
    """The reference detector fits on the train pairs and is tested on the test pairs, the
    reference photos themselves left out."""
    from flawline.cli.main import app

    root = manifest_tree(tmp_path / "pcb")
    run = CliRunner()
    assert run.invoke(app, ["data", "import", str(root), "--dataset", "pcb"]).exit_code == 0
    done = run.invoke(app, ["data", "split", "pcb", "--keep-preset"])
    assert done.exit_code == 0, done.output
    out = tmp_path / "report"
    result = run.invoke(app, ["evaluate", "pcb", "--method", "reference", "--image-size", "256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "30 images without a reference image" in " ".join(result.output.split())  # the 30 reference photos
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["image_auroc"] >= 0.95
    assert report["context"]["train_images"] == 14 - 1  # a tenth held out to calibrate on (no val split)

    alone = run.invoke(app, ["evaluate", "pcb", "--method", "padim", "--image-size", "256", "--out", str(tmp_path / "p")])
    assert alone.exit_code == 0, alone.output  # every photo, references included, as plain images
    assert json.loads((tmp_path / "p" / "report.json").read_text())["metrics"]["image_auroc"] < 0.8


def test_a_training_run_decodes_pairs(catalog, store, tmp_path):
    """The training runner (here in process; a Ray job decodes through the same ``decode_rows``)
    trains and tests on pairs, leaving the reference photos out."""
    from flawline.data.ingest import import_dataset
    from flawline.data.split import SplitSpec, assign_splits
    from flawline.train.runner import finish_run, plan_run, train_local
    from flawline.train.spec import TrainSpec

    import_dataset(catalog, store, manifest_tree(tmp_path / "pcb"), dataset="pcb")
    assign_splits(catalog, "pcb", SplitSpec(keep_preset=True))
    plan = plan_run(catalog, TrainSpec(datasets=["pcb"], setting="unsupervised", method="reference", image_size=256))
    assert all(r.reference_key for rows in plan.streams.values() for r in rows)
    assert len(plan.streams["normal"]) + len(plan.data.val) == 14 and len(plan.data.test) == 16
    assert plan.unpaired == 30 and plan.summary()["unpaired_left_out"] == 30  # the reference photos
    assert plan.notes() == ["30 image(s) without a reference image (the references themselves among them) were "
                            "left out: reference compares each image with its reference"]
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    assert metrics["image_auroc"] >= 0.95


def test_serving_pairs_each_image_with_its_requests_reference(data):
    """Serving's model side (here without Ray): items carrying their request's reference image are
    paired as evaluation pairs them (one shared ``pair``) and scored as ``predict`` scores the pair;
    an item without one, or a reference that does not decode, is the request's error (``shared``)."""
    from flawline.data.loading import decode_image
    from flawline.serving.models import LoadedModel, ModelRef
    from flawline.serving.pipeline import Item, predict_items

    (ti, tr, _), (ni, nr, _), _ = data
    det = create_detector("reference", image_size=64).fit(pair(tensor(ti[:4]), tensor(tr[:4])))
    model = LoadedModel(ModelRef("pcb-reference", 1, "production", "reference", "s3://b/m.pt", None), det, 0.0)
    golden = _png(nr[0])
    outcomes = predict_items(model, [Item(_png(ni[0]), reference=golden),
                                     Item(b"junk", "junk.png", reference=golden)])
    expected = det.predict(pair(decode_image(_png(ni[0]), 64), decode_image(golden, 64))[None]).scores[0]
    assert outcomes[0].error is None and outcomes[0].score == pytest.approx(float(expected), rel=1e-4)
    assert outcomes[1].status == 400 and outcomes[1].error.startswith("junk.png: ") and not outcomes[1].shared

    missing = predict_items(model, [Item(_png(ni[0])), Item(_png(ni[1]))])
    assert [o.status for o in missing] == [400, 400] and all(o.shared for o in missing)
    assert missing[0].error == ("pcb-reference compares each image with its defect-free reference: pass "
                                "?reference=s3://... (gRPC: reference_uri; flawline predict --reference)")
    bad = predict_items(model, [Item(_png(ni[0]), reference=b"not a png", reference_name="reference golden.png")])
    assert bad[0].shared and bad[0].status == 400 and bad[0].error.startswith("reference golden.png: ")
    gray_rgb = pair(decode_image(_png(ni[0]), 64), decode_image(golden, 64).expand(3, -1, -1))
    assert gray_rgb.shape == (6, 64, 64)  # gray against RGB pairs as gray against gray


def test_a_pair_counts_both_images_against_the_shard_cache():
    """An image/reference pair decodes to 6 channels: the shard-cache budget must count them."""
    from flawline.train.distributed import decoded_bytes

    assert decoded_bytes(64) == 5 * 64 * 64 + 32
    assert decoded_bytes(64, reference=True) - decoded_bytes(64) == 3 * 64 * 64
