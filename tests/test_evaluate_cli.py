"""`flawline evaluate` and `flawline models …` end to end on a slice of the real Magnetic Tile set:
fit, threshold, report files a person can open, model registered, manual threshold, ONNX export."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flawline.cli.main import app
from flawline.models.export import onnx_predict

from conftest import MAGNETIC_TILE, write


def _run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def mt_split(settings_env, tmp_path):
    root = tmp_path / "mt"
    for folder, n in {"MT_Free": 16, "MT_Blowhole": 3, "MT_Crack": 3}.items():
        for jpg in sorted((MAGNETIC_TILE / folder / "Imgs").glob("*.jpg"))[:n]:
            for src in (jpg, jpg.with_suffix(".png")):
                write(root / folder / "Imgs" / src.name, src.read_bytes())
    assert _run("data", "import", root, "--dataset", "mt").exit_code == 0
    assert _run("data", "split", "mt", "--train", "0.6", "--val", "0.2", "--test", "0.2",
                "--normal-only-train").exit_code == 0
    return "mt"


def test_evaluate_report_and_model_lifecycle(mt_split, tmp_path):
    out = tmp_path / "report"
    result = _run("evaluate", mt_split, "--method", "patchcore", "--image-size", 64, "--out", out)
    assert result.exit_code == 0, result.output
    assert "image AUROC" in result.stdout and "model mt-patchcore:1 saved" in result.stdout
    for name in ("report.json", "report.md", "roc.png"):
        assert (out / name).is_file()
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["metrics"]["image_auroc"] <= 1.0
    # the default (auto) uses the val split's labelled defects: best F1, and it says so
    chosen = report["metrics"]["threshold"]
    assert chosen["method"] == "best-f1" and chosen["data"]["split"] == "val"
    assert chosen["params"]["rule"].startswith("auto: best F1, as ") and "auto: best F1" in result.stdout
    assert "aupro" in report["metrics"] and "pixel_auroc" in report["metrics"]
    md = (out / "report.md").read_text()
    assert "![ROC](roc.png)" in md and "Threshold" in md
    assert "method `best-f1` (f1 " in md and "chosen on dataset mt, split val" in md and "Rule: auto: best F1" in md
    assert "{" not in md.split("**Threshold**")[1].split("\n")[0]  # no raw dicts

    listed = json.loads(_run("models", "list", "--json").stdout)
    assert listed[0]["model"] == "mt-patchcore:1" and listed[0]["threshold_method"] == "best-f1"

    assert _run("models", "threshold", "mt-patchcore", "--value", 123.5, "--note", "trial").exit_code == 0
    shown = json.loads(_run("models", "show", "mt-patchcore:1", "--json").stdout)
    assert shown["threshold"]["value"] == 123.5 and shown["threshold"]["method"] == "manual"
    assert shown["threshold_history"][0]["method"] == "best-f1"  # the calibrated one is kept

    onnx = tmp_path / "m.onnx"
    exported = _run("models", "export", "mt-patchcore", "--format", "onnx", "--out", onnx)
    assert exported.exit_code == 0, exported.output
    assert "max score drift" in exported.stdout and onnx.is_file()
    import numpy as np
    scores, maps = onnx_predict(onnx, np.random.rand(3, 3, 64, 64).astype("float32"))
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)


def test_evaluate_padim_with_manual_threshold(mt_split, tmp_path):
    result = _run("evaluate", mt_split, "--method", "padim", "--image-size", 64, "--threshold-value", 5.0,
                  "--out", tmp_path / "r", "--no-save")
    assert result.exit_code == 0, result.output
    assert "threshold 5 (manual" in result.stdout
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["metrics"]["threshold"]["value"] == 5.0


def test_evaluate_needs_a_split(settings_env, folder_tree):
    assert _run("data", "import", folder_tree, "--dataset", "nosplit").exit_code == 0
    result = _run("evaluate", "nosplit", "--image-size", 64)
    assert result.exit_code == 1
    assert "no normal images in its train split; run `flawline data split`" in result.stderr


def test_unknown_model_and_method(settings_env):
    assert "no model 'nope'" in _run("models", "show", "nope").stderr
    result = _run("models", "export", "nope", "--format", "tflite", "--out", "x")
    assert result.exit_code == 1 and "not supported" in result.stderr


def test_evaluate_with_max_area_threshold(mt_split, tmp_path):
    result = _run("evaluate", mt_split, "--method", "padim", "--image-size", 64, "--threshold", "max-area",
                  "--max-area", 16, "--out", tmp_path / "r", "--no-save")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    t = report["metrics"]["threshold"]
    assert t["method"] == "max-area" and t["params"] == {"max_area": 16}
    assert sum(report["metrics"]["confusion"].values()) == report["metrics"]["images"]


def test_evaluate_option_reaches_the_model_and_progress_is_shown(mt_split, tmp_path):
    out = tmp_path / "r"
    result = _run("evaluate", mt_split, "--method", "padim", "--image-size", 64, "--option", "channels=24",
                  "-o", "blur_sigma=2", "--threshold-value", -1e9, "--out", out)
    assert result.exit_code == 0, result.output
    shown = json.loads(_run("models", "show", "mt-padim:1", "--json").stdout)
    assert shown["config"]["channels"] == 24 and shown["config"]["blur_sigma"] == 2
    assert shown["info"]["channels"] == 24  # the fitted model really has 24 channels
    # per-stage counts and rates on stderr (a progress bar on a terminal)
    for stage in ("fit (fetch + fit): ", "calibrate: ", "test: "):
        assert stage in result.stderr
    tested = json.loads((out / "report.json").read_text())["metrics"]["images"]
    assert f"test: {tested}/{tested} images in " in result.stderr and "images/s" in result.stderr
    # every image flagged: the worst false alarms get their heatmaps
    report = json.loads((out / "report.json").read_text())
    assert (out / "false_positives.png").is_file() and report["files"]["false_positives"] == "false_positives.png"
    assert 1 <= len(report["worst"]["false_positives"]) <= 4 and report["worst"]["false_negatives"] == []
    assert report["context"]["options"] == {"channels": 24, "blur_sigma": 2}
    md = (out / "report.md").read_text()
    assert "## Worst false alarms" in md and "![false alarms](false_positives.png)" in md
    assert "bin histograms" in md and "bin histograms" in report["metrics"]["pixel_metrics_note"]


def test_evaluate_report_shows_missed_defects(mt_split, tmp_path):
    out = tmp_path / "r"
    result = _run("evaluate", mt_split, "--method", "padim", "--image-size", 64, "--threshold-value", 1e9,
                  "--out", out, "--no-save")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    defects = report["metrics"]["defects"]
    assert len(report["worst"]["false_negatives"]) == min(4, defects) and (out / "false_negatives.png").is_file()
    assert "![missed](false_negatives.png)" in (out / "report.md").read_text()
    bounds = report["metrics"]["pixel_error_bounds"]
    assert 0 <= bounds["pixel_auroc"] < 0.01 and 0 <= bounds["aupro"] < 0.01


def test_evaluate_refuses_unknown_and_mistyped_options(settings_env):
    result = _run("evaluate", "anything", "--method", "padim", "--option", "bogus=1")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: padim: unknown setting bogus; its settings: ")
    assert "channels=100" in lines[0] and "blur_sigma=4.0" in lines[0]
    result = _run("evaluate", "anything", "--method", "patchcore", "-o", "coreset_ratio=lots")
    assert result.exit_code == 1 and "coreset_ratio='lots' must be float" in result.stderr
    result = _run("evaluate", "anything", "-o", "image_size=64")
    assert result.exit_code == 1 and "set it with --image-size" in result.stderr
    result = _run("evaluate", "anything", "-o", "novalue")
    assert result.exit_code == 1 and "expected KEY=VALUE" in result.stderr
    for option, message in (("channels=0", "channels=0 must be at least 1"),
                            ("blur_sigma=-1", "blur_sigma=-1 must be at least 0"),
                            ("device=gpu", "device='gpu' is no device (expected auto, cpu, cuda"),
                            ("batch_size=0", "padim: setting batch_size=0 must be at least 1")):
        result = _run("evaluate", "anything", "--method", "padim", "-o", option)
        assert result.exit_code == 1 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = _run("evaluate", "anything", "--method", "patchcore", "-o", "coreset_ratio=2")
    assert result.exit_code == 1 and "is a share: it must lie between 0 and 1" in result.stderr
