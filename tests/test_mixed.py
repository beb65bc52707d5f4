"""Mixed supervision: the label-aware detector built on a normal-only one. With no labels it ranks
exactly as its base; labelled defects raise held-out ROC-AUC; an empty or one-class labelled set
calibrates from normals alone and says so; thresholds are never chosen on fitted images; the
setting end to end through the runner (plan, train, calibrate, register) and save/load/ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from conftest import SIZE, crack_tiles
from conftest import smooth_textures as textures
from flawline.catalog import Annotation, AnnotationSource, Dataset, Image, Label
from flawline.catalog.queries import image_labels
from flawline.data.ingest import import_dataset
from flawline.data.split import SplitSpec, assign_splits
from flawline.errors import ConfigError
from flawline.evaluate.metrics import roc_auc
from flawline.models import create_detector
from flawline.models.artifacts import detector_from_bytes, detector_to_bytes
from flawline.models.mixed import HeadInputs
from flawline.train import TrainSpec
from flawline.train.mixed import MixedSupervision, head_threshold
from flawline.train.runner import finish_run, plan_run, train_local

FAST = {"image_size": SIZE, "batch_size": 16}


def scratched(x: torch.Tensor, seed: int, amp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A faint dark scratch (16 x 3 px) at a random place in each image, and its mask."""
    g = torch.Generator().manual_seed(seed)
    y, masks = x.clone(), torch.zeros(len(x), SIZE, SIZE)
    for i in range(len(x)):
        r, c = torch.randint(4, 44, (2,), generator=g).tolist()
        y[i, :, r:r + 16, c:c + 3] -= amp
        masks[i, r:r + 16, c:c + 3] = 1
    return y, masks


def fitted(base: str = "padim", normals: int = 60):
    det = create_detector("mixed", base_method=base, **FAST).fit(textures(normals, 0))
    held = textures(30, 1)
    h = det.head_inputs(held)
    det.set_normal_stats(h.scores, h.patch_map)
    return det, h


@pytest.mark.parametrize("base", ["padim", "patchcore"])
def test_without_labels_scores_rank_exactly_as_the_base_detector(base):
    det, _ = fitted(base)
    x = torch.cat([textures(20, 5), scratched(textures(20, 6), 6, 0.2)[0]])
    mixed, plain = det.predict(x), det.base.predict(x)
    assert (np.argsort(mixed.scores, kind="stable") == np.argsort(plain.scores, kind="stable")).all()
    # affine in the base score: z = (s - mean) / std of the held-back normals
    np.testing.assert_allclose(mixed.scores, det.z(plain.scores), rtol=1e-4, atol=1e-4)


def washed_out(x: torch.Tensor) -> torch.Tensor:
    """A defect that normal-only detectors barely see: the texture's contrast at 40 %."""
    return 0.5 + (x - 0.5) * 0.4


def test_labelled_defects_raise_held_out_auroc():
    det, normal = fitted("padim", normals=40)
    defects = det.head_inputs(washed_out(textures(24, 2)))
    test_x = torch.cat([textures(40, 3), washed_out(textures(40, 4))])
    y = np.r_[np.zeros(40), np.ones(40)]
    before = roc_auc(y, det.predict(test_x).scores)
    result = det.fit_head(normal, defects)
    after = roc_auc(y, det.predict(test_x).scores)
    assert result["chosen"] != "z" and result["cv_auroc"][result["chosen"]] > result["cv_auroc"]["z"]
    assert before < 0.8 and after > 0.95, (before, after, result["cv_auroc"])


def test_no_defects_calibrates_on_normals_alone_and_says_so():
    det, normal = fitted()
    result = det.fit_head(normal, HeadInputs.concat([]))
    assert result["chosen"].startswith("z (no labelled defects")
    t = head_threshold(result, det.z(normal.scores), 0)
    assert t.method == "quantile" and "no labelled defects" in t.data["note"]
    assert t.value == pytest.approx(np.quantile(det.z(normal.scores), 0.99))


def test_one_defect_falls_back_to_the_base_ranking():
    det, normal = fitted()
    x, _ = scratched(textures(1, 9), 9, 0.3)
    result = det.fit_head(normal, det.head_inputs(x))
    assert result["chosen"].startswith("z") and not result["cv_auroc"]  # nothing to cross-validate
    y = torch.cat([textures(10, 5), scratched(textures(10, 6), 6, 0.2)[0]])
    assert (np.argsort(det.predict(y).scores) == np.argsort(det.base.predict(y).scores)).all()


def test_bad_configurations_are_refused():
    with pytest.raises(ConfigError, match="base_method 'classifier' must be one of patchcore, padim, flow"):
        create_detector("mixed", base_method="classifier")
    with pytest.raises(ConfigError, match="base_options cannot set image_size"):
        create_detector("mixed", base_options={"image_size": 32})
    with pytest.raises(ConfigError, match="not trained"):
        create_detector("mixed", **FAST).scorer()


