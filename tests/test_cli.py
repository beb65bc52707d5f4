"""The CLI end to end: help, up/down/status against a real local S3 server, data commands, and the
README's main job (quickstart) on a slice of the Magnetic Tile set."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flawline.catalog import head_revision
from flawline.cli.main import app
from flawline.cluster.local_ray import LocalRayCluster
from flawline.config import get_settings
from flawline.storage.local_s3 import LocalS3Server


def _run(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args", [[], ["data"], ["db"], ["data", "import"], ["data", "split"], ["up"], ["status"]])
def test_help_explains(args):
    result = _run(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_predict_help_names_its_settings_whole_in_a_narrow_terminal():
    """At 80 columns Rich cuts a word longer than its column with an ellipsis: the settings that
    name the server's address must stay whole words."""
    result = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "…" not in result.output
    for name in ("FLAWLINE_SERVE_HOST", "FLAWLINE_SERVE_PORT", "FLAWLINE_SERVE_GRPC_PORT"):
        assert name in text


def test_data_commands(settings_env, folder_tree):
    result = _run("data", "import", str(folder_tree), "--dataset", "parts", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["new_images"] == 8
    listing = json.loads(_run("data", "list", "--json").stdout)
    assert [d["name"] for d in listing] == ["parts"]
    assert _run("data", "split", "parts", "--seed", "7").exit_code == 0
    shown = json.loads(_run("data", "show", "parts", "--json").stdout)
    assert shown["split_info"]["seed"] == 7 and sum(shown["by_split"].values()) == 8
    table = _run("data", "show", "parts")
    assert "scratch 2" in table.stdout
    # 8 images at val 0.01: val gets none, and the split says so (on stderr) instead of leaving it empty silently
    thin = _run("data", "split", "parts", "--val", "0.01", "--train", "0.79")
    assert thin.exit_code == 0 and "warning: val got no image (8 images at train 0.79 / val 0.01 / test 0.2): " \
        "raise --val or import more images" in " ".join(thin.stderr.split())
    empty = _run("models", "list")
    assert empty.exit_code == 0 and "no registered models yet" in empty.stdout


@pytest.fixture
def local_env(monkeypatch, tmp_path):
    """Settings for `flawline up` on free ports with its own data directory."""
    ports = LocalS3Server.on_free_ports(tmp_path)
    ray = LocalRayCluster.on_free_ports()
    env = {
        "FLAWLINE_LOCAL_RAY_PORT": str(ray.port),
        "FLAWLINE_RAY_DASHBOARD_URL": ray.dashboard_url,
        "FLAWLINE_DATA_DIR": str(tmp_path / "data"),
        "FLAWLINE_S3_ENDPOINT": f"127.0.0.1:{ports.s3_port}",
        "FLAWLINE_LOCAL_S3_MASTER_PORT": str(ports.master_port),
        "FLAWLINE_LOCAL_S3_VOLUME_PORT": str(ports.volume_port),
        "FLAWLINE_LOCAL_S3_FILER_PORT": str(ports.filer_port),
        "FLAWLINE_LABELSTUDIO_URL": "http://127.0.0.1:9",
    }
    for key in list(os.environ):
        if key.startswith("FLAWLINE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    LocalS3Server.from_settings(get_settings()).stop()
    ray.stop()
    get_settings.cache_clear()


def test_up_refuses_a_busy_port(local_env, s3_server, monkeypatch):
    monkeypatch.setenv("FLAWLINE_S3_ENDPOINT", s3_server.endpoint)
    get_settings.cache_clear()
    result = _run("up")
    assert result.exit_code == 1
    assert f"s3 port {s3_server.s3_port}" in result.stderr and "already in use" in result.stderr


def test_quickstart_main_job(local_env, labelstudio, tmp_path):
    """The README's main command, as a user runs it (a real process), on a Magnetic Tile slice: the
    whole active-learning loop with the simulated annotator, training and scoring as Ray jobs. Its
    Label Studio is the session's server (linked in as <data_dir>/labelstudio: `up` finds it running)."""
    from conftest import MAGNETIC_TILE, write

    root = tmp_path / "mt16"
    for folder, n in {"MT_Free": 8, "MT_Blowhole": 4, "MT_Crack": 4}.items():
        for jpg in sorted((MAGNETIC_TILE / folder / "Imgs").glob("*.jpg"))[:n]:
            for src in (jpg, jpg.with_suffix(".png")):
                write(root / folder / "Imgs" / src.name, src.read_bytes())
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "labelstudio").symlink_to(labelstudio.root)
    from flawline.cluster.process import free_ports

    # A Ray token left by an earlier local `ray.init()` (~/.ray/auth_token; here at its env path): Ray 2.60's
    # `ray start` turns token authentication on when one exists; `up` must still make a working cluster.
    (tmp_path / "auth_token").write_text("0" * 64)
    serve_port, grpc_port = free_ports(2)
    env = dict(os.environ, FLAWLINE_LABELSTUDIO_URL=labelstudio.url, FLAWLINE_SERVE_PORT=str(serve_port),
               FLAWLINE_SERVE_GRPC_PORT=str(grpc_port), RAY_AUTH_TOKEN_PATH=str(tmp_path / "auth_token"))
    try:  # within pytest-timeout's 1200 s, so that what it printed is shown
        proc = subprocess.run([sys.executable, "-m", "flawline.cli", "quickstart", "--source", str(root), "--rounds",
                               "1", "--budget", "3", "--retrain-after", "3", "--image-size", "64"],
                              env=env, capture_output=True, text=True, timeout=1100)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"quickstart still running after 1100 s; it printed:\n{(err.stdout or b'')[-3000:]!s}\n"
                    f"{(err.stderr or b'')[-3000:]!s}")
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "16 new images" in out and "blowhole 4, crack 4" in out
    assert f"Label Studio already running at {labelstudio.url}" in out
    assert "simulation: 0 train labels kept" in out  # the loop starts from no labels
    assert "starting model magnetic-tile-mixed-padim:1: image_auroc" in out  # the label-free figure first
    # one round: 3 images labelled through Label Studio, refined (3 >= 3), the metric printed
    assert "round 0: 3 images sent to Label Studio" in out and "round 0: 3 labels (3 new" in out
    assert "retrain at 3): retrained (run " in out and "image_auroc" in out
    assert "learning curve: " in out and (data / "reports" / "loop-magnetic-tile.png").read_bytes()[:4] == b"\x89PNG"
    # the production model deployed with Serve answers for a held-out image over HTTP, with its overlay
    assert "predicting the held-out test image" in out and "(labelled defect/" in out  # the truth beside the verdict
    overlays = list((data / "reports" / "quickstart").glob("*.overlay.png"))
    assert len(overlays) == 1 and ("DEFECT" in out or " ok " in out) and "magnetic-tile-mixed-padim:" in out
    assert "S3 server started" in out and f"schema {head_revision()}" in out and "Ray started" in out

    # What quickstart started stays up for the user's next commands: `up` finds it, `status` shows
    # it, `down` stops it. (This process's Label Studio URL is a dead port, and the session's Label
    # Studio, linked into the data directory, is unlinked first: `down` must not stop it.)
    (data / "labelstudio").unlink()
    again = _run("up")
    assert "S3 server already running" in again.stdout and "Ray already running" in again.stdout
    status = _run("status", "--json")
    assert status.exit_code == 0, status.output
    view = json.loads(status.stdout)
    states = {r["service"]: r["state"] for r in view["services"]}
    assert states == {"S3": "ok", "catalog": "ok", "Ray": "ok", "Label Studio": "idle"}, states
    assert view["cluster"]["alive"] == 1 and view["serve"]["deployments"]
    assert view["queues"]["runs"]["succeeded"] >= 2  # the label-free start and the round's retraining
    down = _run("down").stdout
    assert "S3 server stopped" in down and "Ray stopped" in down
    after = _run("status", "--json")
    assert after.exit_code == 1
    states = {r["service"]: r["state"] for r in json.loads(after.stdout)["services"]}
    assert states["S3"] == "down" and states["Ray"] == "idle"


