"""The platform on a real local Ray cluster of two nodes (a head plus a second raylet on this
machine) with PostgreSQL as the catalog: the whole flow (monitor, 2-worker DDP training across both
nodes, promotion, pre-annotation on the cluster, Label Studio round trip, serving, metrics,
`flawline status`), pool scoring as a Ray job, bad configurations and requests no node can hold
that never reach the cluster (and the resource reader against Ray's own totals);
then where runs train and how they survive: a flow run placed by a custom resource on the node
that has it (the driver trains nothing) whose killed worker resumes from its checkpoint, a
cancelled run resumed to the model an uninterrupted one gives, runs side by side, a KubeRay-style
in-process job, and (last: it kills the second node) an elastic run that loses a node. One
cluster for all: two such clusters beside each other on a 2-core machine starved each other's
actors. Uses a slice of the real ELPV set, the real S3 server and a real Label Studio."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import write
from flawline.cluster.local_ray import free_ports
from flawline.config import get_settings
from flawline.context import open_catalog
from flawline.labelstudio import LabelStudioClient
from flawline.train.runs import get_run
from ray_support import (  # noqa: F401
    FLOW,
    _available,
    _cli,
    _node_with,
    _ray_train_workers,
    _row,
    _scrape,
    _series,
    _submit,
    _wait,
    _wait_job,
    catalog_url,
    elpv_small,
    ray_cluster,
)


def test_whole_flow_on_two_nodes_with_postgres(elpv_small, ray_cluster, labelstudio, monkeypatch):
    """The platform end to end on a two-node cluster with PostgreSQL as the catalog: the monitor
    job, a 2-worker DDP training job across both nodes, promotion, pre-annotation on the cluster,
    Label Studio round trip, serving, the metrics on the nodes' Prometheus endpoints and
    `flawline status`."""
    assert get_settings().catalog_url.startswith("postgresql")
    serve_port, grpc_port = free_ports(2)
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", labelstudio.url)
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", labelstudio.token)
    monkeypatch.setenv("FLAWLINE_SERVE_PORT", str(serve_port))
    monkeypatch.setenv("FLAWLINE_SERVE_GRPC_PORT", str(grpc_port))
    get_settings.cache_clear()
    started = _cli("monitor", "start", "--interval", 1)
    assert started.exit_code == 0 and "started as Ray job flawline-monitor-" in started.stdout, started.output
    again = _cli("monitor", "start")
    assert again.exit_code == 0 and "already runs" in again.stdout
    try:
        # Training: 1.5 CPUs each, so two workers cannot share one 2-CPU node and Ray must place
        # them on both. Nothing kept in memory (--shard-cache-mb 0): every epoch streams each
        # worker's share of the decoded images from Ray's object store.
        run = _submit("--dataset", elpv_small, "--setting", "supervised", "--workers", 2, "--cpus-per-worker", 1.5,
                      "--epochs", 2, "--shard-cache-mb", 0)
        row = _wait(run)
        assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", run).output[-3000:])
        assert len(set(row.metrics["worker_nodes"])) == 2
        assert row.metrics["checkpoints"] == 2 and row.metrics["progress"]["world_size"] == 2
        model = "elpv-supervised-classifier:1"
        assert 0.0 <= row.metrics["accuracy"] <= 1.0 and row.metrics["model"] == model
        shown = _cli("runs", "show", run)
        assert shown.exit_code == 0 and "succeeded" in shown.stdout and model in shown.stdout
        assert len({p["node_id"] for p in json.loads(_cli("runs", "show", run, "--json").stdout)["placement"]}) == 2
        assert "rank 1 on" in " ".join(shown.stdout.split())
        assert "spec: 64 px, batch 4, 2 worker(s) × 1.5 CPU, epochs 2, seed 0" in " ".join(shown.stdout.split())
        assert row.metrics["shard_cache"].startswith("streamed every epoch: labelled"), row.metrics
        assert "decoded images: streamed every epoch" in " ".join(shown.stdout.split())
        assert '"status": "succeeded"' in _cli("runs", "list", "--json").stdout
        assert "Reporting training result" in _cli("runs", "logs", run).stdout
        # Jobs run the installed package's modules: no working_dir package to ship to every worker.
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(row.ray_job_id)
        assert info.entrypoint == f"python -m flawline.train.job --run-id {run}", info.entrypoint
        assert "working_dir" not in (info.runtime_env or {}), info.runtime_env
        assert _cli("models", "promote", model).exit_code == 0

        # Labelling: pre-annotations from a Ray job, answered and pulled back.
        assert _cli("label", "setup", "-d", elpv_small, "--task", "classification").exit_code == 0
        pushed = _cli("label", "push", "-d", elpv_small, "--task", "classification", "--split", "test",
                      "--model", model, "--on-cluster", "--workers", 2, "--json")
        assert pushed.exit_code == 0, pushed.output
        pushed = json.loads(pushed.stdout)
        assert pushed["created"] == 16  # 40 % of the 40 cells
        tasks = list(LabelStudioClient(labelstudio.url, labelstudio.token).iter_tasks(pushed["project"]))
        versions = {(p if isinstance(p, dict) else p.__dict__)["model_version"] for t in tasks for p in t.predictions}
        assert len(tasks) == 16 and len(versions) == 1 and versions.pop().startswith(f"{model} (threshold ")
        answered = _cli("label", "simulate", "-d", elpv_small, "--limit", 10)
        assert answered.exit_code == 0, answered.output
        pulled = _cli("label", "pull", "-d", elpv_small, "--json")
        assert pulled.exit_code == 0, pulled.output

        # Serving the promoted model.
        up = _cli("serve", "up")
        assert up.exit_code == 0, up.output
        image = next((Path(get_settings().data_dir).parent / "elpv").rglob("*.png"))
        predicted = _cli("predict", image, "--model", "elpv-supervised-classifier", "--json")
        assert predicted.exit_code == 0, predicted.output
        (answer,) = json.loads(predicted.stdout)
        assert answer["model_version"] == 1 and answer["is_defect"] in (True, False), answer

        # Metrics, on the nodes' Prometheus endpoints (Ray prefixes ray_; counters end in _total).
        wanted = {"ray_flawline_train_loss": {"run": str(run)}, "ray_flawline_train_epoch": {"run": str(run)},
                  "ray_flawline_images_scored_total": {}, "ray_flawline_predictions_total": {},
                  "ray_flawline_predict_latency_ms_count": {},
                  "ray_flawline_labels_pulled": {"dataset": elpv_small},
                  "ray_flawline_label_queue": {"dataset": elpv_small, "status": "pushed"},
                  "ray_flawline_runs": {"status": "succeeded"}}
        deadline = time.monotonic() + 60
        while True:
            text = _scrape(ray_cluster)
            missing = [name for name, tags in wanted.items() if not _series(text, name, **tags)]
            if (not missing and max(_series(text, "ray_flawline_labels_pulled", dataset=elpv_small)) == 10
                    or time.monotonic() > deadline):
                break
            time.sleep(1)
        assert not missing, f"not exported: {missing}"
        assert max(_series(text, "ray_flawline_labels_pulled", dataset=elpv_small)) == 10
        assert max(_series(text, "ray_flawline_label_queue", dataset=elpv_small, status="pushed")) == 6
        assert sum(_series(text, "ray_flawline_images_scored_total")) >= 16
        assert max(_series(text, "ray_flawline_train_epoch", run=str(run))) == 2

        # Everything at a glance.
        status = _cli("status", "--json")
        view = json.loads(status.stdout)
        assert view["cluster"]["alive"] == 2 and view["cluster"]["cpus"] == 4
        kinds = " | ".join(j["kind"] for j in view["jobs"]["jobs"])
        assert f"train run {run} (supervised/classifier)" in kinds and "monitor" in kinds, kinds
        assert {d["deployment"] for d in view["serve"]["deployments"]} == {"Gateway", "ModelServer"}
        (project,) = view["queues"]["label_projects"]
        assert (project["pushed"], project["labelled"]) == (6, 10)
        assert view["queues"]["runs"]["succeeded"] == 1
        table = _cli("status")
        assert "cluster: 2 node(s) alive" in table.stdout and "label queues" in table.stdout, table.stdout
    finally:
        _cli("serve", "down")
        stopped = _cli("monitor", "stop")
    assert "stopped flawline-monitor-" in stopped.stdout, stopped.output


@pytest.mark.parametrize("args, message", [
    (["--setting", "supervised", "--method", "patchcore"], "trains classifier, segmenter; not 'patchcore'"),
    (["--setting", "telepathy"], "unknown training setting 'telepathy'"),
    (["--setting", "supervised", "--method", "segmenter"], "no defect masks in the train split"),
    (["--setting", "supervised", "--workers", "0"], "workers"),
    (["--setting", "supervised", "--label-fraction", "0"], "label fraction"),
    (["--setting", "unsupervised", "--workers", "2", "--min-workers", "3"], "min-workers must lie in 1..workers (2)"),
    (["--setting", "unsupervised", "--worker-resource", "gpu_node"], "expected NAME=AMOUNT"),
    (["--setting", "unsupervised", "--worker-resource", "CPU=2"], "use --cpus-per-worker / --gpus-per-worker"),
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


def test_requests_checked_against_the_clusters_resources(elpv_small, ray_cluster):
    """A run asking what no node has is refused before submission, naming the resource and what
    the cluster has; the resource reader sees Ray's own totals and a free count within them, and
    `flawline status --json` reports free and total CPUs."""
    from ray.job_submission import JobSubmissionClient

    from flawline.cluster.resources import read_cluster

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    before = len(client.list_jobs())
    for args, words in ((["--worker-resource", "nosuch=1"], ["nosuch=1", "no node offers nosuch", "slot"]),
                        (["--cpus-per-worker", 3], ["3 CPU", "the largest node has 2 CPU", "4 CPU on 2 node(s)"])):
        result = _cli("train", "submit", "--dataset", elpv_small, *FLOW, *args)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert all(w in result.output for w in words), result.output
    assert len(client.list_jobs()) == before and _cli("runs", "list", "--json").stdout.strip() == "[]"

    ray_says = _available(ray_cluster)["total"]
    deadline = time.monotonic() + 30  # the autoscaler's usage report comes every few seconds
    while (cluster := read_cluster(ray_cluster.dashboard_url)).free("CPU") is None and time.monotonic() < deadline:
        time.sleep(1)
    for name in ("CPU", "slot", "head_node", "second_node"):
        assert cluster.total(name) == ray_says[name], (name, cluster.nodes, ray_says)
        assert 0 <= cluster.free(name) <= cluster.total(name), (name, cluster.nodes)
    assert len(cluster.nodes) == 2 and cluster.total("GPU") == ray_says.get("GPU", 0)
    view = json.loads(_cli("status", "--json").stdout)["cluster"]
    assert view["cpus"] == 4 and 0 <= view["cpus_free"] <= 4 and view["gpus_free"] == view["gpus"] == 0, view
    assert all(0 <= n["cpus_free"] <= n["cpus"] for n in view["nodes"]) and "pending" in view, view


def test_pool_scoring_job_matches_scoring_in_process(elpv_small, ray_cluster):
    """The loop's batch scoring as a Ray job (Ray Data over S3, two model actors) gives the same
    scores and embeddings as scoring in process, in the pool's order."""
    import numpy as np

    from flawline.active.score_job import submit_scoring
    from flawline.active.scoring import score_local
    from flawline.active.trainers import in_process_trainer
    from flawline.catalog.model_versions import get_version
    from flawline.context import open_store
    from flawline.data.records import image_records
    from flawline.models.artifacts import load_detector
    from flawline.train import TrainSpec

    settings = get_settings()
    catalog, store = open_catalog(settings), open_store(settings)
    metrics = in_process_trainer(catalog, store)(TrainSpec(datasets=[elpv_small], setting="unsupervised",
                                                           method="padim", image_size=64, batch_size=8))
    with catalog.session() as s:
        model = get_version(s, metrics["model"])
        s.expunge(model)
    rows = [r for r in image_records(catalog, elpv_small) if r.split == "train"][::-1]  # not in id order
    detector = load_detector(store, store.key_from_uri(model.artifact_uri))
    on_ray = submit_scoring(settings, store, model, rows, elpv_small, 64, float(detector.threshold.value), workers=2)
    local = score_local(detector, store, rows, 64)
    assert on_ray.image_ids.tolist() == [r.image_id for r in rows]
    np.testing.assert_allclose(on_ray.scores, local.scores, rtol=1e-4)
    np.testing.assert_allclose(on_ray.embeddings, local.embeddings, atol=1e-4)
    assert on_ray.threshold == float(detector.threshold.value)
    # pre-annotations (verdicts, regions at each image's size) on the cluster = in process
    from flawline.active.score_job import submit_pre_annotation
    from flawline.active.scoring import pre_annotations
    from flawline.labelstudio.convert import prediction_version

    # test images: the threshold is a quantile of held-back train normals' scores, so a train image
    # can sit exactly on it, where the last bit of a differently batched forward pass decides
    test_rows = [r for r in image_records(catalog, elpv_small) if r.split == "test"][:12]
    remote = submit_pre_annotation(settings, store, model, test_rows, elpv_small, 64, workers=2)
    here = pre_annotations(detector, store, test_rows, prediction_version(metrics["model"], detector.threshold))
    assert remote.keys() == here.keys()
    for image_id, pred in here.items():
        other = remote[image_id]
        assert (other.is_defect, other.model_version) == (pred.is_defect, pred.model_version)
        assert (other.mask is None) == (pred.mask is None) and other.readable == pytest.approx(pred.readable)
        if pred.mask is not None:
            assert (other.mask == pred.mask).mean() > 0.999