def with_patch_contrast(det, normal: HeadInputs, coef: float = 0.5):
    """A head that uses the two-bank patch contrast: defect bank from masked scratches."""
    from flawline.models.head import coreset, defect_patches
    from flawline.models.mixed import identity_head

    x, masks = scratched(textures(12, 2), 2, 0.3)
    d = det.head_inputs(x, masks, torch.ones(12, dtype=torch.bool))
    det.head = {**identity_head(), "coef_p": coef, "chosen": "z+patches",
                "normal_bank": coreset(normal.patches.reshape(-1, normal.patches.shape[-1])),
                "defect_bank": coreset(defect_patches(d.patches, d.targets, d.patch_map))}
    return det


def test_patch_contrast_head_scores_alike_from_images_and_cached_inputs():
    """The scorer module (predict, ONNX) and the cached inputs the benchmarks use agree."""
    det, normal = fitted("patchcore", normals=40)
    with_patch_contrast(det, normal)
    probe = torch.cat([textures(4, 7), scratched(textures(4, 8), 8, 0.3)[0]])
    cached, _ = det.scores_from_inputs(det.head_inputs(probe))
    np.testing.assert_allclose(cached, det.predict(probe).scores, rtol=1e-2, atol=1e-2)


def test_save_load_and_onnx_score_alike(tmp_path):
    from flawline.models.export import check_export, export_onnx

    det, normal = fitted("patchcore", normals=40)
    with_patch_contrast(det, normal)
    probe = torch.cat([textures(6, 7), scratched(textures(6, 8), 8, 0.3)[0]])
    loaded = detector_from_bytes(detector_to_bytes(det))
    np.testing.assert_allclose(loaded.predict(probe).scores, det.predict(probe).scores, rtol=1e-5, atol=1e-5)
    path = export_onnx(det, tmp_path / "mixed.onnx")
    assert check_export(det, path, probe)["max_rel_score_diff"] < 1e-3


# -- the setting, through the runner ------------------------------------------------------------
def _dataset(catalog, store, root: Path, name: str, val: float = 0.0) -> str:
    import_dataset(catalog, store, root, dataset=name, workers=4)
    assign_splits(catalog, name, SplitSpec(train=0.7 - val, val=val, test=0.3, seed=0))
    return name


def test_mixed_setting_trains_calibrates_on_held_out_images_and_registers(catalog, store, tmp_path):
    name = _dataset(catalog, store, crack_tiles(tmp_path / "t", normal=40, defect=14, unlabelled=0), "tiles")
    spec = TrainSpec(datasets=[name], setting="mixed", image_size=SIZE, batch_size=16)
    plan = plan_run(catalog, spec)
    fit = {r.image_id for r in plan.streams["normal"]}
    held = {r.image_id for r in plan.streams["calibration"]}
    assert held and not fit & held and plan.streams["defects"]
    assert not plan.data.val  # mixed holds back its own normals; nothing else is taken from training
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    t = metrics["threshold"]
    assert t["method"] == "youden" and "out-of-fold" in t["data"]["note"]
    assert metrics["image_auroc"] >= 0.95 and metrics["accuracy"] >= 0.9
    assert metrics["model"] == "tiles-mixed-padim:1"


def test_mixed_setting_starts_from_no_labels(catalog, store, tmp_path):
    """The loop's round 0: nothing labelled in the train split; the base fits on every train image
    and the threshold comes from normals alone, saying so."""
    from flawline.active.simulation import hide_labels

    name = _dataset(catalog, store, crack_tiles(tmp_path / "t", normal=30, defect=6, unlabelled=0), "nolabels")
    assert hide_labels(catalog, name, keep=0.0)["kept"] == 0
    plan = plan_run(catalog, TrainSpec(datasets=[name], setting="mixed", image_size=SIZE, batch_size=16))
    assert not plan.data.labelled and not plan.streams["defects"]
    assert len(plan.streams["normal"]) + len(plan.streams["calibration"]) == len(plan.data.unlabelled)
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    assert metrics["threshold"]["method"] == "quantile"
    assert "no labelled defects" in metrics["threshold"]["data"]["note"]
    assert history[0]["head"].startswith("z (no labelled defects")


def test_label_trained_settings_never_ship_p_at_one_half(catalog, store, tmp_path):
    """Without a validation split the supervised classifier is calibrated on held-back labelled
    train images, not on p(defect) >= 0.5."""
    name = _dataset(catalog, store, crack_tiles(tmp_path / "t", normal=20, defect=12, unlabelled=0), "sup")
    plan = plan_run(catalog, TrainSpec(datasets=[name], setting="supervised", image_size=SIZE, epochs=1,
                                       batch_size=8))
    held = {r.image_id for r in plan.data.val}
    assert held and not held & {r.image_id for r in plan.data.labelled}
    assert {r.defect for r in plan.data.val} == {True, False}
    assert not held & {r.image_id for rows in plan.streams.values() for r in rows}
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    assert metrics["threshold"]["method"] == "best-f1" and metrics["threshold"]["value"] != 0.5


