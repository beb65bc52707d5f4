"""`flawline loop` end to end on the embedded parts: a real Label Studio, the local S3 server, a
SQLite catalog; training and scoring in process (Ray runs them in test_ray_jobs), the simulated
annotator answering through Label Studio's API."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import crack_tiles
from flawline.cli.main import app
from flawline.config import get_settings


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _point_at(monkeypatch, labelstudio) -> None:
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_URL", labelstudio.url)
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", labelstudio.token)
    get_settings.cache_clear()


def test_loop_run_and_status(settings_env, monkeypatch, labelstudio, tmp_path):
    _point_at(monkeypatch, labelstudio)
    root = crack_tiles(tmp_path / "cracks", normal=16, defect=12, unlabelled=0)
    assert _cli("data", "import", root, "--dataset", "cracks").exit_code == 0
    assert _cli("data", "split", "cracks", "--train", "0.7", "--val", "0", "--test", "0.3").exit_code == 0
    result = _cli("loop", "run", "-d", "cracks", "--budget", 3, "--rounds", 2, "--retrain-after", 3,
                  "--image-size", 64, "--epochs", 1, "--in-process", "--simulate", "--keep-labels", 0.2, "--json")
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["labels_total"] for r in rounds] == [3, 6]
    assert all(r["retrained"] for r in rounds) and all(r["metric_name"] == "image_auroc" for r in rounds)
    status = json.loads(_cli("loop", "status", "-d", "cracks", "--json").stdout)
    assert status["labels"] == 6 and [r["queue"] for r in status["rounds"]] == [{"labelled": 3}] * 2
    table = _cli("loop", "status", "-d", "cracks")
    assert table.exit_code == 0 and "new / N" in table.output
    assert status["curve"] and Path(status["curve"]).read_bytes().startswith(b"\x89PNG")
    assert "learning curve:" in table.output


def test_loop_bad_input_is_one_line(settings_env, monkeypatch, labelstudio):
    result = _cli("loop", "strategies", "--json")
    assert result.exit_code == 0 and {"random", "k_center", "hybrid"} <= {s["name"] for s in json.loads(result.stdout)}
    bad = _cli("loop", "run", "-d", "nope", "--strategy", "psychic", "--in-process")
    assert bad.exit_code == 1 and "psychic" in bad.output and "Traceback" not in bad.output
    monkeypatch.setenv("FLAWLINE_LABELSTUDIO_TOKEN", "0" * 40)  # FLAWLINE_LABELSTUDIO_URL points at port 9
    get_settings.cache_clear()
    down = _cli("loop", "run", "-d", "nope", "--in-process")
    assert down.exit_code == 1 and "not reachable" in down.output and len(down.output.strip().splitlines()) == 1
