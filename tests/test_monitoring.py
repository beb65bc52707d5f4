"""Monitoring without a cluster: the catalog gauges, the metric registry against the Grafana
dashboard, `flawline monitor metrics`, and `flawline status` when Ray is not running. The metrics
on real nodes' Prometheus endpoints and the Ray parts of `flawline status` are tested on the
two-node cluster in test_ray_jobs.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from flawline.catalog import (
    Annotation,
    AnnotationSource,
    Catalog,
    Dataset,
    Image,
    Label,
    LabelProject,
    LabelTask,
    LabelTaskStatus,
    ModelStage,
    ModelVersion,
    RunStatus,
    TrainingRun,
)
from flawline.cli.main import app
from flawline.monitoring.catalog_gauges import catalog_samples, run_monitor
from flawline.monitoring.metrics import METRICS, prometheus_names
from flawline.monitoring.overview import job_kind
from flawline.train.submit import current_submission_id

DASHBOARD = Path(__file__).resolve().parents[1] / "infra" / "monitoring" / "grafana" / "dashboards" / "flawline.json"


def _fill(catalog: Catalog) -> None:
    with catalog.session() as s:
        ds = Dataset(name="tiles")
        s.add(ds)
        s.flush()
        images = [Image(dataset_id=ds.id, object_key=f"k{i}", content_hash=f"{i:064d}", byte_size=1, width=8,
                        height=8, channels=1, format="PNG") for i in range(5)]
        s.add_all(images)
        s.flush()
        s.add_all([Annotation(image_id=images[0].id, label=Label.defect, source=AnnotationSource.human),
                   Annotation(image_id=images[1].id, label=Label.normal, source=AnnotationSource.human),
                   Annotation(image_id=images[2].id, label=Label.normal, source=AnnotationSource.pseudo)])
        project = LabelProject(dataset_id=ds.id, task="classification", ls_url="http://ls", ls_project_id=7,
                               title="tiles")
        s.add(project)
        s.flush()
        for i, status in enumerate([LabelTaskStatus.labelled, LabelTaskStatus.labelled, LabelTaskStatus.pushed]):
            s.add(LabelTask(project_id=project.id, image_id=images[i].id, ls_task_id=100 + i, status=status))
        s.add_all([TrainingRun(dataset_id=ds.id, method="classifier", setting="supervised", status=RunStatus.succeeded,
                               metrics={"progress": {"epoch": 2, "epochs": 2, "loss": 0.25}}),
                   TrainingRun(dataset_id=ds.id, method="padim", setting="unsupervised", status=RunStatus.failed)])
        s.add(ModelVersion(name="tiles-padim", version=2, artifact_uri="s3://b/models/tiles-padim/x/model.pt",
                           method="padim", stage=ModelStage.production,
                           metrics={"image_auroc": 0.91, "note": "text is left out", "ok": True}))


def _by_name(samples) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for sample in samples:
        out.setdefault(sample.name, {})[tuple(sorted(sample.tags.items()))] = sample.value
    return out


def test_catalog_gauges_read_queues_labels_runs_and_production_metrics(catalog):
    assert catalog_samples(catalog) == [s for s in catalog_samples(catalog) if s.name == "flawline_runs"]
    _fill(catalog)
    got = _by_name(catalog_samples(catalog))
    queue = {dict(k)["status"]: v for k, v in got["flawline_label_queue"].items()}
    assert queue == {"pushed": 1, "labelled": 2, "skipped": 0, "orphaned": 0}  # drained states stay, at 0
    assert got["flawline_labels_pulled"] == {(("dataset", "tiles"),): 2}
    assert got["flawline_labels"] == {(("dataset", "tiles"), ("source", "human")): 2,
                                      (("dataset", "tiles"), ("source", "pseudo")): 1}
    runs = {dict(k)["status"]: v for k, v in got["flawline_runs"].items()}
    assert runs == {"pending": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    train = (("method", "classifier"), ("run", "1"), ("setting", "supervised"))
    assert got["flawline_train_loss"] == {train: 0.25} and got["flawline_train_epoch"] == {train: 2}
    assert got["flawline_model_metric"] == {
        (("metric", "image_auroc"), ("model", "tiles-padim"), ("version", "2")): 0.91}
    assert all(METRICS[name].kind == "gauge" and set(dict(next(iter(v))).keys()) == set(METRICS[name].tag_keys)
               for name, v in got.items())


def test_monitor_survives_a_catalog_that_goes_away(catalog, catalog_url):
    errors = []
    catalog.engine.dispose()
    Path(catalog_url.removeprefix("sqlite:///")).unlink()  # the next connection finds no tables
    assert run_monitor(catalog, interval_s=0.01, rounds=2, on_error=errors.append) == 2
    assert len(errors) == 2


def test_dashboard_queries_only_exported_metrics_and_shows_every_one():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bray_flawline_\w+", e)}
    exported = {n for spec in METRICS.values() for n in prometheus_names(spec)}
    assert used <= exported, f"dashboard queries unknown series: {sorted(used - exported)}"
    shown = {spec.name for spec in METRICS.values() if set(prometheus_names(spec)) & used}
    assert shown == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - shown)}"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_monitor_metrics_lists_the_registry():
    result = CliRunner().invoke(app, ["monitor", "metrics", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} >= {"ray_flawline_images_scored_total", "ray_flawline_predict_latency_ms",
                                         "ray_flawline_label_queue", "ray_flawline_train_loss"}
    assert len(rows) == len(METRICS)


def test_status_without_ray_still_shows_queues_and_runs(settings_env, catalog):
    _fill(catalog)
    result = CliRunner().invoke(app, ["status", "--json"])
    view = json.loads(result.stdout)
    assert {s["service"]: s["state"] for s in view["services"]}["Ray"] in ("idle", "down")
    assert "cluster" not in view and "jobs" not in view
    (project,) = view["queues"]["label_projects"]
    assert (project["dataset"], project["pushed"], project["labelled"]) == ("tiles", 1, 2)
    assert view["queues"]["runs"]["failed"] == 1
    table = CliRunner().invoke(app, ["status"])
    assert "label queues" in table.stdout and "1 succeeded, 1 failed" in table.stdout, table.stdout
    brief = CliRunner().invoke(app, ["status", "--brief", "--json"])
    assert set(json.loads(brief.stdout)) == {"services"}


def test_job_kinds_and_the_drivers_submission_id(monkeypatch):
    assert job_kind({"flawline_run_id": "3", "setting": "supervised", "method": "classifier"}) == \
        "train run 3 (supervised/classifier)"
    assert job_kind({"flawline_monitor": "1"}).startswith("monitor")
    assert job_kind(None) == "other"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert current_submission_id() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    assert current_submission_id() == "raysubmit_1"


def test_monitor_and_in_process_training_refuse_bad_input_in_one_line(settings_env, catalog):
    """No cluster behind the dashboard URL, an unknown dataset: one line, nothing recorded."""
    started = CliRunner().invoke(app, ["monitor", "start"])
    assert started.exit_code == 1 and "no Ray cluster answers at http://127.0.0.1:9" in started.output
    assert len(started.output.strip().splitlines()) == 1
    trained = CliRunner().invoke(app, ["train", "submit", "--in-process", "-d", "nope", "--setting", "supervised"])
    assert trained.exit_code == 1 and "no dataset named 'nope'" in trained.output
    assert json.loads(CliRunner().invoke(app, ["runs", "list", "--json"]).stdout) == []
