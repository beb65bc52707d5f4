"""Weakly supervised training: a segmenter from boxes/ellipses and a classifier (CAM maps) from image
labels, end to end on a small synthetic set (bright blobs on a textured background) — plan, train
in-process, calibrate, evaluate, register — plus the box rasteriser and the core/ring targets."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from flawline.catalog import Annotation, AnnotationSource, Catalog, Dataset, Image, Label, ModelVersion, Split
from flawline.data.records import ImageRecord, boxes_to_region, fetch
from flawline.data.split import SplitSpec, assign_splits
from flawline.errors import InvalidInput
from flawline.storage import ObjectStore
from flawline.train import TrainSpec, get_setting
from flawline.train.data import RunData
from flawline.train.runner import finish_run, plan_run, train_local
from flawline.train.weakly import box_targets, region_depth

W, H = 96, 80  # stored size; the models see 64 x 64


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _blob_image(rng: np.random.Generator, blob: tuple[int, int, int] | None) -> tuple[bytes, np.ndarray]:
    """A textured grey image, with a bright disc (cx, cy, r) when ``blob`` is given; and its mask."""
    coarse = rng.normal(0.0, 0.06, (H // 8 + 1, W // 8 + 1))
    texture = np.kron(coarse, np.ones((8, 8)))[:H, :W] + rng.normal(0.0, 0.02, (H, W))
    img = 0.4 + texture
    yy, xx = np.mgrid[0:H, 0:W]
    mask = np.zeros((H, W), dtype=bool)
    if blob is not None:
        cx, cy, r = blob
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[mask] = 0.9 + rng.normal(0.0, 0.02, int(mask.sum()))
    rgb = (np.clip(img, 0, 1)[..., None].repeat(3, -1) * 255).astype(np.uint8)
    return _png(rgb, "RGB"), mask


def make_blob_dataset(catalog: Catalog, store: ObjectStore, name: str, *, defects: int = 16, normals: int = 16,
                      boxes: bool = True, seed: int = 0) -> str:
    """``defects`` images with one disc each (boxes = the disc's bounding box, every third drawn as
    an ellipse; loosened by a few pixels on some), ``normals`` without; split 60/15/25; the test
    split's defects get their true masks (for pixel metrics)."""
    rng = np.random.default_rng(seed)
    masks: dict[str, bytes] = {}
    with catalog.session() as s:
        ds = Dataset(name=name, layout="synthetic")
        s.add(ds)
        s.flush()
        ds_id = ds.id
        for i in range(defects + normals):
            blob = None
            if i < defects:
                r = int(rng.integers(7, 12))
                blob = (int(rng.integers(r + 2, W - r - 2)), int(rng.integers(r + 2, H - r - 2)), r)
            data, mask = _blob_image(rng, blob)
            key = f"datasets/{name}/images/{i:03d}.png"
            store.put_bytes(key, data, "image/png")
            image = Image(dataset_id=ds.id, object_key=key, content_hash=hashlib.sha256(data).hexdigest(),
                          byte_size=len(data), width=W, height=H, channels=3, format="PNG", origin=f"blob{i}.png")
            s.add(image)
            s.flush()
            box_list = None
            if blob is not None and boxes:
                cx, cy, r = blob
                pad = int(rng.integers(0, 3))
                box = {"x": cx - r - pad, "y": cy - r - pad, "w": 2 * r + 1 + 2 * pad, "h": 2 * r + 1 + 2 * pad,
                       "label": "blob"}
                box_list = [dict(box, shape="ellipse") if i % 3 == 0 else box]
            if blob is not None:
                masks[key] = _png(mask.astype(np.uint8) * 255, "L")
            s.add(Annotation(image_id=image.id, label=Label.defect if blob else Label.normal, boxes=box_list,
                             source=AnnotationSource.imported))
    assign_splits(catalog, name, SplitSpec(train=0.6, val=0.15, test=0.25, seed=seed))
    with catalog.session() as s:
        test_defects = s.execute(select(Annotation, Image.object_key).join(Image).where(
            Image.dataset_id == ds_id, Image.split == Split.test, Annotation.label == Label.defect)).all()
        for ann, key in test_defects:
            mask_key = key.replace("/images/", "/masks/")
            store.put_bytes(mask_key, masks[key], "image/png")
            ann.mask_key = mask_key
    return name


def _inside_outside(detector, store: ObjectStore, plan) -> tuple[float, float]:
    """Mean map value inside and outside the true blobs on the test split's defect images."""
    test = fetch(store, [r for r in plan.data.test if r.defect], plan.spec.image_size)
    maps = detector.predict(test.images).maps
    masks = test.masks.astype(bool)
    return float(maps[masks].mean()), float(maps[~masks].mean())


def _spec(dataset: str, method: str, **kw) -> TrainSpec:
    values = dict(datasets=[dataset], setting="weakly", method=method, image_size=64, epochs=2, batch_size=10)
    return TrainSpec(**{**values, **kw})


@pytest.fixture
def blobs(catalog, store) -> str:
    return make_blob_dataset(catalog, store, "blobs")


