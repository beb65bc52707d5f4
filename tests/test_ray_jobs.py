"""Training as Ray jobs on a real local Ray cluster of two nodes (a head plus a second raylet on
this machine): a 2-worker DDP job across both nodes, a run whose worker is killed resumes from its
checkpoint, normal-only embeddings on actors, cancel, and bad configurations that never reach the
cluster. Uses a slice of the real ELPV set and the real S3 server."""

from __future__ import annotations

import os
import signal
import time

import pytest
from typer.testing import CliRunner

from conftest import write
from flawline.cli.main import app
from flawline.cluster.local_ray import LocalRayCluster
from flawline.config import get_settings
from flawline.context import open_catalog
from flawline.train.runs import get_run


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = LocalRayCluster.on_free_ports(num_cpus=2, log_file=tmp_path_factory.mktemp("ray") / "ray.log")
    cluster.start()
    cluster.add_node(num_cpus=2, resources='{"second_node": 1}')
    yield cluster
    cluster.stop()


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def elpv_small(settings_env, monkeypatch, ray_cluster, tmp_path):
    """40 ELPV cells (16 defective), split 60/0/40 and catalogued; the CLI points at the cluster."""
    monkeypatch.setenv("FLAWLINE_RAY_DASHBOARD_URL", ray_cluster.dashboard_url)
    get_settings.cache_clear()
    from flawline.data.importers.elpv import packaged_elpv_dir

    src = packaged_elpv_dir()
    rows = [line.split() for line in (src / "labels.csv").read_text().splitlines() if line.strip()]
    picked = [r for r in rows if float(r[1]) >= 0.5][:16] + [r for r in rows if float(r[1]) == 0.0][:24]
    root = tmp_path / "elpv"
    for rel, _, _ in picked:
        write(root / rel, (src / rel).read_bytes())
    (root / "labels.csv").write_text("\n".join(" ".join(r) for r in picked) + "\n")
    assert _cli("data", "import", root, "--layout", "elpv", "--dataset", "elpv").exit_code == 0
    result = _cli("data", "split", "elpv", "--train", "0.6", "--val", "0", "--test", "0.4", "--stratify-by", "cell_type")
    assert result.exit_code == 0, result.output
    yield "elpv"
    get_settings.cache_clear()


def _submit(*args):
    result = _cli("train", "submit", "--json", "--image-size", 64, "--batch-size", 4, *args)
    assert result.exit_code == 0, result.output
    import json

    return json.loads(result.stdout)["run"]