def test_runs_side_by_side_placed_killed_cancelled_resumed_and_in_process(elpv_small, ray_cluster):
    """Four runs at once, as users share a cluster:

    - ``placed``: a flow run asking for the second node's custom resource (standing for a GPU; the
      head, the driver's node, lacks it), keeping no embeddings (``--shard-cache-mb 0``: every
      epoch embeds the streamed shard again). Its fit runs there; its worker is killed mid-run and
      it finishes from its last checkpoint.
    - ``whole`` and ``cut``: the same flow run twice on the head (seed 5); ``cut`` is cancelled after
      3 checkpoints and continued with ``runs resume``: it ends as ``whole`` does.
    - what a KubeRay RayJob does (infra/k8s/rayjob-train.yaml): a Ray job whose own entrypoint is
      ``flawline train submit --in-process``; two workers (on the second node, beside ``placed``)
      embed their halves and PaDiM fits on rank 0 over both.

    Every run's resources are pinned (the head's two CPUs hold ``whole`` and ``cut``), so none
    waits for another."""
    from ray.job_submission import JobSubmissionClient

    from flawline.train.submit import job_env

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    second = _node_with(ray_cluster, "second_node")
    placed = _submit("--dataset", elpv_small, *FLOW, "--epochs", 6, "--worker-resource", "second_node=1",
                     "--max-failures", 2, "--shard-cache-mb", 0)
    on_head = ("--dataset", elpv_small, *FLOW, "--epochs", 6, "--seed", 5, "--worker-resource", "head_node=1")
    whole = _submit(*on_head, "--name", "flow-whole")
    cut = _submit(*on_head, "--name", "flow-cut")
    kuberay = client.submit_job(entrypoint=f"flawline train submit --in-process --dataset {elpv_small} --setting "
                                           "unsupervised --method padim --workers 2 --cpus-per-worker 0.5 "
                                           "--worker-resource second_node=0.5 --image-size 64 --option tile=32 --json",
                                runtime_env={"env_vars": job_env(get_settings())})

    # Watch both at once: ``placed`` is killed once two checkpoints are reported (Ray Train's
    # controller has registered at least the first by then; a report still in flight when a worker
    # dies is dropped with the failed group); ``cut`` is cancelled after its 3rd (which may be in
    # flight), while ``whole`` goes on.
    killed = cancelled = False
    deadline = time.monotonic() + 900  # four runs starting at once share two cores with the other test process
    while not (killed and cancelled):
        ids = {"placed": placed, "whole": whole, "cut": cut}
        rows = {name: _row(run_id) for name, run_id in ids.items()}
        # Until its event, a watched run must still be going; ``whole`` may finish once ``cut`` is cancelled.
        watched = {"placed": not killed, "cut": not cancelled, "whole": not cancelled}
        ended = [name for name, r in rows.items()
                 if watched[name] and r.status.value not in ("pending", "running")]
        assert not ended, [(n, rows[n].status.value, rows[n].error, _cli("runs", "logs", ids[n]).output[-2000:])
                           for n in ended]
        assert time.monotonic() < deadline, ("the runs did not reach their checkpoints",
                                             {n: (r.status.value, r.metrics) for n, r in rows.items()},
                                             _available(ray_cluster))
        time.sleep(0.5)
        if not killed and ((row := _row(placed)).metrics or {}).get("checkpoints", 0) >= 2:
            assert row.status.value == "running", row.error
            (worker,) = _ray_train_workers(ray_cluster, client.get_job_info(row.ray_job_id).job_id)
            assert worker.node_id == second
            os.kill(worker.pid, signal.SIGKILL)
            killed = True
        if not cancelled and ((row := _row(cut)).metrics or {}).get("checkpoints", 0) >= 3:
            assert row.status.value == "running", row.error
            assert _row(whole).status.value == "running"  # side by side
            result = _cli("runs", "cancel", cut)
            assert result.exit_code == 0, result.output
            cancelled = True
    first_job = get_run(open_catalog(), cut).ray_job_id
    _wait_job(client, first_job, 60)
    time.sleep(2)  # the stopped driver must not overwrite the verdict
    assert get_run(open_catalog(), cut).status.value == "cancelled"
    again = _cli("runs", "cancel", cut)
    assert again.exit_code == 1 and "already cancelled" in again.output
    if get_run(open_catalog(), whole).status.value == "running":
        assert _cli("runs", "resume", whole).exit_code == 1  # still running: not resumable
    resumed = _cli("runs", "resume", cut, "--json")
    assert resumed.exit_code == 0, resumed.output

    row = _wait(placed)
    assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", placed).output[-3000:])
    progress = row.metrics["progress"]
    assert progress.get("resumed_from_epoch", 0) >= 1, row.metrics  # resumed, not restarted from scratch
    assert progress["epoch"] == 6
    assert row.metrics["embedding_cache"].startswith("streamed: embedded again each epoch"), row.metrics
    (where,) = row.metrics["placement"]
    assert (where["node_id"], where["device"], where["rank"]) == (second, "cpu", 0)
    assert row.metrics["finished_on"]["node_id"] == second
    assert row.metrics["driver_node"] != second  # the driver planned and recorded, nothing more
    assert row.metrics["model"] == "elpv-unsupervised-flow:1" and row.metrics["image_auroc"] > 0.5
    shown = " ".join(_cli("runs", "show", placed).stdout.split())
    assert "rank 0 on" in shown and f"node {second[:8]} (cpu)" in shown and "(trained nothing)" in shown, shown
    assert "embeddings: streamed: embedded again each epoch" in shown, shown

    cut_row, whole_row = _wait(cut), _wait(whole)
    assert (cut_row.status.value, whole_row.status.value) == ("succeeded", "succeeded"), (cut_row.error, whole_row.error)
    for r in (cut_row, whole_row):  # pinned to the head, the node their drivers run on
        assert [p["node_id"] for p in r.metrics["placement"]] == [r.metrics["driver_node"]]
    shown = json.loads(_cli("runs", "show", cut, "--json").stdout)
    assert shown["ray_job_ids"] == [first_job, json.loads(resumed.stdout)["ray_job_id"]] == [
        first_job, cut_row.ray_job_id]
    assert cut_row.metrics["progress"]["resumed_from_epoch"] >= 2  # continued, not started again
    assert cut_row.metrics["progress"]["epoch"] == 6
    # Same seed, same data, the same batches each epoch: the resumed model is the uninterrupted one.
    assert cut_row.metrics["progress"]["loss"] == pytest.approx(whole_row.metrics["progress"]["loss"], rel=1e-4)
    assert cut_row.metrics["image_auroc"] == pytest.approx(whole_row.metrics["image_auroc"], abs=1e-6)
    again = _cli("runs", "resume", cut)
    assert again.exit_code == 1 and "only a failed or cancelled run can be resumed" in again.output

    assert _wait_job(client, kuberay) == "SUCCEEDED", client.get_job_logs(kuberay)[-3000:]
    (run,) = [r for r in json.loads(_cli("runs", "list", "--json").stdout) if r["ray_job_id"] == kuberay]
    assert (run["status"], run["metrics"]["model"]) == ("succeeded", "elpv-unsupervised-padim:1")
    assert len(run["placement"]) == 2 and run["metrics"]["image_auroc"] > 0.5
    # A run without epochs records its stages for `--wait` and `runs show` (embedding n/N, fitting,
    # evaluating), none counted as a checkpoint
    assert run["progress"] == {"stage": "evaluating"} and not run["checkpoints"]
    # Tiled (9 tiles of 32 px per 64 px image): both workers' tiles, back in image order, fit on rank 0.
    shown = json.loads(_cli("models", "show", "elpv-unsupervised-padim:1", "--json").stdout)
    assert (shown["config"]["tile"], shown["info"]["train_tiles"]) == (32, 9 * shown["info"]["train_images"])
    assert "tiles of 32px" in _cli("models", "show", "elpv-unsupervised-padim:1").stdout


