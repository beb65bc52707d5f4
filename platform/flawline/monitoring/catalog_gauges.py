"""The catalog as gauges: label queue depth, labels gained, training progress, runs, production
metrics.

Labelling and pulling happen outside Ray (the CLI, the webhook listener, a person in Label
Studio), so their state is read where it is kept, the catalog, and published by one long-running
Ray job (``jobs/monitor.py``, started by ``flawline monitor start``). :func:`catalog_samples` is a
plain query; :func:`publish` turns its samples into Ray gauges.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select

from flawline.catalog import (
    ActiveLearningRound,
    Annotation,
    Catalog,
    Dataset,
    Image,
    LabelProject,
    LabelTask,
    LabelTaskStatus,
    ModelStage,
    ModelVersion,
    RunStatus,
    TrainingRun,
)
from flawline.monitoring.metrics import METRICS, metric

RECENT_RUNS = 20  # finished runs whose last loss stays published (bounds the series count)


@dataclass(frozen=True)
class Sample:
    name: str
    tags: dict[str, str]
    value: float


def catalog_samples(catalog: Catalog) -> list[Sample]:
    """One reading of every catalog gauge. Known tag combinations are always present (zero when
    empty) so a queue that drains shows 0 rather than its last non-zero value."""
    out: list[Sample] = []
    with catalog.session() as s:
        datasets = dict(s.execute(select(Dataset.id, Dataset.name)).all())
        queue: dict[tuple[str, str], int] = {}
        for ds_id, status, n in s.execute(
                select(LabelProject.dataset_id, LabelTask.status, func.count())
                .join(LabelTask, LabelTask.project_id == LabelProject.id)
                .group_by(LabelProject.dataset_id, LabelTask.status)):
            key = (datasets.get(ds_id, str(ds_id)), status.value)
            queue[key] = queue.get(key, 0) + n
        with_projects = {datasets.get(d, str(d)) for d in s.scalars(select(LabelProject.dataset_id).distinct())}
        for name in sorted(with_projects):
            for status in LabelTaskStatus:
                out.append(Sample("flawline_label_queue", {"dataset": name, "status": status.value},
                                  queue.get((name, status.value), 0)))
            out.append(Sample("flawline_labels_pulled", {"dataset": name},
                              queue.get((name, LabelTaskStatus.labelled.value), 0)))
        for ds_id, source, n in s.execute(
                select(Image.dataset_id, Annotation.source, func.count())
                .join(Annotation, Annotation.image_id == Image.id)
                .group_by(Image.dataset_id, Annotation.source)):
            out.append(Sample("flawline_labels", {"dataset": datasets.get(ds_id, str(ds_id)),
                                                  "source": source.value}, n))
        recent = s.scalars(select(TrainingRun).where(TrainingRun.status == RunStatus.running)).all() + s.scalars(
            select(TrainingRun).where(TrainingRun.status != RunStatus.running).order_by(TrainingRun.id.desc())
            .limit(RECENT_RUNS)).all()
        for run in recent:
            progress = (run.metrics or {}).get("progress") or {}
            tags = {"run": str(run.id), "setting": run.setting, "method": run.method}
            for name, key in (("flawline_train_loss", "loss"), ("flawline_train_epoch", "epoch")):
                if isinstance(progress.get(key), (int, float)):
                    out.append(Sample(name, tags, float(progress[key])))
        runs = dict(s.execute(select(TrainingRun.status, func.count()).group_by(TrainingRun.status)).all())
        for status in RunStatus:
            out.append(Sample("flawline_runs", {"status": status.value}, runs.get(status, 0)))
        for mv in s.scalars(select(ModelVersion).where(ModelVersion.stage == ModelStage.production)):
            for key, value in (mv.metrics or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.append(Sample("flawline_model_metric", {"model": mv.name, "version": str(mv.version),
                                                                "metric": key}, float(value)))
        for ds_id, n in s.execute(select(ActiveLearningRound.dataset_id, func.count())
                                  .group_by(ActiveLearningRound.dataset_id)):
            out.append(Sample("flawline_loop_rounds", {"dataset": datasets.get(ds_id, str(ds_id))}, n))
    return out


def publish(samples: list[Sample]) -> None:
    """Set the Ray gauges (Ray must be initialised: this runs in the monitor job's driver)."""
    for sample in samples:
        assert METRICS[sample.name].kind == "gauge", sample.name
        metric(sample.name).set(float(sample.value), tags=sample.tags)


def run_monitor(catalog: Catalog, interval_s: float = 15.0, rounds: int | None = None,
                on_error: Callable[[Exception], None] = lambda err: None) -> int:
    """Publish the catalog gauges every ``interval_s`` (forever, or ``rounds`` times); a failed
    reading (catalog restarting) is reported and retried next time, never fatal."""
    done = 0
    while rounds is None or done < rounds:
        try:
            publish(catalog_samples(catalog))
        except Exception as err:  # noqa: BLE001 - a monitor outlives a database restart
            on_error(err)
        done += 1
        if rounds is None or done < rounds:
            time.sleep(interval_s)
    return done
