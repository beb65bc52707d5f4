"""Label settings end to end on a tiny folder dataset: plan, train in-process, finish (threshold,
test metrics, artifact, model version); the settings' own label checks and catalog write-backs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from conftest import SIZE
from conftest import crack_tiles as _tiles
from flawline.catalog import Annotation, AnnotationSource
from flawline.catalog.model_versions import get_version
from flawline.data.ingest import import_dataset
from flawline.data.split import SplitSpec, assign_splits
from flawline.errors import InvalidInput
from flawline.models.artifacts import detector_from_bytes, detector_to_bytes
from flawline.train import TrainSpec
from flawline.train.data import TensorBatches, decode_all
from flawline.train.runner import finish_run, plan_run, train_local
from flawline.train.semisupervised import Cycled, SemiSupervised, store_pseudo_labels

TINY = {"image_size": SIZE, "epochs": 1, "batch_size": 8}


def _dataset(catalog, store, root: Path, name: str, **split) -> str:
    import_dataset(catalog, store, root, dataset=name, workers=4)
    assign_splits(catalog, name, SplitSpec(train=0.6, val=0.2, test=0.2, seed=0, **split))
    return name


@pytest.fixture
def tiles(tmp_path: Path) -> Path:
    return _tiles(tmp_path / "tiles", normal=16, defect=10, unlabelled=10)


def _run(catalog, store, spec: TrainSpec):
    plan = plan_run(catalog, spec)
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector, history=history)
    return plan, detector, history, metrics


def _registered(catalog, ref: str):
    with catalog.session() as s:
        row = get_version(s, ref)
        return row.method, dict(row.metrics or {})


def _same_scores(detector, store, rows) -> None:
    images = decode_all(store, rows, SIZE)["image"].float() / 255.0
    loaded = detector_from_bytes(detector_to_bytes(detector))
    assert type(loaded) is type(detector)
    a, b = detector.predict(images), loaded.predict(images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-5, atol=1e-5)


# -- semi-supervised ------------------------------------------------------------------------------
def test_semisupervised_trains_registers_and_stores_pseudo_labels(catalog, store, tiles, monkeypatch):
    monkeypatch.setattr(SemiSupervised, "tau", 0.5)  # two classes: every verdict is confident enough
    name = _dataset(catalog, store, tiles, "tiles")
    spec = TrainSpec(datasets=[name], setting="semisupervised", model_name="tiles-semi", **TINY)
    plan, detector, history, metrics = _run(catalog, store, spec)
    assert plan.method == "classifier" and len(plan.streams["unlabelled"]) > 0
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and "pseudo_label_rate" in history[0]
    method, registered = _registered(catalog, metrics["model"])
    assert method == "classifier" and "image_auroc" in registered

    n = metrics["pseudo_labels"]
    assert n == len(plan.data.unlabelled)  # tau 0.5 over two classes keeps every one
    with catalog.session() as s:
        pseudo = s.execute(select(Annotation.image_id, Annotation.confidence, Annotation.annotator)
                           .where(Annotation.source == AnnotationSource.pseudo)).all()
    assert len(pseudo) == n
    assert {a for _, _, a in pseudo} == {"flawline:tiles-semi"}
    assert all(c >= 0.5 for _, c, _ in pseudo)
    assert {i for i, _, _ in pseudo} == {r.image_id for r in plan.data.unlabelled}
    # pseudo-labels never count as labels: the pool is still unlabelled
    assert len(plan_run(catalog, spec).data.unlabelled) == len(plan.data.unlabelled)
    # a stricter pass by the same annotator replaces its pseudo-labels and keeps only confident ones
    tau = float(np.median([c for _, c, _ in pseudo]))
    again = store_pseudo_labels(catalog, detector, store, plan.data.unlabelled, SIZE, tau,
                                model_name="tiles-semi")
    assert again == sum(c >= tau for _, c, _ in pseudo) and 0 < again
    with catalog.session() as s:
        kept = s.scalars(select(Annotation.confidence)
                         .where(Annotation.source == AnnotationSource.pseudo)).all()
    assert len(kept) == again and min(kept) >= tau
    _same_scores(detector, store, plan.data.test)


def test_semisupervised_missing_labels(catalog, store, tmp_path):
    name = _dataset(catalog, store, _tiles(tmp_path / "nounl", normal=8, defect=6, unlabelled=0), "no-pool")
    with pytest.raises(InvalidInput, match="no-pool cannot train 'semisupervised': no unlabelled images"):
        plan_run(catalog, TrainSpec(datasets=[name], setting="semisupervised", **TINY))
    name = _dataset(catalog, store, _tiles(tmp_path / "nodef", normal=8, defect=0, unlabelled=4), "no-defect")
    with pytest.raises(InvalidInput, match="no labelled defect images in the train split"):
        plan_run(catalog, TrainSpec(datasets=[name], setting="semisupervised", **TINY))


def test_semisupervised_epoch_is_a_fixed_step_count():
    def stream(n: int) -> dict[str, torch.Tensor]:
        return {"image": torch.zeros(n, 3, 8, 8, dtype=torch.uint8),
                "target": torch.zeros(n, dtype=torch.long)}

    source = TensorBatches({"labelled": stream(5), "unlabelled": stream(40)}, batch_size=4)
    steps = SemiSupervised().steps_per_epoch(source, 4)
    assert steps == 5  # 40 unlabelled / (mu 2 x 4); the 5 labelled rows cycle
    for rank in (0, 1):  # every rank, whatever its shard, takes the same number of batches
        sharded = TensorBatches(source.streams, batch_size=4, rank=rank, world=2)
        assert len(list(Cycled(sharded, steps).epoch("labelled", 0))) == steps


# -- few-shot -------------------------------------------------------------------------------------
def test_fewshot_trains_on_exactly_k_defects_and_round_trips(catalog, store, tiles):
    name = _dataset(catalog, store, tiles, "tiles")
    spec = TrainSpec(datasets=[name], setting="fewshot", shots=2,
                     options={"normal_options": {"channels": 32}}, **TINY)
    plan, detector, history, metrics = _run(catalog, store, spec)
    assert plan.data.count("labelled", defect=True) > 2
    assert len(plan.streams["defects"]) == 2 and all(r.defect for r in plan.streams["defects"])
    assert plan.streams["defects"] == plan.setting.shots(plan.data, spec)  # seeded: the same k again
    held = {r.image_id for r in plan.streams["calibration"]}
    assert held and not held & {r.image_id for r in plan.streams["normal"]}
    assert detector.info["shots"] == 2 and detector.info["normal_stats"]["images"] == len(held)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    method, registered = _registered(catalog, metrics["model"])
    assert method == "fewshot" and "image_auroc" in registered
    _same_scores(detector, store, plan.data.test)
    pred = detector.predict(decode_all(store, plan.data.test, SIZE)["image"].float() / 255.0)
    assert ((pred.scores >= 0) & (pred.scores <= 1)).all() and pred.maps.shape[-2:] == (SIZE, SIZE)


def test_fewshot_missing_labels(catalog, store, tiles):
    name = _dataset(catalog, store, tiles, "normal-train", normal_only_train=True)
    with pytest.raises(InvalidInput, match="normal-train cannot train 'fewshot': no labelled defect images"):
        plan_run(catalog, TrainSpec(datasets=[name], setting="fewshot", **TINY))


def test_one_run_trains_on_several_datasets(catalog, store, tmp_path):
    """Two product lines in one supervised run: rows of both, classes merged, one model."""
    first, second = "line-a", "line-b"
    for seed, name in ((1, first), (2, second)):
        import_dataset(catalog, store, _tiles(tmp_path / name, 10, 6, 0, seed=seed), dataset=name, workers=4)
        assign_splits(catalog, name, SplitSpec(train=0.6, val=0.0, test=0.4, seed=0))
    plan = plan_run(catalog, TrainSpec(datasets=[first, second], setting="supervised", **TINY))
    assert {r.dataset for r in plan.data.labelled} == {"line-a", "line-b"}
    assert {r.dataset for r in plan.data.test} == {"line-a", "line-b"}
    assert plan.data.classes == ["normal", "crack"] and sum(plan.class_counts) == len(plan.data.labelled)
    detector, history = train_local(store, plan)
    metrics = finish_run(catalog, store, plan, detector)
    assert metrics["model"] == "line-a+line-b-supervised-classifier:1" and metrics["images"] == len(plan.data.test)
    assert len(history) == 1 and history[0]["steps"] >= 1
    # the epoch's CPU time beside its wall time (the core share the scaling benchmark reports)
    assert 0 < history[0]["epoch_cpu_seconds"] <= history[0]["epoch_seconds"] * (torch.get_num_threads() + 1)


def test_label_fraction_keeps_a_stratified_share(catalog, store, tmp_path):
    name = "frac"
    import_dataset(catalog, store, _tiles(tmp_path / "c", 20, 10, 0), dataset=name, workers=4)
    assign_splits(catalog, name, SplitSpec(train=1.0, val=0.0, test=0.0, seed=0))
    from flawline.train.data import gather

    data = gather(catalog, [name], label_fraction=0.2, seed=0)
    assert sum(r.defect for r in data.labelled) == 2 and sum(not r.defect for r in data.labelled) == 4
    assert len(data.unlabelled) == 24 and all(r.target == -1 for r in data.unlabelled)
    assert gather(catalog, [name], label_fraction=0.2, seed=0).labelled == data.labelled  # seeded


@pytest.mark.parametrize("values, message", [
    ({"datasets": [], "setting": "supervised"}, "no dataset"),
    ({"datasets": ["x"], "setting": "fewshot", "shots": 11}, "shots must be between 1 and 10"),
    ({"datasets": ["x"], "setting": "supervised", "precision": "fp8"}, "precision"),
    ({"datasets": ["x"], "setting": "supervised", "colour": "red"}, "unknown training settings: colour"),
])
def test_bad_train_specs_are_refused(values, message):
    from flawline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainSpec.from_dict(values)


def test_a_run_without_an_image_size_trains_at_its_detectors_own_default():
    """``train submit`` without ``--image-size`` trains each detector at the size it is built with by
    default, which ``flawline evaluate`` uses too (it was 224 for every run against evaluate's 256)."""
    from flawline.errors import ConfigError
    from flawline.evaluate.pipeline import EvaluateOptions
    from flawline.models.base import detector_class
    from flawline.train.spec import TrainSpec

    padim = TrainSpec(datasets=["d"], setting="unsupervised", method="padim")
    assert padim.image_size == EvaluateOptions().image_size == 256
    default = TrainSpec(datasets=["d"], setting="unsupervised")
    assert default.image_size == detector_class("patchcore").Config().image_size
    assert TrainSpec(datasets=["d"], setting="supervised").image_size == 224  # the classifier's own
    assert TrainSpec(datasets=["d"], setting="supervised", image_size=96).image_size == 96
    stored = TrainSpec(datasets=["d"], setting="fewshot").as_dict()
    assert stored["image_size"] == 224 and TrainSpec.from_dict(stored).image_size == 224
    with pytest.raises(ConfigError, match="trains classifier, segmenter; not 'padim'"):
        TrainSpec(datasets=["d"], setting="supervised", method="padim")
    from flawline.cli.train import _spec_line  # what `runs show` prints of it

    assert _spec_line(padim.as_dict()) == ("spec: 256 px, batch 16, 1 worker(s) × 1 CPU, epochs: the setting's, "
                                           "seed 0, efficientnet_lite0")
