"""Tiled detection (``flawline.models.tiling``): large images with small defects are cut into
overlapping tiles for fitting and prediction, the maps stitched back, the same way in ``predict``,
the ONNX export, saved models and the label settings' segmenter training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import smooth_textures
from flawline.errors import ConfigError
from flawline.evaluate.metrics import roc_auc
from flawline.models import create_detector
from flawline.models.artifacts import detector_from_bytes, detector_to_bytes
from flawline.models.tiling import grid, random_crops, stitch, tile_offsets, tiles

BIG = 256  # the image side; the defects are 6 px, 2 % of it
TILE = 64
DEFECT = (slice(150, 156), slice(40, 46))


def textures(n: int, seed: int) -> torch.Tensor:
    """Fine gray textures (a period of a few pixels), BIG px a side."""
    return smooth_textures(n, seed, BIG)


def with_small_defects(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[:, :, DEFECT[0], DEFECT[1]] = 1.0
    return y


@pytest.fixture(scope="module")
def data():
    return textures(8, 0), textures(6, 1), with_small_defects(textures(6, 2))


def test_the_tile_grid_covers_the_image_and_stitching_inverts_cutting():
    assert tile_offsets(1024, 256, 0.25) == [0, 192, 384, 576, 768]
    assert tile_offsets(1000, 256, 0.5) == [0, 124, 248, 372, 496, 620, 744]  # last flush with the edge
    assert tile_offsets(256, 256, 0.25) == [0]
    for size, tile, overlap in ((1024, 256, 0.25), (300, 64, 0.0), (97, 32, 0.5)):
        offsets = tile_offsets(size, tile, overlap)
        assert offsets[0] == 0 and offsets[-1] == size - tile
        assert all(b - a <= tile * (1 - overlap) + 1 for a, b in zip(offsets, offsets[1:]))  # they overlap
    x = torch.rand(2, 3, 200, 200)
    cut = tiles(x, 64, 0.25)
    assert cut.shape == (2 * len(grid(200, 64, 0.25)), 3, 64, 64)
    (y0, x0) = grid(200, 64, 0.25)[5]
    torch.testing.assert_close(cut[5], x[0, :, y0:y0 + 64, x0:x0 + 64])  # image by image, row by row
    torch.testing.assert_close(stitch(cut[:, 1], 200, 0.25), x[:, 1])  # overlaps averaged: exact


def test_random_crops_put_half_the_crops_on_a_defect():
    x = torch.rand(40, 3, 128, 128)
    mask = torch.zeros(40, 128, 128)
    mask[:, 100:104, 10:14] = 1.0
    g = torch.Generator().manual_seed(0)
    cx, cm = random_crops(x, mask, 32, g, on_defect=1.0)
    assert cx.shape == (40, 3, 32, 32) and cm.shape == (40, 32, 32)
    assert bool((cm.flatten(1).max(1).values > 0).all())  # every crop holds defect pixels
    # the crop of the image is the crop of the mask: find it back
    i = 7
    hits = [(t, l) for t in range(97) for l in range(97) if torch.equal(x[i, :, t:t + 32, l:l + 32], cx[i])]
    (t, l), = hits
    assert torch.equal(mask[i, t:t + 32, l:l + 32], cm[i])
    _, uniform = random_crops(x, mask, 32, torch.Generator().manual_seed(0), on_defect=0.0)
    assert 0 < int((uniform.flatten(1).max(1).values > 0).sum()) < 40 // 2  # uniform: few crops hit a 4 px defect


def test_tiled_padim_finds_small_defects_that_resizing_loses(data):
    """At 64 px the 6 px defect becomes 1.5 px; tiles of 64 px at native resolution keep it whole."""
    train, normal, defect = data
    labels = [0] * len(normal) + [1] * len(defect)
    resized = create_detector("padim", image_size=TILE, batch_size=8).fit(train)
    tiled = create_detector("padim", image_size=BIG, tile=TILE, tile_overlap=0.25, batch_size=32).fit(train)
    assert tiled.info["train_images"] == 8 and tiled.info["train_tiles"] == 8 * len(grid(BIG, TILE, 0.25)) == 200
    test = torch.cat([normal, defect])
    r, t = resized.predict(test), tiled.predict(test)
    assert t.scores.shape == (12,) and t.maps.shape == (12, BIG, BIG)
    assert roc_auc(labels, t.scores) == 1.0
    assert roc_auc(labels, t.scores) > roc_auc(labels, r.scores)
    np.testing.assert_allclose(t.scores, t.maps.reshape(12, -1).max(1), rtol=1e-6)  # score = stitched map's max
    peak = np.unravel_index(t.maps[6:].reshape(6, -1).argmax(1), (BIG, BIG))
    assert np.all(np.abs(peak[0] - 153) <= 8) and np.all(np.abs(peak[1] - 43) <= 8)  # at the defect


def test_tiled_models_save_load_and_export_like_they_predict(data, tmp_path):
    from flawline.models.export import check_export, export_onnx

    train, normal, defect = data
    det = create_detector("patchcore", image_size=BIG, tile=TILE, tile_overlap=0.25, batch_size=32,
                          coreset_ratio=0.05).fit(train[:4])
    test = torch.cat([normal[:2], defect[:2]])
    again = detector_from_bytes(detector_to_bytes(det))
    assert (again.config.tile, again.config.tile_overlap) == (TILE, 0.25)
    np.testing.assert_allclose(again.predict(test).scores, det.predict(test).scores, rtol=1e-6)
    drift = check_export(det, export_onnx(det, tmp_path / "tiled.onnx"), test)  # the ONNX graph stitches too
    assert drift["max_rel_score_diff"] < 1e-4 and drift["max_abs_map_diff"] < 1e-3


@pytest.mark.parametrize("method", ["flow", "ndpnet"])
def test_gradient_trained_detectors_fit_on_tiles(method, data):
    train, normal, defect = data
    short = {"flow": {"epochs": 2}, "ndpnet": {"epochs": 2, "phase1_epochs": 1}}[method]
    det = create_detector(method, image_size=128, tile=64, batch_size=16, **short).fit(train[:4, :, :128, :128])
    assert det.info["train_tiles"] == 4 * 9
    pred = det.predict(normal[:2, :, :128, :128])
    assert pred.maps.shape == (2, 128, 128) and np.isfinite(pred.scores).all()


def test_tiled_segmenter_trains_on_crops_in_the_supervised_setting(data):
    """The label setting's loop trains a tiled segmenter on random crops (half over a defect)."""
    from flawline.train.context import LocalContext
    from flawline.train.data import TensorBatches
    from flawline.train.spec import TrainSpec
    from flawline.train.supervised import Supervised

    train, normal, defect = data
    images = torch.cat([train[:6], with_small_defects(textures(6, 3))])
    masks = torch.zeros(12, BIG, BIG)
    masks[6:, DEFECT[0], DEFECT[1]] = 1.0
    uint8 = (images.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)  # as runs decode them
    source = TensorBatches({"labelled": {"image": uint8, "mask": masks,
                                         "target": torch.tensor([0] * 6 + [1] * 6)}}, batch_size=6, seed=0)
    det = create_detector("segmenter", image_size=BIG, tile=TILE, tile_overlap=0.25, batch_size=16)
    spec = TrainSpec(datasets=["t"], setting="supervised", method="segmenter", image_size=BIG, epochs=2, lr=1e-3)
    history = Supervised().train(det, source, spec, LocalContext("cpu"), [6, 6])
    assert len(history) == 2 and det.fitted
    pred = det.predict(torch.cat([normal[:2], defect[:2]]))
    assert pred.maps.shape == (4, BIG, BIG) and np.isfinite(pred.maps).all()


