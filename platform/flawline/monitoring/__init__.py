"""Monitoring: the Ray metrics flawline exports (one registry), the catalog gauges the monitor job
publishes, and the cluster overview behind ``flawline status``."""

from flawline.monitoring.metrics import METRICS, MetricSpec, metric, prometheus_names

__all__ = ["METRICS", "MetricSpec", "metric", "prometheus_names"]
