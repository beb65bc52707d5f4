"""Where runs train and how they survive, on a real local two-node Ray cluster (its own, beside
test_ray_jobs.py's) with PostgreSQL as the catalog: a flow run placed by a custom resource on the
node that has it (the driver trains nothing) whose killed worker resumes from its checkpoint, a
cancelled run resumed to the model an uninterrupted one gives, runs side by side, a KubeRay-style
in-process job, and an elastic run that loses a node."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from flawline.config import get_settings
from flawline.context import open_catalog
from flawline.train.runs import get_run
from ray_support import (  # noqa: F401
    FLOW,
    _available,
    _cli,
    _node_with,
    _ray_train_workers,
    _row,
    _submit,
    _wait,
    _wait_job,
    catalog_url,
    elpv_small,
    ray_cluster,
)

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
                                           "--worker-resource second_node=0.5 --image-size 64 --json",
                                runtime_env={"env_vars": job_env(get_settings())})

    # Watch both at once: ``placed`` is killed once two checkpoints are reported (Ray Train's
    # controller has registered at least the first by then; a report still in flight when a worker
    # dies is dropped with the failed group); ``cut`` is cancelled after its 3rd (which may be in
    # flight), while ``whole`` goes on.
    killed = cancelled = False
    deadline = time.monotonic() + 480  # four runs starting at once share two cores with the other test process
    while not (killed and cancelled):
        ids = {"placed": placed, "whole": whole, "cut": cut}
        rows = {name: _row(run_id) for name, run_id in ids.items()}
        ended = [name for name, r in rows.items()
                 if r.status.value not in ("pending", "running") and not (name == "cut" and cancelled)]
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


def test_elastic_run_that_loses_a_node_finishes_with_one_worker(elpv_small, ray_cluster):
    """Last in this module: it kills the second node."""
    # Half a CPU per worker: Ray Data's decoding gets what Ray Train leaves of the cluster after
    # reserving --workers (the most) workers, and after the loss only the head's 2 CPUs are left.
    # One "slot" per node: one worker per node.
    run = _submit("--dataset", elpv_small, *FLOW, "--workers", 2, "--min-workers", 1, "--cpus-per-worker", 0.5,
                  "--worker-resource", "slot=1", "--epochs", 8)
    row = _wait(run, until=lambda r: ((r.metrics or {}).get("progress") or {}).get("world_size") == 2
                and r.metrics.get("checkpoints", 0) >= 2)
    assert row.status.value == "running", row.error
    assert ray_cluster.kill_node(), "no process of the second node found"
    row = _wait(run, timeout=300)
    assert row.status.value == "succeeded", (row.error, _cli("runs", "logs", run).output[-3000:])
    progress = row.metrics["progress"]
    assert progress["world_size"] == 1 and progress["epoch"] == 8 and progress["resumed_from_epoch"] >= 1
    (worker,) = row.metrics["placement"]
    assert worker["node_id"] == row.metrics["driver_node"]  # the head is the node left