@pytest.mark.parametrize(("settings", "message"), [
    ({"image_size": 128, "tile": 256}, "tile 256 px must be 0 (no tiling) or lie in 32..127, under the "
                                       "image_size (--image-size)"),
    ({"image_size": 128, "tile": 16}, "lie in 32..127"),
    ({"image_size": 256, "tile": 256}, "a tile of the whole image is no tiling: raise image_size"),  # --image-size forgotten
    ({"image_size": 128, "tile": 64, "tile_overlap": 0.95}, "tile_overlap 0.95 must lie in 0..0.9"),
    ({"image_size": 128, "tile": 64, "tile_overlap": 1.5}, "is a share"),
    ({"image_size": 128, "tile": -1}, "must be at least 0"),
])
def test_bad_tiling_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        create_detector("padim", **settings)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["classifier", "fewshot", "mixed"])
def test_detectors_that_cannot_be_tiled_say_why(method):
    with pytest.raises(ConfigError, match=f"{method}: cannot be tiled .*; leave tile at 0"):
        create_detector(method, image_size=128, tile=64)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("classifier", {"tile": 64}, "classifier: cannot be tiled"),
    ("padim", {"tile": 512}, "tile 512 px must be 0 .* lie in 32..255"),  # the run's --image-size 256
])
def test_a_run_asking_for_impossible_tiling_is_refused_before_submission(method, options, message):
    from flawline.train.runner import plan_run
    from flawline.train.spec import TrainSpec

    spec = TrainSpec(datasets=["x"], setting="supervised" if method == "classifier" else "unsupervised",
                     method=method, image_size=256, options=options)
    with pytest.raises(ConfigError, match=message):
        plan_run(None, spec)  # refused before the catalog is read