def test_segmenter_learns_from_boxes(catalog, store, blobs):
    plan = plan_run(catalog, _spec(blobs, "segmenter", lr=3e-3))
    assert plan.method == "segmenter"
    assert all(r.boxes for r in plan.streams["labelled"] if r.defect)
    assert plan.summary()["streams"]["labelled"] == 20
    detector, history = train_local(store, plan)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    metrics = finish_run(catalog, store, plan, detector, history=history)
    assert metrics["model"] == "blobs-weakly-segmenter:1"
    assert "pixel_auroc" in metrics  # the test split's true masks
    with catalog.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.name == "blobs-weakly-segmenter"))
        assert row.method == "segmenter" and row.threshold is not None
    inside, outside = _inside_outside(detector, store, plan)
    assert inside > outside + 0.05, (inside, outside)
    assert metrics["pixel_auroc"] > 0.7


def test_classifier_learns_from_image_labels(catalog, store, blobs):
    plan = plan_run(catalog, _spec(blobs, None))
    assert plan.method == "classifier" and plan.class_counts == [10, 10]
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    assert metrics["model"] == "blobs-weakly-classifier:1"
    inside, outside = _inside_outside(detector, store, plan)  # the CAM finds the blobs
    assert inside > outside, (inside, outside)


def test_missing_labels(catalog, store):
    make_blob_dataset(catalog, store, "noboxes", defects=6, normals=6, boxes=False)
    with pytest.raises(InvalidInput, match=r"noboxes cannot train 'weakly': no boxes or ellipses on defect "
                                           r"images in the train split; .*--method classifier"):
        plan_run(catalog, _spec("noboxes", "segmenter"))
    assert plan_run(catalog, _spec("noboxes", "classifier")).streams["labelled"]  # image labels suffice

    make_blob_dataset(catalog, store, "nonormal", defects=6, normals=0)
    with pytest.raises(InvalidInput, match="no labelled normal images in the train split"):
        plan_run(catalog, _spec("nonormal", "classifier"))
    # Outside the boxes is background, but with no normal image there is nothing to choose the
    # verdict threshold on without a validation split: refused before training, not shipped at p >= 0.5.
    with pytest.raises(InvalidInput, match="cannot calibrate 'weakly'.*validation split with both verdicts"):
        plan_run(catalog, _spec("nonormal", "segmenter"))


def test_select_drops_defects_without_boxes():
    setting = get_setting("weakly")
    rows = [ImageRecord(1, "a.png", "x", "train", 8, 8, True, boxes=[{"x": 0, "y": 0, "w": 2, "h": 2}]),
            ImageRecord(2, "b.png", "x", "train", 8, 8, True, mask_key="m.png"),
            ImageRecord(3, "c.png", "x", "train", 8, 8, False)]
    data = RunData(labelled=rows, unlabelled=[], val=[], test=[])
    assert setting.select(data, _spec("x", "segmenter"))["labelled"] == [rows[0], rows[2]]
    assert setting.select(data, _spec("x", "classifier"))["labelled"] == rows


def test_boxes_to_region_rect_and_ellipse():
    # 100 x 50 image at 50 x 50: x scales by 0.5, y by 1.
    rect = boxes_to_region([{"x": 10, "y": 20, "w": 30, "h": 10}], 100, 50, 50)
    assert rect.dtype == bool and rect.shape == (50, 50)
    ys, xs = np.nonzero(rect)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 29, 5, 19) and rect.sum() == 150
    ellipse = boxes_to_region([{"x": 0, "y": 0, "w": 100, "h": 50, "shape": "ellipse"}], 100, 50, 50)
    assert ellipse[25, 25] and ellipse[25, 0] and ellipse[0, 25]
    assert not ellipse[0, 0] and not ellipse[49, 49] and not ellipse[3, 3]
    assert abs(ellipse.sum() - np.pi * 25 * 25) < 40
    both = boxes_to_region([{"x": 10, "y": 20, "w": 30, "h": 10},
                            {"x": 0, "y": 0, "w": 100, "h": 50, "shape": "ellipse"}], 100, 50, 50)
    assert np.array_equal(both, rect | ellipse)
    assert not boxes_to_region([], 100, 50, 50).any()


def test_box_targets_core_ring_and_background():
    region = torch.zeros(3, 16, 16)
    region[0, 2:10, 4:12] = 1  # 8 x 8 box: depth 1..4
    region[0, 13:15, 13:15] = 1  # 2 x 2 box: too small for a ring
    region[2, :, :] = 0  # a defect image without boxes (unknown everywhere)
    depth = region_depth(region[:1] > 0)
    assert depth[0, 2:10, 4:12].max() == 4 and depth[0, 2, 4] == 1 and depth[0, 0, 0] == 0
    target, valid = box_targets(region, (16, 16), 0.5, known=torch.tensor([True, True, False]))
    core = target[0].bool()
    assert core[4:8, 6:10].all() and core.sum() == 16 + 4  # inner 4 x 4 of the big box, the whole small box
    ring = region[0].bool() & ~core
    assert ring.sum() == 64 - 16 and not valid[0][ring].any()  # the ring is ignored
    assert valid[0][~region[0].bool()].all() and not target[0][~region[0].bool()].any()  # outside: background
    assert valid[1].all() and not target[1].any()  # a normal image: all background
    assert not valid[2].any()  # nothing known
    # at a coarser resolution (4 x 4 cells of 4 x 4 pixels) any overlap with a box keeps a cell out
    # of the background
    target, valid = box_targets(region[:1], (4, 4))
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[0:3, 1:3] = False
    expected[3, 3] = False
    assert torch.equal((valid[0] > 0) & (target[0] == 0), expected)
