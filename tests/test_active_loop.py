"""The active-learning loop on a real Label Studio, the local S3 server and a SQLite catalog: pool
scoring with stored scores, selection, push with pre-annotations, the simulated annotator, pull,
retraining when enough labels arrived, promotion, and the rounds as `flawline loop status` shows them."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from conftest import crack_tiles
from flawline.active.loop import ActiveLoop, LoopSpec, human_label_count, loop_status, pool_rows
from flawline.active.scoring import load_scores
from flawline.active.simulation import hide_labels, reveal_labels
from flawline.active.trainers import in_process_trainer
from flawline.catalog import (
    ActiveLearningRound,
    AnnotationSource,
    LabelTask,
    QueueItem,
    QueueStatus,
    TrainingRun,
)
from flawline.data.ingest import import_dataset
from flawline.data.records import image_records
from flawline.data.split import SplitSpec, assign_splits
from flawline.errors import ConfigError, InvalidInput
from flawline.labelstudio.annotator import SimulatedAnnotator, truth_from_catalog

TRAIN = {"setting": "supervised", "method": "classifier", "image_size": 64, "epochs": 1, "batch_size": 8}


@pytest.fixture
def cracks(catalog, store, tmp_path):
    import_dataset(catalog, store, crack_tiles(tmp_path / "cracks", normal=20, defect=14, unlabelled=0),
                   dataset="cracks", workers=4)
    assign_splits(catalog, "cracks", SplitSpec(train=0.7, val=0.0, test=0.3, seed=0))
    return "cracks"


def test_hide_labels_keeps_a_stratified_share_and_reveals(catalog, cracks):
    before = [r for r in image_records(catalog, cracks) if r.split == "train"]
    counts = hide_labels(catalog, cracks, keep=0.2)
    assert counts["kept"] + counts["hidden"] == len(before) and counts["kept"] >= 2
    after = [r for r in image_records(catalog, cracks) if r.split == "train"]
    labelled = [r for r in after if r.defect is not None]
    assert len(labelled) == counts["kept"] and {r.defect for r in labelled} == {True, False}
    assert hide_labels(catalog, cracks, keep=0.2)["hidden"] == 0  # nothing more to hide
    assert len(truth_from_catalog(catalog, cracks)) == len(image_records(catalog, cracks))
    assert reveal_labels(catalog, cracks) == counts["hidden"]
    assert len([r for r in image_records(catalog, cracks) if r.defect is not None]) == len(image_records(catalog, cracks))


def test_loop_rounds_push_pull_retrain_and_promote(catalog, store, ls_client, cracks):
    hide_labels(catalog, cracks, keep=0.25)
    start = human_label_count(catalog, cracks)
    assert start == 0  # kept labels are imported ones; the loop counts what people add
    truth = truth_from_catalog(catalog, cracks)
    spec = LoopSpec(dataset=cracks, budget=4, rounds=2, retrain_after=6, strategy="hybrid", train=TRAIN)
    annotator = SimulatedAnnotator(ls_client, store, truth)
    loop = ActiveLoop(catalog, store, ls_client, spec, in_process_trainer(catalog, store), annotate=annotator.answer,
                      log=lambda line: None)
    assert len(pool_rows(catalog, cracks, -1)[0]) > 8
    first, second = loop.run()

    # round 0: the first model was trained on the kept labels; 4 labels in, below the threshold of 6
    assert (first["round"], first["labels_total"], first["labels_new"], first["retrained"]) == (0, 4, 4, False)
    # round 1: 8 labels since the last training >= 6: retrained, and the catalog says by which run
    assert (second["labels_total"], second["labels_new"], second["retrained"]) == (8, 8, True)
    assert second["model"] is not None and second["metric_name"] == "image_auroc"
    with catalog.session() as s:
        rounds = s.scalars(select(ActiveLearningRound).order_by(ActiveLearningRound.round_index)).all()
        assert [r.status for r in rounds] == ["closed", "closed"]
        assert rounds[1].run_id is not None and s.get(TrainingRun, rounds[1].run_id).status.value == "succeeded"
        items = s.scalars(select(QueueItem)).all()
        assert len(items) == 8 and {i.status for i in items} == {QueueStatus.labelled}
        assert len({i.image_id for i in items}) == 8  # never the same image twice
        assert s.scalar(select(LabelTask).limit(1)) is not None
        scores_key = rounds[0].metrics["scores_key"]
    stored = load_scores(store, scores_key)
    train_images = [r for r in image_records(catalog, cracks) if r.split == "train"]
    assert len(stored.image_ids) == len(train_images)  # the pool, and the labelled images as k-center's centres
    assert stored.embeddings is not None and np.isfinite(stored.embeddings).all()
    # the labels people gave are the truth the annotator held (source human; oracle rows untouched)
    rows = {r.image_id: r for r in image_records(catalog, cracks)}
    with catalog.session() as s:
        from flawline.catalog import Annotation

        human = s.scalars(select(Annotation).where(Annotation.source == AnnotationSource.human)).all()
        assert len(human) == 8
        for a in human:
            assert rows[a.image_id].defect is truth[a.image_id].is_defect
    # every task went out with the scoring model's pre-annotation
    from flawline.labelstudio.projects import find_project

    project = find_project(catalog, ls_client, cracks, "classification")
    tasks = list(ls_client.iter_tasks(project.ls_project_id))
    assert len(tasks) == 8 and all(t.total_predictions == 1 for t in tasks)
    versions = {(p if isinstance(p, dict) else p.__dict__)["model_version"] for t in tasks for p in t.predictions}
    assert versions and all(v.startswith(f"{spec.model_name()}:") for v in versions)
    status = loop_status(catalog, cracks)
    assert status["labels"] == 8 and [r["labels_new"] for r in status["rounds"]] == [4, 8]
    assert status["rounds"][1]["run_id"] is not None and status["rounds"][0]["queue"] == {"labelled": 4}


def test_bad_loop_configs_fail_before_anything_runs(catalog, store, ls_client, cracks):
    with pytest.raises(InvalidInput, match="unknown query strategy|known"):
        LoopSpec(dataset=cracks, strategy="psychic")
    with pytest.raises(ConfigError, match="at least 1"):
        LoopSpec(dataset=cracks, budget=0)
    reveal_labels(catalog, cracks)  # every train image labelled: the pool is empty
    loop = ActiveLoop(catalog, store, ls_client, LoopSpec(dataset=cracks, train=TRAIN),
                      in_process_trainer(catalog, store), log=lambda line: None)
    with pytest.raises(InvalidInput, match="unlabelled pool is empty"):
        loop.run_round()


def test_loop_starts_from_the_label_free_model_and_promotes_only_a_better_one(catalog, store, ls_client, cracks):
    """No labels at the start: round 0's model is the label-free detector (mixed supervision with
    nothing labelled: the base fitted on every train image, calibrated on normals alone); each
    retrain refines it with the answers, and is promoted only when its test metric is higher."""
    assert hide_labels(catalog, cracks, keep=0.0)["kept"] == 0
    truth = truth_from_catalog(catalog, cracks)
    spec = LoopSpec(dataset=cracks, budget=4, rounds=2, retrain_after=4, strategy="hybrid",
                    train={"setting": "mixed", "method": "mixed", "image_size": 64, "batch_size": 8})
    loop = ActiveLoop(catalog, store, ls_client, spec, in_process_trainer(catalog, store),
                      annotate=SimulatedAnnotator(ls_client, store, truth).answer, log=lambda line: None)
    first, second = loop.run()
    status = loop_status(catalog, cracks)
    start = status["rounds"][0]
    assert start["labels_start"] == 0 and start["start_metric"] is not None  # the label-free figure
    with catalog.session() as s:
        first_run = s.scalars(select(TrainingRun).order_by(TrainingRun.id)).first()
        assert first_run.metrics["threshold"]["method"] == "quantile"  # no labels: normals alone
    for r in (first, second):
        assert r["retrained"] and r["labels_new"] == 4
        better = r["candidate_metric"] > (r["previous_metric"] if r["previous_metric"] is not None else -1)
        assert r["promoted"] == better
    assert second["metric"] >= start["start_metric"]