def test_elastic_run_that_loses_a_node_finishes_with_one_worker(elpv_small, ray_cluster):
    """Last in this module: it kills the second node. The run is NDP-Net's: its second phase
    (from epoch 1 here) freezes the encoder, so DDP must let parameters go unused in a step."""
    # Half a CPU per worker: Ray Data's decoding gets what Ray Train leaves of the cluster after
    # reserving --workers (the most) workers, and after the loss only the head's 2 CPUs are left.
    # One "slot" per node: one worker per node.
    run = _submit("--dataset", elpv_small, "--setting", "selfsup", "--method", "ndpnet", "--option", "phase1_epochs=1",
                  "--workers", 2, "--min-workers", 1, "--cpus-per-worker", 0.5, "--worker-resource", "slot=1",
                  "--epochs", 8)
    row = _wait(run, until=lambda r: ((r.metrics or {}).get("progress") or {}).get("world_size") == 2
                and r.metrics.get("checkpoints", 0) >= 2)
    assert row.status.value == "running", row.error
    assert ray_cluster.kill_node(), "no process of the second node found"
    row = _wait(run, timeout=600)
    assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", run).output[-3000:])
    progress = row.metrics["progress"]
    assert progress["world_size"] == 1 and progress["epoch"] == 8 and progress["resumed_from_epoch"] >= 1
    assert row.metrics["model"] == "elpv-selfsup-ndpnet:1"
    (worker,) = row.metrics["placement"]
    assert worker["node_id"] == row.metrics["driver_node"]  # the head is the node left
