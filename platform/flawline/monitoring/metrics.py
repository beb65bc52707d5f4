"""Every metric flawline exports, in one place.

Metrics are ``ray.util.metrics`` objects: each Ray node's metrics agent serves them on its
Prometheus endpoint (``--metrics-export-port``) with Ray's ``ray_`` prefix, which is what the Ray
dashboard's Prometheus/Grafana integration scrapes. Code records through :func:`metric` by name,
so a name, its tags and its buckets are defined once; the Grafana dashboard in
``infra/monitoring/grafana/dashboards/`` is checked against :func:`prometheus_names`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

LATENCY_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SCORE_RATIO = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)
SCORE = (0.01, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 1000)
BATCH = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricSpec] = {m.name: m for m in [
    # Serving (recorded by the Serve replicas).
    MetricSpec("flawline_predictions", "counter", "Images predicted by the serving app, by verdict.",
               ("model", "version", "verdict")),
    MetricSpec("flawline_request_errors", "counter", "Prediction requests answered with an error, by HTTP status.",
               ("model", "status")),
    MetricSpec("flawline_predict_latency_ms", "histogram", "Prediction request latency in the gateway (ms).",
               ("model",), LATENCY_MS),
    MetricSpec("flawline_score", "histogram", "Image anomaly scores of served predictions.", ("model",), SCORE),
    MetricSpec("flawline_score_to_threshold", "histogram", "Served image score divided by the model's threshold.",
               ("model",), SCORE_RATIO),
    MetricSpec("flawline_batch_size", "histogram", "Images per forward pass in the model server.", (), BATCH),
    # Batch scoring of the unlabelled pool (recorded once per scoring job, see add_to_counter).
    MetricSpec("flawline_images_scored", "counter", "Pool images scored by batch-scoring jobs.", ("model",)),
    # The catalog, published by the monitor job (`flawline monitor start`) every few seconds.
    # Training progress is read there too: rank 0 records each epoch in the run's row, and a gauge
    # set in a Ray Train worker would vanish with the worker when the run ends.
    MetricSpec("flawline_train_loss", "gauge", "Mean training loss of the run's last finished epoch (running "
               "and recent runs).", ("run", "setting", "method")),
    MetricSpec("flawline_train_epoch", "gauge", "Epochs the run has finished.", ("run", "setting", "method")),
    MetricSpec("flawline_label_queue", "gauge", "Images sent to Label Studio, by task status "
               "(pushed = waiting for a person).", ("dataset", "status")),
    MetricSpec("flawline_labels", "gauge", "Annotations in the catalog, by source (human ones were pulled from "
               "Label Studio or imported).", ("dataset", "source")),
    MetricSpec("flawline_labels_pulled", "gauge", "Label Studio tasks whose annotation was pulled into the catalog.",
               ("dataset",)),
    MetricSpec("flawline_runs", "gauge", "Training runs, by status.", ("status",)),
    MetricSpec("flawline_model_metric", "gauge", "Test-split metrics of production model versions.",
               ("model", "version", "metric")),
    MetricSpec("flawline_loop_rounds", "gauge", "Active-learning rounds recorded per dataset.", ("dataset",)),
]}

_objects: dict[str, Any] = {}
_lock = threading.Lock()


def metric(name: str) -> Any:
    """The process's Ray metric object for ``name`` (created on first use; Ray must be initialised,
    as it is in every Ray worker, actor, replica and job driver)."""
    obj = _objects.get(name)
    if obj is not None:
        return obj
    spec = METRICS[name]
    from ray.util import metrics as ray_metrics

    with _lock:
        if name not in _objects:
            kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tag_keys}
            if spec.kind == "counter":
                _objects[name] = ray_metrics.Counter(spec.name, **kwargs)
            elif spec.kind == "gauge":
                _objects[name] = ray_metrics.Gauge(spec.name, **kwargs)
            else:
                _objects[name] = ray_metrics.Histogram(spec.name, boundaries=list(spec.boundaries), **kwargs)
    return _objects[name]


class _CounterHolder:
    """A detached Ray actor (no CPU) holding counters for processes that end soon after counting."""

    def inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        metric(name).inc(value, tags=tags)


COUNTER_HOLDER = "flawline-counters"


def add_to_counter(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Add ``value`` to counter ``name`` from a short-lived process (a job driver, a Ray Data actor).

    Ray's metrics agent stops exporting a process's series once the process has exited, so a
    counter recorded in a scoring job's actors could vanish before Prometheus scrapes it. This
    adds the count in one detached actor, ``flawline-counters`` in namespace ``flawline`` (created
    on first use, 0 CPUs), which lives as long as the cluster. Ray must be initialised. Blocks
    until the count is recorded."""
    if METRICS[name].kind != "counter":
        raise ValueError(f"{name} is a {METRICS[name].kind}, not a counter")
    import ray

    holder = ray.remote(_CounterHolder).options(name=COUNTER_HOLDER, namespace="flawline", lifetime="detached",
                                                get_if_exists=True, num_cpus=0).remote()
    ray.get(holder.inc.remote(name, float(value), dict(tags or {})))


def prometheus_names(spec: MetricSpec) -> list[str]:
    """The series names Prometheus sees for ``spec`` (Ray prefixes ``ray_``; counters get ``_total``)."""
    base = f"ray_{spec.name}"
    if spec.kind == "counter":
        return [f"{base}_total"]
    if spec.kind == "histogram":
        return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
    return [base]