def test_data_survives_a_restart(local_env, folder_tree):
    from sqlalchemy import select

    from flawline.catalog import Image
    from flawline.context import open_catalog, open_store

    for args in (["up", "--no-ray"], ["data", "import", str(folder_tree), "--dataset", "kept"], ["down", "--no-ray"],
                 ["up", "--no-ray"]):
        result = _run(*args)
        assert result.exit_code == 0, (args, result.output)
    with open_catalog().session() as s:
        keys = list(s.scalars(select(Image.object_key)))
    store = open_store()
    assert len(keys) == 8 and all(store.exists(k) for k in keys)


def test_up_starts_ray_in_serve_throughput_optimized_mode(local_env):
    """`flawline up --serve-throughput-optimized`: Ray's processes (and so Serve's controller and
    proxies) start with the mode's environment, HAProxy's files in a short folder of this cluster's
    own; a second `up` on the running cluster says the mode takes effect only when Ray starts."""
    from flawline.cli.services import local_ray

    result = _run("up", "--serve-throughput-optimized")
    try:
        assert result.exit_code == 0, result.output
        assert "Serve throughput-optimized (HAProxy ingress)" in result.output
        cluster = local_ray(get_settings())
        probe = (f"import os, ray; ray.init(address={cluster.address!r}, logging_level='ERROR'); "
                 "f = ray.remote(lambda: {k: v for k, v in os.environ.items() if k.startswith('RAY_SERVE_')}); "
                 "print(repr(ray.get(f.remote())))")
        seen = ast.literal_eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                   check=True).stdout.strip().splitlines()[-1])
        assert seen["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and seen["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert seen["RAY_SERVE_HAPROXY_SOCKET_PATH"] == f"/tmp/flawline-hap-{cluster.dashboard_port}/admin.sock"
        again = _run("up", "--serve-throughput-optimized")
        assert again.exit_code == 0 and "takes effect when Ray starts; Ray already runs" in again.output
    finally:
        assert _run("down").exit_code == 0
    assert not Path(f"/tmp/flawline-hap-{cluster.dashboard_port}").exists()  # `down` leaves nothing behind


def test_a_process_is_alive_until_its_last_thread_has_exited():
    """A multi-threaded process whose main thread has exited shows its leader as a zombie while
    the other threads run on (and hold its sockets): `down` must wait for them, or an `up` right
    after finds the S3 ports still taken (it did, two times in three)."""
    import time
    from pathlib import Path

    from flawline.cluster.process import pid_alive, reap

    code = ("import ctypes, threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
            "ctypes.CDLL(None).pthread_exit(None)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        stat = Path(f"/proc/{proc.pid}/stat")
        while stat.read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the main thread did not exit"
            time.sleep(0.05)
        assert pid_alive(proc.pid)  # the leader is a zombie, a thread still runs
    finally:
        proc.kill()
        proc.wait(10)
    reap(proc.pid)
    assert not pid_alive(proc.pid)


def test_a_stopped_s3_server_has_released_its_ports(tmp_path):
    from flawline.cluster.process import port_in_use

    server = LocalS3Server.on_free_ports(tmp_path)
    server.start()
    assert server.stop()
    assert [name for name, port in server.ports().items() if port_in_use(server.host, port)] == []


def test_a_command_called_from_another_gets_its_real_defaults():
    """quickstart calls `data split` and others as Python functions: an option the caller leaves
    out must arrive as its default value, never as Typer's OptionInfo (quickstart once failed
    with "no image has the attribute <typer.models.OptionInfo …> to group by")."""
    import typer

    from flawline.cli.app import FlawlineTyper
    from flawline.cli.data import split

    demo = FlawlineTyper()

    @demo.command()
    def cmd(name: str = typer.Argument(...), group_by: str | None = typer.Option(None, "--group-by"),
            train: float = typer.Option(0.7, "--train")) -> tuple:
        return name, group_by, train

    assert cmd("tiles") == ("tiles", None, 0.7)
    assert cmd("tiles", train=0.5) == ("tiles", None, 0.5)
    with pytest.raises(TypeError, match="'name'"):
        cmd()
    assert CliRunner().invoke(demo, ["tiles", "--train", "0.6"]).exit_code == 0
    import inspect
    params = inspect.signature(split).parameters
    assert {"group_by", "keep_preset"} <= set(params)  # the options quickstart leaves out


def test_help_loads_no_database_storage_or_array_library():
    """`flawline --help` (and every command's help) loads the CLI's modules only: SQLAlchemy, the S3
    client, numpy, torch, Ray, gRPC and the Label Studio SDK are imported by the commands that use them.
    Speed itself is measured outside the tests; this keeps the heavy imports from creeping back."""
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom flawline.cli.main import app\n"
             "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
             "assert CliRunner().invoke(app, ['data', 'import', '--help']).exit_code == 0\n"
             "assert CliRunner().invoke(app, ['predict', '--help']).exit_code == 0\n"
             "heavy = ('sqlalchemy', 'minio', 'numpy', 'torch', 'ray', 'label_studio_sdk', 'PIL', 'cv2', 'grpc',\n"
             "         'google.protobuf')\n"
             "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
