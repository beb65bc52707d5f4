"""What the Ray test module (test_ray_jobs.py) uses: a two-node local Ray cluster (a head plus a
second raylet on this machine), PostgreSQL as the catalog, a slice of the real ELPV set, and
helpers that submit runs and watch their rows."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from conftest import write
from flawline.catalog.db import make_engine, upgrade
from flawline.cli.main import app
from flawline.cluster.local_ray import LocalRayCluster
from flawline.config import get_settings
from flawline.context import open_catalog
from flawline.train.runs import get_run

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = LocalRayCluster.on_free_ports(num_cpus=2, log_file=tmp_path_factory.mktemp("ray") / "ray.log")
    # Ray's own health checks (every 3 s, a node is dead after 5 misses): faster checks declared
    # nodes dead that were only slow while the other test process shared the 2 cores.
    # Worker processes (job drivers, Ray Train's controller) inherit the raylets' environment. An
    # elastic run that lost a node first asks again for its largest group (Ray's view of the
    # cluster is stale for a moment): that request is given up after 15 s instead of Ray Train's
    # 60 s, and the controller asks again for what is there. A run waiting for room also just asks
    # again: a start timeout is retried without limit (FailureConfig.controller_failure_limit -1).
    cluster.env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    # "slot": one elastic worker per node; "head_node": runs pinned to the head (the driver's node)
    cluster.start(resources='{"slot": 1, "head_node": 2}')
    cluster.add_node(num_cpus=2, resources='{"second_node": 2, "slot": 1}')
    yield cluster
    cluster.stop()


@pytest.fixture
def catalog_url(pg_url):
    """This module's catalog is PostgreSQL, as in production."""
    upgrade(make_engine(pg_url))
    return pg_url


def _cli(*args):
    """Run the CLI in process; each call's time goes to the captured stdout (shown on failure)."""
    started = time.monotonic()
    result = CliRunner().invoke(app, [str(a) for a in args])
    print(f"{time.monotonic() - started:6.1f} s  flawline {' '.join(str(a) for a in args[:4])}")
    return result


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
    return json.loads(result.stdout)["run"]


def _wait(run_id: int, timeout: float = 480, until=None):
    """Poll the run's row (the job updates it) until it ends, or ``until(row)`` holds."""
    from flawline.train.submit import refresh

    settings = get_settings()
    catalog = open_catalog(settings)
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        refresh(catalog, settings, [run_id])
        row = get_run(catalog, run_id)
        if (until is not None and until(row)) or row.status.value in ("succeeded", "failed", "cancelled"):
            print(f"{time.monotonic() - started:6.1f} s  run {run_id} {row.status.value}")
            return row
        time.sleep(0.5)
    logs = _cli("runs", "logs", run_id).output[-3000:]
    pytest.fail(f"run {run_id} still {row.status.value} after {timeout} s; logs:\n{logs}")


def _row(run_id: int):  # noqa: ANN202
    """The run's row, reconciled with Ray."""
    from flawline.train.submit import refresh

    settings = get_settings()
    catalog = open_catalog(settings)
    refresh(catalog, settings, [run_id])
    return get_run(catalog, run_id)


def _scrape(cluster: LocalRayCluster) -> str:
    """Every node's Prometheus endpoint, concatenated (what Prometheus would scrape)."""
    out = []
    for port in cluster.metrics_ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                out.append(resp.read().decode())
        except OSError:
            pass
    return "\n".join(out)


def _series(text: str, name: str, **tags: str) -> list[float]:
    """Values of ``name`` whose labels include ``tags``."""
    values = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


FLOW = ("--setting", "unsupervised", "--method", "flow")


def _node_with(cluster: LocalRayCluster, resource: str) -> str:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster.address, filters=[("state", "=", "ALIVE")], detail=True)
    (node,) = [n for n in nodes if resource in (n.resources_total or {})]
    return node.node_id


def _available(cluster: LocalRayCluster) -> dict:
    """What the cluster has free now (for a failure message)."""
    import ray

    with ray.init(address=cluster.address, ignore_reinit_error=True):
        return {"available": ray.available_resources(), "total": ray.cluster_resources()}


def _ray_train_workers(cluster: LocalRayCluster, job_id: str) -> list:
    """The live Ray Train workers of one Ray job (``job_id``: Ray's hex id of the job's driver)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], detail=True)
            if a.class_name == "RayTrainWorker" and a.job_id == job_id]


def _wait_job(client, job: str, timeout: float = 600) -> str:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job)).rsplit(".", 1)[-1]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job} still {status}"
        time.sleep(1)
    return status