def test_with_an_unlabelled_pool_the_base_fits_on_it_and_labelled_images_stay_out(catalog, store, tmp_path,
                                                                                 monkeypatch):
    """The loop's regime: a few labels and a large pool. The base fits on the pool; the labelled
    normal images are the head's negatives and were never fitted on."""
    root = crack_tiles(tmp_path / "t", normal=16, defect=14, unlabelled=8)  # 4 of the 8 cracked
    for i, tile in enumerate(sorted((crack_tiles(tmp_path / "more", normal=40, defect=0, unlabelled=0, seed=5)
                                     / "normal").iterdir())):
        tile.rename(root / "unlabeled" / f"clean{i}.png")  # a pool of 48, 4 of them defects
    name = _dataset(catalog, store, root, "pool")
    plan = plan_run(catalog, TrainSpec(datasets=[name], setting="mixed", image_size=SIZE, batch_size=16))
    labelled_normals = {r.image_id for r in plan.data.labelled if r.defect is False}
    fit = {r.image_id for r in plan.streams["normal"]}
    assert fit and fit <= {r.image_id for r in plan.data.unlabelled}
    assert labelled_normals and labelled_normals <= {r.image_id for r in plan.streams["calibration"]}
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    assert detector.info["head"]["normal_images"] + detector.info["head"]["normal_bank_images"] == len(labelled_normals)
    assert metrics["threshold"]["method"] == "youden" and metrics["image_auroc"] >= 0.9
    # The pool's confident outliers became pseudo defect annotations: cracked images only (u1, u3,
    # ...), none of them human labels. With ~11 held-out normals no conformal confidence reaches
    # 0.99, so none were stored at the default tau.
    assert metrics["pseudo_defects"] == 0
    with catalog.session() as s:
        before = image_labels(s, s.scalar(select(Dataset.id).where(Dataset.name == name)))
    monkeypatch.setattr(MixedSupervision, "tau", 0.9)
    stored = plan.setting.after_training(catalog, store, plan, detector, "pool-mixed-padim")["pseudo_defects"]
    with catalog.session() as s:
        rows = s.execute(select(Image.origin, Annotation.label, Annotation.confidence, Annotation.annotator)
                         .join(Annotation, Annotation.image_id == Image.id)
                         .where(Annotation.source == AnnotationSource.pseudo)).all()
    assert stored == len(rows) >= 2
    assert all(label == Label.defect and c >= 0.9 and who == "flawline:pool-mixed-padim" for _, label, c, who in rows)
    assert all(Path(o).stem.startswith("u") and int(Path(o).stem[1:]) % 2 == 1 for o, *_ in rows), rows  # cracked
    again = plan.setting.after_training(catalog, store, plan, detector, "pool-mixed-padim")["pseudo_defects"]
    with catalog.session() as s:  # replaced, not added to
        assert again == stored == s.scalar(select(func.count()).select_from(Annotation)
                                           .where(Annotation.source == AnnotationSource.pseudo))
        dataset_id = s.scalar(select(Dataset.id).where(Dataset.name == name))
        assert image_labels(s, dataset_id) == before  # pseudo-annotations decide no image's label


@pytest.mark.parametrize("base", ["padim", "patchcore", "flow"])
def test_cross_fitting_leaves_a_pools_outliers_out_of_the_normal_model(base):
    """An unlabelled pool with defects in it: with ``trim`` the confident outliers stay out of the
    normal model, and held-out defects score higher against the normal images than without."""
    pool = torch.cat([textures(40, 0), scratched(textures(8, 1), 1, 0.35)[0]])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))]
    test_x = torch.cat([textures(20, 3), scratched(textures(20, 4), 4, 0.35)[0]])
    y = np.r_[np.zeros(20), np.ones(20)]
    options = {"epochs": 4} if base == "flow" else {}
    plain = create_detector("mixed", base_method=base, base_options=options, **FAST).fit(pool)
    trimmed = create_detector("mixed", base_method=base, base_options=options, trim=0.2, **FAST).fit(pool)
    assert trimmed.info["trimmed"]["left_out"] == pytest.approx(0.2 * len(pool), abs=2)
    assert trimmed.base.info["train_images"] == len(pool) - trimmed.info["trimmed"]["left_out"]
    before = roc_auc(y, plain.base.predict(test_x).scores)
    after = roc_auc(y, trimmed.base.predict(test_x).scores)
    assert after >= before, (before, after)


def test_conformal_confidence_of_a_pseudo_annotation():
    """1 - (1 + #{normal scores >= s}) / (n + 1): never above n / (n + 1), ties count as normal."""
    from flawline.train.pseudo import conformal_confidence

    normals = np.arange(1.0, 10.0)  # n = 9
    got = conformal_confidence(normals, np.array([10.0, 9.0, 5.0, 0.0]))
    assert got == pytest.approx([0.9, 0.8, 0.4, 0.0])
