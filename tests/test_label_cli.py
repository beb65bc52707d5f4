"""``flawline label`` end to end against a real Label Studio (the session's server), the local S3
server and a SQLite catalog: setup, push (twice), simulate, pull, status; pull errors; the webhook
listener's wiring; bad input and an unreachable Label Studio as one-line errors; the Label Studio
health check; ``flawline up --label-studio`` and ``down``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from flawline.cli import label as label_cli
from flawline.cli.main import app
from flawline.config import get_settings
from flawline.data.ingest import import_dataset
from flawline.storage.local_s3 import LocalS3Server, _free_ports

DATASET = "tiles"  # the magnetic_tile_slice: 3 free, 2 blowholes, 2 cracks
N = 7


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _json(*args: str) -> dict:
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def ls_env(settings_env, labelstudio, monkeypatch):
    """The CLI's settings pointed at the session's Label Studio with its admin token."""
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", labelstudio.url)
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", labelstudio.token)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def tiles(ls_env, catalog, store, magnetic_tile_slice):
    """The slice imported as DATASET, every image in the train split."""
    import_dataset(catalog, store, magnetic_tile_slice, layout="magnetic-tile", dataset=DATASET, workers=4)
    result = _run("data", "split", DATASET, "--train", "1", "--val", "0", "--test", "0")
    assert result.exit_code == 0, result.output
    return DATASET


def test_help_and_task_names():
    assert label_cli.TASKS == __import__("flawline.labelstudio.configs", fromlist=["TASKS"]).TASKS
    assert label_cli.DEFAULT_TASK == __import__("flawline.labelstudio.ledger", fromlist=["DEFAULT_TASK"]).DEFAULT_TASK
    for args in (["label"], ["label", "push"], ["label", "pull"], ["label", "simulate"], ["up"]):
        result = _run(*args, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, result.output
    assert "2 when any task had an error" in " ".join(_run("label", "pull", "--help").output.split())
    assert "benchmarks and tests only" in " ".join(_run("label", "simulate", "--help").output.split())
    assert "--label-studio" in _run("up", "--help").output


def test_setup_push_simulate_pull_status(tiles, labelstudio):
    made = _json("label", "setup", "--dataset", tiles, "--task", "segmentation")
    assert made["classes"] == ["blowhole", "crack"]
    assert made["url"] == f"{labelstudio.url}/projects/{made['project']}"
    again = _run("label", "setup", "--dataset", tiles, "--task", "segmentation", "--classes", "chip")
    assert again.exit_code == 0 and made["url"] in again.stdout and "keeps its classes" in again.stderr

    first = _json("label", "push", "--dataset", tiles, "--limit", "3")
    assert (first["created"], first["already_there"]) == (3, 0)
    shown = _run("label", "push", "--dataset", tiles)  # the rest, with the table output
    assert shown.exit_code == 0 and f"{N - 3} task(s) created, 3 already there" in shown.stdout
    second = _json("label", "push", "--dataset", tiles)
    assert (second["created"], second["already_there"], second["reconciled"]) == (0, N, 0)
    status = _json("label", "status", "--dataset", tiles)
    assert status["tasks"] == {"pushed": N, "labelled": 0, "skipped": 0, "orphaned": 0}
    assert status["watermark"] is None and status["human_annotations"] == 0

    assert _json("label", "simulate", "--dataset", tiles, "--limit", "2")["answered"] == 2
    assert _json("label", "simulate", "--dataset", tiles)["answered"] == N - 2
    pulled = _run("label", "pull", "--dataset", tiles)
    assert pulled.exit_code == 0, pulled.output
    assert f"{N} task(s) read: {N} labelled" in pulled.stdout and "0 error(s)" in pulled.stdout
    assert _json("label", "pull", "--dataset", tiles)["labelled"] == 0  # nothing new since the watermark

    status = _json("label", "status", "--dataset", tiles, "--task", "segmentation")
    assert status["tasks"]["labelled"] == N and status["total"] == N
    assert status["human_annotations"] == N and status["watermark"] is not None
    table = _run("label", "status", "--dataset", tiles)
    assert table.exit_code == 0 and f"labelled {N}" in table.stdout
    # every image has its human label now: nothing left to push by default, all of them with --all
    assert _json("label", "push", "--dataset", tiles)["already_there"] == 0
    assert _json("label", "push", "--dataset", tiles, "--all")["already_there"] == N


def test_pull_reports_task_errors_with_exit_code_2(tiles, ls_client):
    project = _json("label", "setup", "--dataset", tiles, "--task", "boxes")["project"]
    assert _json("label", "push", "--dataset", tiles, "--task", "boxes", "--limit", "2")["created"] == 2
    tasks = list(ls_client.iter_tasks(project))
    ls_client.sdk.annotations.create(id=tasks[0].id, result=[
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["normal"]}},
        {"from_name": "box", "to_name": "image", "type": "rectanglelabels",
         "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["crack"]}}])
    ls_client.sdk.annotations.create(id=tasks[1].id, result=[
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["normal"]}}])
    result = _run("label", "pull", "--dataset", tiles)  # the only project: --task is found
    assert result.exit_code == 2, result.output
    assert "1 labelled" in result.stdout and "1 error(s)" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # below the progress bar
    assert errors == [f"error: task {tasks[0].id}: contradictory annotation: verdict 'normal' but defect regions "
                      "are drawn"]
    report = CliRunner().invoke(app, ["label", "pull", "--dataset", tiles, "--full", "--json"])
    assert report.exit_code == 2 and len(json.loads(report.stdout)["errors"]) == 1


def test_bad_input_is_one_line(tiles):
    line = _one_line_error(_run("label", "setup", "--dataset", tiles, "--task", "keypoints"))
    assert "unknown labelling task 'keypoints'" in line and "segmentation" in line
    line = _one_line_error(_run("label", "push", "--dataset", "nope"))
    assert "no dataset named 'nope'" in line and tiles in line
    line = _one_line_error(_run("label", "pull", "--dataset", tiles, "--task", "polygons"))
    assert "no Label Studio polygons project" in line and "flawline label setup" in line
    line = _one_line_error(_run("label", "status", "--dataset", tiles))
    assert "no Label Studio segmentation project" in line
    _json("label", "setup", "--dataset", tiles)
    line = _one_line_error(_run("label", "push", "--dataset", tiles, "--split", "holdout"))
    assert "unknown split 'holdout'" in line
    line = _one_line_error(_run("label", "setup", "--dataset", tiles, "--task", "boxes", "--classes", " , "))
    assert "--classes" in line


def test_unreachable_label_studio_is_one_line(tiles, monkeypatch):
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", "http://127.0.0.1:9")
    get_settings.cache_clear()
    started = time.monotonic()
    line = _one_line_error(_run("label", "setup", "--dataset", tiles))
    assert "127.0.0.1:9 is not reachable" in line and "flawline up --label-studio" in line
    assert time.monotonic() - started < 30
    monkeypatch.delenv("FLAWLINE_LABELSTUDIO_TOKEN")
    get_settings.cache_clear()
    line = _one_line_error(_run("label", "setup", "--dataset", tiles))
    assert "no Label Studio token" in line


def test_listener_wiring(tiles, ls_client):
    from fastapi.testclient import TestClient

    project = _json("label", "setup", "--dataset", tiles, "--task", "classification")["project"]
    settings = get_settings()
    # A public address: Label Studio refuses local ones while its SSRF protection is on. Registering
    # only stores it; no annotation is made in this project, so nothing is ever sent there.
    url = "http://93.184.216.34:18090/labelstudio/webhook"
    first = label_cli.build_listener(settings, tiles, None, url, secret="s3cret")
    listener = label_cli.build_listener(settings, tiles, None, url, secret="s3cret")  # replaces the first
    hooks = [h for h in ls_client.sdk.webhooks.list(project=str(project)) if h.project == project]
    assert [h.id for h in hooks] == [listener.webhook_id] and listener.webhook_id != first.webhook_id
    assert hooks[0].url == url and hooks[0].headers == {"X-Flawline-Webhook-Secret": "s3cret"}
    assert _json("label", "status", "--dataset", tiles)["webhook"] == listener.webhook_id
    http = TestClient(listener.app)
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 403
    answer = http.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": project}},
                       headers={"X-Flawline-Webhook-Secret": "s3cret"})
    assert answer.status_code == 200 and answer.json()["errors"] == []
    ls_client.sdk.webhooks.delete(id=listener.webhook_id)

    with socket.socket() as busy:  # a port in use: one line, nothing registered
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        line = _one_line_error(_run("label", "listen", "--dataset", tiles, "--port", port))
    assert f"127.0.0.1:{port}" in line and "already in use" in line


def test_simulate_from_another_dataset(tiles, catalog, store, magnetic_tile_slice):
    import_dataset(catalog, store, magnetic_tile_slice, layout="magnetic-tile", dataset="truth", workers=4)
    _json("label", "setup", "--dataset", tiles, "--task", "classification")
    assert _json("label", "push", "--dataset", tiles, "--limit", "2")["created"] == 2
    answered = _json("label", "simulate", "--dataset", tiles, "--truth-dataset", "truth")["answered"]
    assert answered == 2
    assert _json("label", "pull", "--dataset", tiles)["labelled"] == 2
    line = _one_line_error(_run("label", "simulate", "--dataset", tiles, "--truth-dataset", "nope"))
    assert "no dataset named 'nope'" in line


def test_listen_serves_until_interrupted(tiles):
    """The command itself, as a user runs it: serves the webhook, stops cleanly on Ctrl-C."""
    _json("label", "setup", "--dataset", tiles)
    port = _free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "flawline.cli", "label", "listen", "--dataset", tiles,
                             "--port", str(port), "--no-register"], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    health = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.3)
        assert health == {"status": "ok"}, proc.poll()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"listening on http://127.0.0.1:{port}/labelstudio/webhook" in out and "stopped" in out
    assert "Traceback" not in err


def test_health_check_uses_the_token(ls_env, labelstudio, monkeypatch):
    from flawline.health import check_labelstudio

    good = check_labelstudio(get_settings())
    assert (good.state, good.detail) == ("ok", f"up; token accepted (user {labelstudio.username})")
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", "0" * 40)
    get_settings.cache_clear()
    bad = check_labelstudio(get_settings())
    assert bad.state == "degraded" and bad.detail.startswith("up; token refused")
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("FLAWLINE_LABELSTUDIO_TOKEN")
    get_settings.cache_clear()
    assert check_labelstudio(get_settings()).state == "idle"


@pytest.fixture
def up_env(monkeypatch, tmp_path, labelstudio):
    """`flawline up` settings on free ports whose local Label Studio is the session's server (its
    folder linked in as <data_dir>/labelstudio, so `up --label-studio` finds it running)."""
    ports = LocalS3Server.on_free_ports(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "labelstudio").symlink_to(labelstudio.root)
    for key in list(os.environ):
        if key.startswith("FLAWLINE_"):
            monkeypatch.delenv(key)
    env = {"FLAWLINE_DATA_DIR": str(data), "FLAWLINE_S3_ENDPOINT": f"127.0.0.1:{ports.s3_port}",
           "FLAWLINE_LOCAL_S3_MASTER_PORT": str(ports.master_port),
           "FLAWLINE_LOCAL_S3_VOLUME_PORT": str(ports.volume_port),
           "FLAWLINE_LOCAL_S3_FILER_PORT": str(ports.filer_port), "FLAWLINE_LABELSTUDIO_URL": labelstudio.url,
           "FLAWLINE_RAY_DASHBOARD_URL": "http://127.0.0.1:9"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield data
    LocalS3Server.from_settings(get_settings()).stop()
    get_settings.cache_clear()


def test_up_label_studio_and_down(up_env, labelstudio, monkeypatch, capsys):
    from flawline.cli import services

    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", "https://labelstudio.example.com")
    get_settings.cache_clear()
    line = _one_line_error(_run("up", "--no-ray", "--label-studio"))  # refused before anything starts
    assert "not a local address" in line and not (up_env / "catalog.db").exists()
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", labelstudio.url)
    get_settings.cache_clear()

    result = _run("up", "--no-ray", "--label-studio")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert f"Label Studio already running at {labelstudio.url}" in out
    assert f"API token in {up_env / 'labelstudio' / 'token'}" in out
    status = json.loads(_run("status", "--json").stdout)  # no token set: the local server's is used
    (ls,) = [r for r in status["services"] if r["service"] == "Label Studio"]
    assert ls["state"] == "ok" and labelstudio.username in ls["detail"]
    services.up(timeout=60.0, ray=False)  # as quickstart calls it: Label Studio stays off by default
    assert "Label Studio" not in capsys.readouterr().out
    (up_env / "labelstudio").unlink()  # `down` must not stop the session's server
    down = _run("down", "--no-ray")
    assert down.exit_code == 0 and "S3 server stopped" in down.stdout
    assert "Label Studio was not running" in down.stdout
    assert labelstudio.is_running()


def test_push_with_model_pre_annotations(tiles, ls_client, catalog, store):
    """`label push --model` sends the registered model's verdict, score and regions with each task."""
    from flawline.active.trainers import in_process_trainer
    from flawline.train import TrainSpec

    assert _run("data", "split", DATASET, "--train", "0.6", "--val", "0", "--test", "0.4",
                "--normal-only-train").exit_code == 0
    metrics = in_process_trainer(catalog, store)(TrainSpec(datasets=[DATASET], setting="unsupervised",
                                                           method="padim", image_size=64, batch_size=4))
    project = _json("label", "setup", "--dataset", tiles, "--task", "polygons")["project"]
    bad = _run("label", "push", "--dataset", tiles, "--split", "all", "--model", "nope")
    assert "nope" in _one_line_error(bad)
    pushed = _json("label", "push", "--dataset", tiles, "--split", "all", "--model", metrics["model"])
    assert pushed["created"] == N
    tasks = list(ls_client.iter_tasks(project))
    preds = [(p if isinstance(p, dict) else p.__dict__) for t in tasks for p in t.predictions]
    (version,) = {p["model_version"] for p in preds}  # the model and the threshold its verdicts come from
    assert len(preds) == N and version.startswith(f"{metrics['model']} (threshold ")
    assert all(p["result"][0]["from_name"] == "verdict" for p in preds)


def test_a_slow_service_is_asked_again_before_it_is_called_down():
    """A server that accepted the connection but answers after the first timeout (a busy machine)
    is waited for once more; a refused connection fails at once."""
    import socket
    import threading
    import time
    import urllib.error

    from flawline import health

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def answer_late() -> None:
        while True:
            conn, _ = server.accept()
            conn.recv(1000)
            time.sleep(2.5)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"status\": \"UP\"}")
            conn.close()

    threading.Thread(target=answer_late, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/health"
    assert health._http_json(url, timeout=1.0) == (200, {"status": "UP"})
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError):
        health._http_json("http://127.0.0.1:9/health")
    assert time.monotonic() - started < 1.5
    server.close()
