"""A report a person can look at: JSON for machines, Markdown with a ROC curve and heatmap
overlays of the worst misses and false alarms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flawline.evaluate.metrics import roc_curve


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


@dataclass
class Overlay:
    """One image shown in the report: ``image`` uint8 [S, S, 3], its anomaly ``amap`` float [S, S],
    true defect ``mask`` bool [S, S], image ``score`` and ``defect`` label (the truth)."""

    name: str
    image: np.ndarray
    amap: np.ndarray
    mask: np.ndarray
    score: float
    defect: bool

    @classmethod
    def of(cls, name: str, image: torch.Tensor, amap: np.ndarray, mask: np.ndarray | None, score: float,
           defect: bool) -> Overlay:
        """From a model-ready image float [3, S, S] in [0, 1] (kept as uint8, a quarter of the memory)."""
        img = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return cls(name, img, np.array(amap, dtype=np.float32),
                   np.zeros(amap.shape, dtype=bool) if mask is None else np.array(mask, dtype=bool),
                   float(score), bool(defect))


def plot_overlays(overlays: list[Overlay], path: Path, title: str, vmin: float, vmax: float) -> Path | None:
    """Image | heatmap overlay (with the true defect outlined) for each overlay, heatmaps on one
    colour scale [vmin, vmax] (map units)."""
    if not overlays:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(overlays), 2, figsize=(5, 2.5 * len(overlays)), dpi=100, squeeze=False)
    for row, o in zip(axes, overlays):
        row[0].imshow(o.image, cmap="gray")
        row[0].set_title(Path(o.name).name, fontsize=7)
        row[1].imshow(o.image, cmap="gray")
        row[1].imshow(o.amap, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        if o.mask.any():
            row[1].contour(o.mask, levels=[0.5], colors="white", linewidths=0.8)
        row[1].set_title(f"score {o.score:.3g} (truth: {'defect' if o.defect else 'normal'})", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out_dir: Path, metrics: dict[str, Any], labels: np.ndarray, scores: np.ndarray,
                 worst: dict[str, list[Overlay]], context: dict[str, Any],
                 display_range: tuple[float, float]) -> dict[str, Path]:
    """Write report.json, report.md, roc.png and the overlay PNGs into ``out_dir``. ``labels`` [N]
    (True = defect) and ``scores`` [N] of the test images give the ROC curve; ``worst`` holds the
    images to show under ``false_negatives`` (worst missed defects first) and ``false_positives``
    (worst false alarms first); ``display_range`` (vmin, vmax) the heatmaps' colour scale in map
    units. Returns the files written by kind (roc, false_negatives, false_positives, json, markdown)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["roc"] = plot_roc(np.asarray(labels).astype(bool), scores, out_dir / "roc.png",
                            f"{context.get('method', '')} — ROC-AUC {metrics['image_auroc']:.3f}")
    for key, title in (("false_negatives", "worst missed defects"), ("false_positives", "worst false alarms")):
        p = plot_overlays(worst.get(key, []), out_dir / f"{key}.png", title, *display_range)
        if p:
            files[key] = p
    payload = {"context": context, "metrics": metrics,
               "worst": {key: [o.name for o in worst.get(key, [])] for key in ("false_negatives", "false_positives")},
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
    if m.get("pixel_metrics_note"):
        lines += ["", f"Pixel metrics: {m['pixel_metrics_note']}."]
    if "threshold" in m:
        t = m["threshold"]
        params = {k: v for k, v in (t.get("params") or {}).items() if k != "rule"}
        data = ", ".join(f"{k} {v}" for k, v in (t.get("data") or {}).items()) or "unspecified data"
        lines += ["", f"**Threshold** {t['value']:.6g}, method `{t['method']}`"
                  + (" (" + ", ".join(f"{k} {_fmt(v)}" for k, v in params.items()) + ")" if params else "")
                  + f", chosen on {data}." + (f" Rule: {t['params']['rule']}." if (t.get("params") or {}).get("rule")
                                              else "")]
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
