"""The loop's learning curve PNG from a status dict built by hand (no catalog or Label Studio)."""

from __future__ import annotations

import pytest

from flawline.active.curve import learning_curve_png
from flawline.errors import InvalidInput


def _round(i, labels_start, labels_total, metric, promoted, start_metric=None):
    return {"round": i, "labels_start": labels_start, "labels_total": labels_total, "metric": metric,
            "start_metric": start_metric, "metric_name": "image_auroc", "promoted": promoted,
            "retrained": True, "model": f"cracks-mixed:{i + 1}"}


def test_learning_curve_png(tmp_path):
    status = {"dataset": "cracks", "labels": 30, "rounds": [
        _round(0, 0, 10, 0.71, True, start_metric=0.62), _round(1, 10, 20, 0.71, False),
        _round(2, 20, 30, 0.83, True)]}
    path = learning_curve_png(status, tmp_path / "reports" / "loop-cracks.png")
    assert path == tmp_path / "reports" / "loop-cracks.png" and path.read_bytes().startswith(b"\x89PNG")


def test_learning_curve_skips_rounds_without_metric(tmp_path):
    status = {"dataset": "cracks", "labels": 10,
              "rounds": [_round(0, None, 10, 0.7, True), _round(1, 10, 20, None, False)]}
    assert learning_curve_png(status, tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_learning_curve_without_rounds_or_metrics(tmp_path):
    with pytest.raises(InvalidInput, match="no learning curve for cracks: the loop has no rounds yet"):
        learning_curve_png({"dataset": "cracks", "labels": 0, "rounds": []}, tmp_path / "c.png")
    with pytest.raises(InvalidInput, match="no round has a test metric yet"):
        learning_curve_png({"dataset": "cracks", "labels": 0, "rounds": [_round(0, None, 3, None, False)]},
                           tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
