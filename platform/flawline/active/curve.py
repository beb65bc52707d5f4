"""The active-learning loop's learning curve: the production model's test metric against the labels
people gave, one point per round, as a PNG (what `flawline loop status` writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flawline.errors import InvalidInput


def _points(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The curve's points from ``loop_status``'s dict: round 0's starting model at ``labels_start``
    (when recorded), then each round's production model at ``labels_total``. Rounds without a metric
    (not finished, or old records) are left out. Each point: ``labels``, ``metric``, ``round``
    (None for the start), ``promoted`` and, for the start, ``label``."""
    rounds = status.get("rounds") or []
    points = []
    first = rounds[0] if rounds else {}
    if first.get("start_metric") is not None and first.get("labels_start") is not None:
        start = first["labels_start"]
        points.append({"labels": start, "metric": first["start_metric"], "round": None, "promoted": False,
                       "label": "label-free start" if start == 0 else f"start ({start} labels)"})
    for r in rounds:
        if r.get("metric") is not None and r.get("labels_total") is not None:
            points.append({"labels": r["labels_total"], "metric": r["metric"], "round": r.get("round"),
                           "promoted": bool(r.get("promoted"))})
    return points


def learning_curve_png(status: dict[str, Any], path: Path) -> Path:
    """Plot ``status`` (``flawline.active.loop.loop_status``'s dict) as a learning curve: x the labels
    from people, y the test metric; promoted rounds are marked. Writes ``path`` (its folder is made)
    and returns it; raises InvalidInput when there are no rounds or none has a metric yet."""
    dataset = status.get("dataset", "?")
    if not status.get("rounds"):
        raise InvalidInput(f"no learning curve for {dataset}: the loop has no rounds yet "
                           "(run `flawline loop run`)")
    points = _points(status)
    if not points:
        raise InvalidInput(f"no learning curve for {dataset}: no round has a test metric yet")
    metric_name = next((r["metric_name"] for r in status["rounds"] if r.get("metric_name")), "metric")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    xs, ys = [p["labels"] for p in points], [p["metric"] for p in points]
    ax.plot(xs, ys, c="tab:blue", lw=1.5, marker="o", ms=6, zorder=2)
    promoted = [p for p in points if p["promoted"]]
    if promoted:
        ax.scatter([p["labels"] for p in promoted], [p["metric"] for p in promoted], marker="*", s=180,
                   c="tab:orange", edgecolors="black", linewidths=0.5, zorder=3, label="promoted")
    if points[0]["round"] is None:
        ax.scatter([xs[0]], [ys[0]], marker="s", s=60, c="white", edgecolors="tab:blue", linewidths=1.5,
                   zorder=3, label=points[0]["label"])
    for p in points:
        ax.annotate("start" if p["round"] is None else f"r{p['round']}", (p["labels"], p["metric"]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.08, y=0.15)
    ax.grid(alpha=0.3)
    ax.set(xlabel="labels from people", ylabel=metric_name,
           title=f"{dataset}: learning curve ({metric_name})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["learning_curve_png"]
