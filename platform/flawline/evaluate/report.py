"""A report a person can look at: JSON for machines, Markdown with a ROC curve and heatmap
overlays of the worst misses and false alarms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flawline.data.records import LabelledImages
from flawline.evaluate.metrics import roc_curve
from flawline.evaluate.thresholds import Threshold, decide
from flawline.models.base import Prediction


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> Path:
    plt = _plt()
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_overlays(data: LabelledImages, pred: Prediction, indices: list[int], path: Path, title: str) -> Path | None:
    """Image | heatmap overlay (with the true defect outlined) for each index."""
    if not indices:
        return None
    plt = _plt()
    vmax = float(np.percentile(pred.maps, 99.5))
    vmin = float(np.percentile(pred.maps, 1))
    fig, axes = plt.subplots(len(indices), 2, figsize=(5, 2.5 * len(indices)), dpi=100, squeeze=False)
    for row, i in zip(axes, indices):
        img = data.images[i].permute(1, 2, 0).numpy()
        row[0].imshow(img, cmap="gray")
        row[0].set_title(Path(data.names[i]).name, fontsize=7)
        row[1].imshow(img, cmap="gray")
        row[1].imshow(pred.maps[i], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        if data.masks[i].any():
            row[1].contour(data.masks[i], levels=[0.5], colors="white", linewidths=0.8)
        verdict = "defect" if data.labels[i] else "normal"
        row[1].set_title(f"score {pred.scores[i]:.3g} (truth: {verdict})", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out_dir: Path, metrics: dict[str, Any], data: LabelledImages, pred: Prediction,
                 context: dict[str, Any], worst: int = 4) -> dict[str, Path]:
    """Write report.json, report.md, roc.png and the overlay PNGs into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    threshold = Threshold.from_dict(metrics["threshold"]) if metrics.get("threshold") else None
    labels = data.labels.astype(bool)
    files["roc"] = plot_roc(labels, pred.scores, out_dir / "roc.png",
                            f"{context.get('method', '')} — ROC-AUC {metrics['image_auroc']:.3f}")
    if threshold is not None:
        verdict = decide(threshold, pred.scores, pred.maps)
        fn = [int(i) for i in np.argsort(pred.scores) if labels[i] and not verdict[i]][:worst]
        fp = [int(i) for i in np.argsort(-pred.scores) if not labels[i] and verdict[i]][:worst]
    else:  # no threshold: the lowest-scored defects and highest-scored normals
        fn = [int(i) for i in np.argsort(pred.scores) if labels[i]][:worst]
        fp = [int(i) for i in np.argsort(-pred.scores) if not labels[i]][:worst]
    for key, idx, title in (("false_negatives", fn, "worst missed defects"),
                            ("false_positives", fp, "worst false alarms")):
        p = plot_overlays(data, pred, idx, out_dir / f"{key}.png", title)
        if p:
            files[key] = p
    payload = {"context": context, "metrics": metrics,
               "worst": {"false_negatives": [data.names[i] for i in fn],
                         "false_positives": [data.names[i] for i in fp]},
               "files": {k: v.name for k, v in files.items()}}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    files["json"] = out_dir / "report.json"
    files["markdown"] = _markdown(out_dir / "report.md", payload, files)
    return files


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _markdown(path: Path, payload: dict[str, Any], files: dict[str, Path]) -> Path:
    m, c = payload["metrics"], payload["context"]
    lines = [f"# Evaluation: {c.get('method')} on {c.get('dataset')}", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in c.items() if k not in ("method", "dataset")]
    lines += ["", "| metric | value |", "|---|---|"]
    for key in ("images", "defects", "image_auroc", "average_precision", "f1", "precision", "recall", "accuracy",
                "pixel_auroc", "aupro", "iou", "predict_images_per_s"):
        if key in m and m[key] is not None:
            lines.append(f"| {key} | {_fmt(m[key])} |")
    if "threshold" in m:
        t = m["threshold"]
        lines += ["", f"**Threshold** {t['value']:.6g}, method `{t['method']}` {t.get('params') or ''}, "
                  f"chosen on {t.get('data') or 'unspecified data'}."]
        if "confusion" in m:
            lines.append("Confusion at the threshold: " + ", ".join(f"{k} {v}" for k, v in m["confusion"].items()))
    if m.get("image_auroc_per_class"):
        pixel, share = m.get("pixel_auroc_per_class") or {}, m.get("defect_pixel_share_per_class") or {}
        lines += ["", "| defect class | image AUROC vs normals | pixel AUROC vs normals | share of defect pixels |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {_fmt(pixel.get(k, '–'))} | "
                  f"{f'{share[k] * 100:.1f} %' if k in share else '–'} |"
                  for k, v in m["image_auroc_per_class"].items()]
    lines += ["", f"![ROC]({files['roc'].name})"]
    if "false_negatives" in files:
        lines += ["", "## Worst missed defects", "", f"![missed]({files['false_negatives'].name})"]
    if "false_positives" in files:
        lines += ["", "## Worst false alarms", "", f"![false alarms]({files['false_positives'].name})"]
    path.write_text("\n".join(lines) + "\n")
    return path
