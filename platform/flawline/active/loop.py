"""The active-learning loop: score → select → push → wait → pull → retrain → evaluate → promote.

Each round is a row in ``al_rounds`` with its queue in ``al_queue_items``; its metrics record the
labels gained, what retraining decided and why (new labels since the last training run against
the threshold N, and the run it started), and the test metric of the model in production after
the round. Training goes through a ``Trainer`` (a Ray job by default; in process for tests and
benchmarks); promoting a better model is all Serve needs, since it resolves a model's production
version per request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select

from flawline.active.scoring import pre_annotations, save_scores, score_local
from flawline.active.strategies import PoolScores, make_strategy
from flawline.catalog import (
    ActiveLearningRound,
    Annotation,
    AnnotationSource,
    Catalog,
    Image,
    LabelTask,
    LabelTaskStatus,
    ModelVersion,
    QueueItem,
    QueueStatus,
)
from flawline.catalog.model_versions import load_version, production_version, promote
from flawline.catalog.queries import get_dataset
from flawline.data.records import ImageRecord, image_records
from flawline.errors import ConfigError, InvalidInput
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.convert import prediction_version
from flawline.labelstudio.projects import ensure_project
from flawline.labelstudio.pull import pull_annotations
from flawline.labelstudio.push import push_tasks
from flawline.storage import ObjectStore
from flawline.train.spec import TrainSpec

Trainer = Callable[[TrainSpec], dict[str, Any]]  # → the run's metrics, with "model" (name:version) and "run_id"
Scorer = Callable[[ModelVersion, Any, list[dict[str, Any]]], PoolScores]  # (model row, its detector, rows) → scores


def local_scorer(store: ObjectStore) -> Scorer:
    """Score in this process (tests, benchmarks)."""
    return lambda model, detector, rows: score_local(detector, store, rows, detector.config.image_size)


def ray_scorer(settings: Any, store: ObjectStore, workers: int = 2, cpus_per_worker: float = 1.0,
               gpus_per_worker: float = 0.0) -> Scorer:
    """Score as a Ray job: Ray Data over S3 with ``workers`` model actors."""
    from flawline.active.score_job import submit_scoring

    def score(model: ModelVersion, detector: Any, rows: list[ImageRecord]) -> PoolScores:
        threshold = float(detector.threshold.value) if detector.threshold is not None else None
        return submit_scoring(settings, store, model, rows, rows[0].dataset, detector.config.image_size, threshold,
                              workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)

    return score


@dataclass
class LoopSpec:
    dataset: str
    budget: int = 10  # images sent to annotators per round
    rounds: int = 3
    retrain_after: int = 10  # retrain once this many new labels arrived since the last training run
    strategy: str = "hybrid"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"  # the Label Studio labelling task
    metric: str = "image_auroc"  # compared on the test split to decide promotion
    # Mixed supervision: round 0 fits the label-free detector, every retrain refines it with the answers.
    train: dict[str, Any] = field(default_factory=lambda: {"setting": "mixed", "method": "mixed"})
    seed: int = 0
    wait_timeout_s: float = 24 * 3600.0  # how long a round waits for people to finish its tasks
    poll_s: float = 10.0

    def __post_init__(self) -> None:
        if self.budget < 1 or self.rounds < 1 or self.retrain_after < 1:
            raise ConfigError("budget, rounds and retrain-after must each be at least 1")
        make_strategy(self.strategy, **self.strategy_options)  # unknown names fail before anything runs

    def train_spec(self) -> TrainSpec:
        return TrainSpec(datasets=[self.dataset], seed=self.seed, **self.train)

    def model_name(self) -> str:
        spec = self.train_spec()
        from flawline.train.settings import get_setting

        return get_setting(spec.setting).model_name(spec)


def human_label_count(catalog: Catalog, dataset: str) -> int:
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        return int(s.scalar(select(func.count(func.distinct(Annotation.image_id))).join(Image).where(
            Image.dataset_id == ds.id, Annotation.source == AnnotationSource.human,
            Annotation.label.is_not(None))) or 0)


def pool_rows(catalog: Catalog, dataset: str, project_id: int) -> tuple[list[dict], list[dict]]:
    """(pool, labelled): train-split images without a label and not waiting in Label Studio
    (skipped ones are back in the pool), and the labelled ones."""
    with catalog.session() as s:
        waiting = set(s.scalars(select(LabelTask.image_id).where(
            LabelTask.project_id == project_id,
            LabelTask.status.in_([LabelTaskStatus.pushed, LabelTaskStatus.labelled]))))
    rows = [r for r in image_records(catalog, dataset) if r.split == "train"]
    return ([r for r in rows if r.defect is None and r.image_id not in waiting],
            [r for r in rows if r.defect is not None])


def _production(catalog: Catalog, name: str) -> ModelVersion | None:
    with catalog.session() as s:
        row = production_version(s, name)
        if row is not None:
            s.expunge(row)
        return row


class ActiveLoop:
    """Runs rounds for one dataset; ``annotate`` (the simulated annotator in benchmarks and
    tests) answers pushed tasks, otherwise the round waits for people until ``wait_timeout_s``."""

    def __init__(self, catalog: Catalog, store: ObjectStore, client: LabelStudioClient, spec: LoopSpec,
                 trainer: Trainer, annotate: Callable[[Any], int] | None = None,
                 log: Callable[[str], None] = print, scorer: Scorer | None = None) -> None:
        self.catalog, self.store, self.client, self.spec = catalog, store, client, spec
        self.trainer, self.annotate, self.log = trainer, annotate, log
        self.scorer = scorer or local_scorer(store)
        self.strategy = make_strategy(spec.strategy, **spec.strategy_options)

    # -- steps ----------------------------------------------------------------------------------
    def ensure_model(self) -> ModelVersion:
        """The production model to score with; trains and promotes the first one if there is none."""
        name = self.spec.model_name()
        row = _production(self.catalog, name)
        if row is None:
            self.log(f"no production model {name!r}: training the first one on the labels there are "
                     f"({human_label_count(self.catalog, self.spec.dataset)} from people)")
            metrics = self.trainer(self.spec.train_spec())
            with self.catalog.session() as s:
                promote(s, metrics["model"])
            row = _production(self.catalog, name)
            metric = (row.metrics or {}).get(self.spec.metric)
            self.log(f"starting model {row.name}:{row.version}: {self.spec.metric} "
                     f"{'n/a' if metric is None else f'{metric:.4f}'}")
        return row

    def score(self, model: ModelVersion, rows: list[dict]) -> tuple[Any, PoolScores]:
        detector = load_version(self.catalog, self.store, model)  # with the catalog's threshold
        return detector, self.scorer(model, detector, rows)

    def wait_and_pull(self, project: Any, task_ids: list[int]) -> dict[str, Any]:
        if self.annotate is not None:
            self.annotate(project)
        deadline = time.monotonic() + self.spec.wait_timeout_s
        while True:
            report = pull_annotations(self.catalog, self.store, self.client, project)
            with self.catalog.session() as s:
                open_ = s.scalar(select(func.count()).select_from(LabelTask).where(
                    LabelTask.project_id == project.id, LabelTask.ls_task_id.in_(task_ids),
                    LabelTask.status == LabelTaskStatus.pushed)) or 0
            if open_ == 0 or time.monotonic() >= deadline:
                return {**report.as_dict(), "still_open": int(open_)}
            self.log(f"waiting for {open_} task(s) in Label Studio ({self.client.url}/projects/{project.ls_project_id})")
            time.sleep(self.spec.poll_s)

    def run_round(self) -> dict[str, Any]:
        spec = self.spec
        project = ensure_project(self.catalog, self.client, spec.dataset, spec.task)
        model = self.ensure_model()
        ref = f"{model.name}:{model.version}"
        pool_r, labelled_r = pool_rows(self.catalog, spec.dataset, project.id)
        if not pool_r:
            raise InvalidInput(f"{spec.dataset}: the unlabelled pool is empty; nothing left to query")
        detector, pool = self.score(model, pool_r + labelled_r)
        n = len(pool_r)
        unlabelled = PoolScores(image_ids=pool.image_ids[:n], scores=pool.scores[:n], embeddings=pool.embeddings[:n],
                                threshold=pool.threshold)
        scores_key = save_scores(self.store, pool, ref, spec.dataset)
        chosen = self.strategy.select(unlabelled, min(spec.budget, n),
                                      labelled_embeddings=pool.embeddings[n:] if len(labelled_r) else None,
                                      seed=spec.seed + self._round_index())
        by_id = {r.image_id: r for r in pool_r}
        picked = [by_id[int(i)] for i in chosen.image_ids]
        preds = pre_annotations(detector, self.store, picked, prediction_version(ref, detector.threshold))
        pushed = push_tasks(self.catalog, self.store, self.client, project, [r.image_id for r in picked], preds)
        with self.catalog.session() as s:
            ds = get_dataset(s, spec.dataset)
            rnd = ActiveLearningRound(dataset_id=ds.id, round_index=self._round_index(), strategy=spec.strategy,
                                      budget=spec.budget, model_version_id=model.id, status="waiting",
                                      metrics={"scores_key": scores_key, "pool": n, "model": ref, "model_at_start": ref,
                                               "start_metric": (model.metrics or {}).get(spec.metric),
                                               "labels_start": human_label_count(self.catalog, spec.dataset)})
            s.add(rnd)
            s.flush()
            for rank, (image_id, priority) in enumerate(zip(chosen.image_ids, chosen.priority)):
                s.add(QueueItem(round_id=rnd.id, image_id=int(image_id), rank=rank, score=float(priority),
                                status=QueueStatus.pushed, ls_task_id=pushed.task_ids[int(image_id)]))
            round_id, index = rnd.id, rnd.round_index
        self.log(f"round {index}: {len(picked)} images sent to Label Studio ({spec.strategy}, pool {n})")
        pulled = self.wait_and_pull(project, list(pushed.task_ids.values()))
        self._sync_queue(round_id, project.id)
        result = self._maybe_retrain(round_id, ref)
        result.update(round=index, pulled=pulled)
        retrained = (f"retrained (run {result.get('run_id', '?')}), "
                     f"{'promoted' if result['promoted'] else 'not promoted: no better than production'}"
                     if result["retrained"] else "no retraining yet")
        metric = result.get("metric")
        self.log(f"round {index}: {result['labels_total']} labels ({result['labels_new']} new since the last "
                 f"training; retrain at {spec.retrain_after}): {retrained}; model {result.get('model')} "
                 f"{spec.metric} {'n/a' if metric is None else f'{metric:.4f}'}")
        return result

    def run(self) -> list[dict[str, Any]]:
        return [self.run_round() for _ in range(self.spec.rounds)]

    # -- bookkeeping -----------------------------------------------------------------------------
    def _round_index(self) -> int:
        with self.catalog.session() as s:
            ds = get_dataset(s, self.spec.dataset)
            last = s.scalar(select(func.max(ActiveLearningRound.round_index)).where(
                ActiveLearningRound.dataset_id == ds.id))
            return 0 if last is None else int(last) + 1

    def _sync_queue(self, round_id: int, project_id: int) -> None:
        with self.catalog.session() as s:
            status = dict(s.execute(select(LabelTask.ls_task_id, LabelTask.status)
                                    .where(LabelTask.project_id == project_id)).all())
            for item in s.scalars(select(QueueItem).where(QueueItem.round_id == round_id)):
                st = status.get(item.ls_task_id)
                if st is LabelTaskStatus.labelled:
                    item.status = QueueStatus.labelled
                elif st in (LabelTaskStatus.skipped, LabelTaskStatus.orphaned):
                    item.status = QueueStatus.skipped

    def _labels_at_last_training(self) -> int:
        with self.catalog.session() as s:
            ds = get_dataset(s, self.spec.dataset)
            rows = s.scalars(select(ActiveLearningRound.metrics).where(ActiveLearningRound.dataset_id == ds.id,
                                                                       ActiveLearningRound.status == "closed")
                             .order_by(ActiveLearningRound.round_index.desc()))
            for m in rows:
                if m and "labels_at_training" in m:
                    return int(m["labels_at_training"])
        return 0

    def _maybe_retrain(self, round_id: int, ref: str) -> dict[str, Any]:
        spec = self.spec
        total = human_label_count(self.catalog, spec.dataset)
        at_last = self._labels_at_last_training()
        new = total - at_last
        decision: dict[str, Any] = {"labels_total": total, "labels_new": new, "retrain_after": spec.retrain_after,
                                    "labels_at_training": at_last, "retrained": False, "promoted": False}
        run_id = None
        if new >= spec.retrain_after:
            metrics = self.trainer(spec.train_spec())
            run_id = metrics.get("run_id")
            decision.update(retrained=True, labels_at_training=total, candidate=metrics["model"], run_id=run_id,
                            candidate_metric=metrics.get(spec.metric))
            current = _production(self.catalog, spec.model_name())
            old = (current.metrics or {}).get(spec.metric) if current else None
            better = old is None or (metrics.get(spec.metric) is not None and metrics[spec.metric] > old)
            if better:
                with self.catalog.session() as s:
                    promote(s, metrics["model"])
            decision.update(promoted=bool(better), previous=ref, previous_metric=old)
        prod = _production(self.catalog, spec.model_name())
        decision.update(model=f"{prod.name}:{prod.version}" if prod else None,
                        metric=(prod.metrics or {}).get(spec.metric) if prod else None, metric_name=spec.metric)
        with self.catalog.session() as s:
            rnd = s.get(ActiveLearningRound, round_id)
            rnd.metrics = {**(rnd.metrics or {}), **decision}
            rnd.run_id = run_id
            rnd.status = "closed"
            rnd.closed_at = datetime.now(timezone.utc)
        return dict(decision)


def loop_status(catalog: Catalog, dataset: str) -> dict[str, Any]:
    """Rounds, queue and retraining state of a dataset's loop (what `flawline loop status` shows)."""
    with catalog.session() as s:
        ds = get_dataset(s, dataset)
        rounds = s.scalars(select(ActiveLearningRound).where(ActiveLearningRound.dataset_id == ds.id)
                           .order_by(ActiveLearningRound.round_index)).all()
        out = []
        for r in rounds:
            counts = dict(s.execute(select(QueueItem.status, func.count()).where(QueueItem.round_id == r.id)
                                    .group_by(QueueItem.status)).all())
            m = r.metrics or {}
            out.append({"round": r.round_index, "strategy": r.strategy, "budget": r.budget, "status": r.status,
                        "queue": {k.value: v for k, v in counts.items()}, "model": m.get("model"),
                        "labels_total": m.get("labels_total"), "labels_new": m.get("labels_new"),
                        "retrain_after": m.get("retrain_after"), "retrained": m.get("retrained"),
                        "run_id": r.run_id, "promoted": m.get("promoted"), "metric_name": m.get("metric_name"),
                        "metric": m.get("metric"), "start_model": m.get("model_at_start", m.get("model")),
                        "start_metric": m.get("start_metric"), "labels_start": m.get("labels_start")})
    return {"dataset": dataset, "labels": human_label_count(catalog, dataset), "rounds": out}


__all__ = ["ActiveLoop", "LoopSpec", "Scorer", "Trainer", "local_scorer", "ray_scorer", "human_label_count", "loop_status", "pool_rows"]