def _wait(run_id: int, timeout: float = 240, until=None):
    """Poll the run's row (the job updates it) until it ends, or ``until(row)`` holds."""
    from flawline.train.submit import refresh

    settings = get_settings()
    catalog = open_catalog(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        refresh(catalog, settings, [run_id])
        row = get_run(catalog, run_id)
        if (until is not None and until(row)) or row.status.value in ("succeeded", "failed", "cancelled"):
            return row
        time.sleep(0.5)
    logs = _cli("runs", "logs", run_id).output[-3000:]
    pytest.fail(f"run {run_id} still {row.status.value} after {timeout} s; logs:\n{logs}")


def test_two_worker_ddp_job_spans_both_nodes_and_registers_a_model(elpv_small):
    # 1.5 CPUs each: two workers cannot share one 2-CPU node, so Ray must place them on both.
    run = _submit("--dataset", elpv_small, "--setting", "supervised", "--workers", 2, "--cpus-per-worker", 1.5,
                  "--epochs", 2)
    row = _wait(run)
    assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", run).output[-3000:])
    assert len(set(row.metrics["worker_nodes"])) == 2
    assert row.metrics["checkpoints"] == 2 and row.metrics["progress"]["world_size"] == 2
    assert 0.0 <= row.metrics["accuracy"] <= 1.0 and row.metrics["model"] == "elpv-supervised-classifier:1"
    shown = _cli("runs", "show", run)
    assert shown.exit_code == 0 and "succeeded" in shown.stdout and "elpv-supervised-classifier:1" in shown.stdout
    assert "workers on 2 node(s)" in shown.stdout
    listed = _cli("runs", "list", "--json")
    assert listed.exit_code == 0 and '"status": "succeeded"' in listed.stdout
    assert "Reporting training result" in _cli("runs", "logs", run).stdout
    models = _cli("models", "show", "elpv-supervised-classifier:1", "--json")
    assert models.exit_code == 0, models.output


def test_killed_worker_resumes_from_its_last_checkpoint(elpv_small, ray_cluster):
    from ray.util.state import list_actors

    run = _submit("--dataset", elpv_small, "--setting", "supervised", "--workers", 2, "--epochs", 12,
                  "--max-failures", 2)
    # Two checkpoints reported: Ray Train's controller has registered at least the first by then
    # (a report still in flight when a worker dies is dropped with the failed group).
    row = _wait(run, until=lambda r: (r.metrics or {}).get("checkpoints", 0) >= 2)
    assert row.status.value == "running"
    workers = [a for a in list_actors(address=ray_cluster.address, filters=[("state", "=", "ALIVE")])
               if a.class_name == "RayTrainWorker"]
    assert workers, "no live Ray Train worker to kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    row = _wait(run)
    assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", run).output[-3000:])
    progress = row.metrics["progress"]
    assert progress.get("resumed_from_epoch", 0) >= 1, row.metrics  # resumed, not restarted from scratch
    assert progress["epoch"] == 12


def test_jobs_run_side_by_side_embeddings_on_actors_and_cancel(elpv_small):
    # A long gradient run holds its CPU while a normal-only run embeds on two actors beside it.
    long_run = _submit("--dataset", elpv_small, "--setting", "supervised", "--epochs", 200)
    _wait(long_run, until=lambda r: (r.metrics or {}).get("checkpoints", 0) >= 1)
    run = _submit("--dataset", elpv_small, "--setting", "unsupervised", "--method", "padim", "--workers", 2)
    row = _wait(run)
    assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", run).output[-3000:])
    assert row.metrics["model"] == "elpv-unsupervised-padim:1" and "image_auroc" in row.metrics
    assert get_run(open_catalog(), long_run).status.value == "running"  # both ran at once

    result = _cli("runs", "cancel", long_run)
    assert result.exit_code == 0, result.output
    time.sleep(3)  # the stopped driver must not overwrite the verdict
    assert get_run(open_catalog(), long_run).status.value == "cancelled"
    again = _cli("runs", "cancel", long_run)
    assert again.exit_code == 1 and "already cancelled" in again.output


@pytest.mark.parametrize("args, message", [
    (["--setting", "supervised", "--method", "patchcore"], "trains classifier, segmenter; not 'patchcore'"),
    (["--setting", "telepathy"], "unknown training setting 'telepathy'"),
    (["--setting", "supervised", "--method", "segmenter"], "no defect masks in the train split"),
    (["--setting", "supervised", "--workers", "0"], "workers"),
    (["--setting", "supervised", "--label-fraction", "0"], "label fraction"),
])
def test_bad_configurations_never_reach_the_cluster(elpv_small, ray_cluster, args, message):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    before = len(client.list_jobs())
    result = _cli("train", "submit", "--dataset", elpv_small, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert len(client.list_jobs()) == before
    assert _cli("runs", "list", "--json").stdout.strip() == "[]"


def test_missing_images_or_labels_are_refused_before_submission(elpv_small, tmp_path):
    from flawline.data.importers.elpv import packaged_elpv_dir

    src = packaged_elpv_dir()
    normals = [line for line in (src / "labels.csv").read_text().splitlines() if line.split()[1] == "0.0"][:6]
    root = tmp_path / "normals"
    for line in normals:
        write(root / line.split()[0], (src / line.split()[0]).read_bytes())
    (root / "labels.csv").write_text("\n".join(normals) + "\n")
    assert _cli("data", "import", root, "--layout", "elpv", "--dataset", "normals").exit_code == 0
    result = _cli("train", "submit", "--dataset", "normals", "--setting", "supervised")
    assert result.exit_code == 1 and "no images in the train split" in result.output
    assert _cli("data", "split", "normals", "--train", "0.5", "--val", "0", "--test", "0.5").exit_code == 0
    result = _cli("train", "submit", "--dataset", "normals", "--setting", "supervised")
    assert result.exit_code == 1 and "no labelled defect images in the train split" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = _cli("train", "submit", "--dataset", "nope", "--setting", "supervised")
    assert result.exit_code == 1 and "no dataset named 'nope'" in result.output
    assert _cli("runs", "list", "--json").stdout.strip() == "[]"


def test_pool_scoring_job_matches_scoring_in_process(elpv_small, ray_cluster):
    """The loop's batch scoring as a Ray job (Ray Data over S3, two model actors) gives the same
    scores and embeddings as scoring in process, in the pool's order."""
    import numpy as np

    from flawline.active.score_job import submit_scoring
    from flawline.active.scoring import score_local
    from flawline.active.trainers import in_process_trainer
    from flawline.catalog.model_versions import get_version
    from flawline.context import open_store
    from flawline.models.artifacts import load_detector
    from flawline.train import TrainSpec
    from flawline.train.data import dataset_rows

    settings = get_settings()
    catalog, store = open_catalog(settings), open_store(settings)
    metrics = in_process_trainer(catalog, store)(TrainSpec(datasets=[elpv_small], setting="unsupervised",
                                                           method="padim", image_size=64, batch_size=8))
    with catalog.session() as s:
        model = get_version(s, metrics["model"])
        s.expunge(model)
    rows = [r for r in dataset_rows(catalog, elpv_small) if r["split"] == "train"][::-1]  # not in id order
    detector = load_detector(store, store.key_from_uri(model.artifact_uri))
    on_ray = submit_scoring(settings, store, model, rows, elpv_small, 64, float(detector.threshold.value), workers=2)
    local = score_local(detector, store, rows, 64)
    assert on_ray.image_ids.tolist() == [r["image_id"] for r in rows]
    np.testing.assert_allclose(on_ray.scores, local.scores, rtol=1e-4)
    np.testing.assert_allclose(on_ray.embeddings, local.embeddings, atol=1e-4)
    assert on_ray.threshold == float(detector.threshold.value)
    # pre-annotations (verdicts, regions at each image's size) on the cluster = in process
    from flawline.active.score_job import submit_pre_annotation
    from flawline.active.scoring import pre_annotations

    # test images: the threshold is a quantile of held-back train normals' scores, so a train image
    # can sit exactly on it, where the last bit of a differently batched forward pass decides
    test_rows = [r for r in dataset_rows(catalog, elpv_small) if r["split"] == "test"][:12]
    remote = submit_pre_annotation(settings, store, model, test_rows, elpv_small, 64, workers=2)
    here = pre_annotations(detector, store, test_rows, metrics["model"])
    assert remote.keys() == here.keys()
    for image_id, pred in here.items():
        other = remote[image_id]
        assert (other.is_defect, other.model_version) == (pred.is_defect, pred.model_version)
        assert (other.mask is None) == (pred.mask is None)
        if pred.mask is not None:
            assert (other.mask == pred.mask).mean() > 0.999


def test_label_push_pre_annotates_on_the_cluster(elpv_small, ray_cluster, labelstudio, monkeypatch):
    """`flawline label push --model M --on-cluster`: the pre-annotations come from a Ray job."""
    import json

    from flawline.active.trainers import in_process_trainer
    from flawline.context import open_store
    from flawline.labelstudio import LabelStudioClient
    from flawline.train import TrainSpec

    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", labelstudio.url)
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", labelstudio.token)
    get_settings.cache_clear()
    catalog, store = open_catalog(), open_store()
    model = in_process_trainer(catalog, store)(TrainSpec(datasets=[elpv_small], setting="unsupervised",
                                                         method="padim", image_size=64, batch_size=8))["model"]
    assert _cli("label", "setup", "-d", elpv_small, "--task", "boxes").exit_code == 0
    result = CliRunner().invoke(app, ["label", "push", "-d", elpv_small, "--task", "boxes", "--split", "test",
                                      "--model", model, "--on-cluster", "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)
    assert pushed["created"] == 16  # 40 % of the 40 cells
    client = LabelStudioClient(labelstudio.url, labelstudio.token)
    tasks = list(client.iter_tasks(pushed["project"]))
    versions = {(p if isinstance(p, dict) else p.__dict__)["model_version"] for t in tasks for p in t.predictions}
    assert len(tasks) == 16 and versions == {model}
