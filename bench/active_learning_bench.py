"""Active-learning benchmark: learning curves of every registered query strategy against random on
Magnetic Tile and ELPV, 3 seeds.

Protocol (the oracle is the imported ground truth):

- Data: each set is imported whole with the platform's importer (``import_dataset``, layouts
  ``magnetic-tile`` and ``elpv``) into a fresh local S3 server (SeaweedFS, in a temp dir) and a
  SQLite catalog (16 parallel uploads; the seeded split follows image content, so it is the same on every run),
  then split once with ``assign_splits``: seeded (0) 75 % train / 25 % test,
  stratified by label and defect class (and cell type for ELPV). The test split is fixed: the same
  for every strategy and seed. ELPV: defect probability >= 0.5 is defective.
- Features: frozen ImageNet EfficientNet-Lite0 (the platform's packaged weights through
  ``build_feature_extractor``; no downloads), the deepest feature map the platform's extractor
  returns (timm feature index 3, 112 channels, stride 16) global-average-pooled and L2-normalised,
  computed ONCE per image at 224 px with ``flawline.active.scoring.embed_batch``: the same
  embedding the platform's pool scoring hands to the diversity strategies.
- Model, refitted every round: a logistic-regression probe (plain torch, float64) on the labelled
  embeddings, standardised with the mean / std of the whole train split's embeddings (label-free);
  class-balanced BCE (weights n / (2 n_class)) summed over the labelled images + 1/2 ||w||^2
  (scikit-learn's default C = 1; the bias is not penalised), full-batch L-BFGS (strong Wolfe line
  search, at most ``lbfgs_iterations`` iterations), zero init, seeded. p(defect) = sigmoid.
- Metric: image ROC-AUC on the test split (``image_auroc``); accuracy and F1 of the defective class
  at p >= 0.5 are recorded too.
- Loop, per (dataset, strategy, seed): the initial labelled set is a seeded random sample of the
  train split stratified by label (and cell type for ELPV), with a floor on defects (Magnetic Tile:
  10 images, at least 2 defective; ELPV: 20, at least 4) -- the same initial set for every strategy
  of one seed. Each round: fit the probe, evaluate on test (labels count + metrics), score the
  unlabelled rest of the train split (scores = p(defect), probs = [1 - p, p], embeddings,
  threshold 0.5), let the strategy pick ``budget`` images (labelled_embeddings = the labelled
  set's, seed = seed * 1000 + round) and add them with their true labels. Budget: 20 a round on
  Magnetic Tile, 40 on ELPV; as many rounds as bring the labelled set to about 40 % of the train
  split; the probe is evaluated after the last acquisition too.
- Strategies: every registered one (``random``, ``top_score``, ``near_threshold``, ``entropy``,
  ``margin``, ``k_center``, ``hybrid``) with default options; seeds 0, 1, 2.
- Aim (the issue): the best strategy reaches random's final mean metric with at most half of
  random's final label count.

    python bench/active_learning_bench.py [--datasets magnetic_tile elpv] [--seeds 0 1 2]
                                          [--quick] [--out DIR]

``--quick``: a smoke run (64 px, a subset of each split, 3 rounds, seed 0 unless --seeds), written
to /tmp/active-learning-bench-quick unless ``--out`` is given. Writes active_learning.json,
active_learning.md and active_learning.png under docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as std_platform
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from flawline.active.scoring import embed_batch  # noqa: E402
from flawline.active.strategies import PoolScores, make_strategy, strategy_names  # noqa: E402
from flawline.catalog import Catalog, upgrade  # noqa: E402
from flawline.catalog.db import make_engine  # noqa: E402
from flawline.data.ingest import import_dataset  # noqa: E402
from flawline.data.split import SplitSpec, assign_splits  # noqa: E402
from flawline.evaluate.metrics import precision_recall_f1, roc_auc  # noqa: E402
from flawline.models import create_detector  # noqa: E402
from flawline.storage import ObjectStore  # noqa: E402
from flawline.storage.local_s3 import LocalS3Server  # noqa: E402
from flawline.train.data import dataset_rows, decode_rows  # noqa: E402

METRIC = "image_auroc"
DATASETS: dict[str, dict[str, Any]] = {
    "magnetic_tile": {"layout": "magnetic-tile", "catalog_name": "magnetic-tile",
                      "source": str(REPO.parent / "shared" / "datasets" / "magnetic-tile"),
                      "stratify_by": None, "initial": 10, "min_defects": 2, "budget": 20,
                      "title": "Magnetic Tile"},
    "elpv": {"layout": "elpv", "catalog_name": "elpv", "source": None, "stratify_by": "cell_type",
             "initial": 20, "min_defects": 4, "budget": 40, "title": "ELPV"},
}
CONFIG: dict[str, Any] = {
    "split": {"train": 0.75, "val": 0.0, "test": 0.25, "seed": 0},
    "backbone": "efficientnet_lite0",
    "weights": "packaged",
    "image_size": 224,
    "embedding": "embed_batch: GAP of the extractor's deepest feature map (timm index 3), L2-normalised",
    "target_labelled_fraction": 0.40,
    "probe": {"model": "logistic regression", "standardise": "mean/std of the train split's embeddings",
              "class_weights": "balanced: n / (2 n_class)", "l2": "1/2 ||w||^2 + sum of losses (C = 1)",
              "optimiser": "L-BFGS, strong Wolfe", "lbfgs_iterations": 200, "threshold": 0.5},
    "embed_batch_size": 32,
    "decode_chunk": 256,
    "threads": 2,
}
QUICK: dict[str, Any] = {"image_size": 64, "subset": {"train": 240, "test": 120}, "rounds": 3}
BUDGET_MINUTES = 30


# ----------------------------------------------------------------------------------------- data


def import_and_split(catalog: Catalog, store: ObjectStore, key: str) -> dict[str, Any]:
    d = DATASETS[key]
    t0 = time.perf_counter()
    source = Path(d["source"]) if d["source"] else None
    # One worker: rows are inserted in the order files finish, and the seeded split goes by image id,
    # so a parallel import would give a different split on every run.
    report = import_dataset(catalog, store, source, layout=d["layout"], dataset=d["catalog_name"], workers=16)
    s = CONFIG["split"]
    counts = assign_splits(catalog, d["catalog_name"],
                           SplitSpec(train=s["train"], val=s["val"], test=s["test"], seed=s["seed"],
                                     stratify_by=d["stratify_by"]))
    return {"images": report.new_images, "split": counts, "seconds": time.perf_counter() - t0}


def stratified_subset(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """A seeded share of ``rows`` of size about ``n``, proportional per (label, stratum)."""
    strata: dict[tuple, list[dict]] = {}
    for r in rows:
        strata.setdefault((r["defect"], r["stratum"]), []).append(r)
    out = []
    for k in sorted(strata, key=str):
        group = strata[k]
        take = max(1, round(n * len(group) / len(rows)))
        out += [group[i] for i in rng.permutation(len(group))[:take]]
    return sorted(out, key=lambda r: r["image_id"])


@torch.no_grad()
def embed_rows(store: ObjectStore, rows: list[dict], size: int) -> np.ndarray:
    """The platform's pool embedding for each row, computed once: images decoded from S3 with
    ``decode_rows`` (threads), embedded with ``embed_batch`` on an unfitted detector that only lends
    it the packaged EfficientNet-Lite0 extractor and its preprocessing."""
    from concurrent.futures import ThreadPoolExecutor

    detector = create_detector("padim", backbone=CONFIG["backbone"], weights=CONFIG["weights"],
                               image_size=size, device="cpu")
    chunk, batch = CONFIG["decode_chunk"], CONFIG["embed_batch_size"]
    out = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            pieces = [part[i:i + 32] for i in range(0, len(part), 32)]
            images = np.concatenate([d["image"] for d in pool.map(lambda p: decode_rows(store, p, size), pieces)])
            x = torch.from_numpy(images)
            for b in range(0, x.shape[0], batch):
                out.append(embed_batch(detector, x[b:b + batch].float() / 255.0).numpy())
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------- probe


def fit_probe(x: torch.Tensor, y: torch.Tensor, iterations: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced, L2-penalised logistic regression by full-batch L-BFGS: (w, b)."""
    torch.manual_seed(seed)  # the fit is deterministic (zero init, L-BFGS); seeded for form's sake
    n = y.numel()
    n_pos = float(y.sum())
    weights = torch.where(y > 0.5, n / (2 * max(n_pos, 1.0)), n / (2 * max(n - n_pos, 1.0)))
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, tolerance_grad=1e-7,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w + b
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss = loss + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def predict(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    return torch.sigmoid(x @ wb[0] + wb[1]).numpy()


# ----------------------------------------------------------------------------------------- loop


def initial_set(labels: np.ndarray, strata: np.ndarray, n: int, min_defects: int, seed: int) -> np.ndarray:
    """Positions (in the train split) of a seeded random sample of ``n`` images stratified by label
    and stratum, with at least ``min_defects`` defective ones."""
    rng = np.random.default_rng(seed)
    n_def = min(int(labels.sum()), max(min_defects, round(n * labels.mean())))
    picks: list[int] = []
    for is_defect, want in ((True, n_def), (False, n - n_def)):
        idx = np.flatnonzero(labels == is_defect)
        groups = {s: idx[strata[idx] == s] for s in sorted(set(strata[idx].tolist()))}
        quota = {s: want * len(g) / len(idx) for s, g in groups.items()}
        alloc = {s: int(math.floor(q)) for s, q in quota.items()}
        for s in sorted(quota, key=lambda s: quota[s] - alloc[s], reverse=True)[: want - sum(alloc.values())]:
            alloc[s] += 1  # largest remainder
        for s, g in groups.items():
            picks += rng.choice(g, size=alloc[s], replace=False).tolist()
    return np.array(sorted(picks), dtype=np.int64)


def evaluate(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    m = precision_recall_f1(y, p, 0.5)
    return {"metric": roc_auc(y, p), "accuracy": m["accuracy"], "f1": m["f1"]}


def run_curve(strategy: str, data: dict[str, Any], seed: int, rounds: int, budget: int,
              initial: np.ndarray) -> dict[str, list]:
    """One simulated active-learning run; returns per evaluation point labels, metrics, defects."""
    strat = make_strategy(strategy)
    ids, emb, xs, y = data["train_ids"], data["train_emb"], data["train_x"], data["train_y"]
    labelled = np.zeros(len(ids), dtype=bool)
    labelled[initial] = True
    curve: dict[str, list] = {"labels": [], "metric": [], "accuracy": [], "f1": [], "defects": [],
                              "select_seconds": []}
    y_t = torch.from_numpy(y.astype(np.float64))
    position = {int(i): k for k, i in enumerate(ids)}
    for rnd in range(rounds + 1):
        lab = np.flatnonzero(labelled)
        wb = fit_probe(xs[lab], y_t[lab], CONFIG["probe"]["lbfgs_iterations"], seed * 1000 + rnd)
        m = evaluate(predict(data["test_x"], wb), data["test_y"])
        curve["labels"].append(int(lab.size))
        curve["defects"].append(int(y[lab].sum()))
        for k in ("metric", "accuracy", "f1"):
            curve[k].append(float(m[k]))
        pool = np.flatnonzero(~labelled)
        if rnd == rounds or pool.size == 0:
            break
        p = predict(xs[pool], wb).astype(np.float64)
        scores = PoolScores(image_ids=ids[pool], scores=p, probs=np.stack([1.0 - p, p], axis=1),
                            embeddings=emb[pool], threshold=CONFIG["probe"]["threshold"])
        t0 = time.perf_counter()
        sel = strat.select(scores, min(budget, pool.size), labelled_embeddings=emb[lab], seed=seed * 1000 + rnd)
        curve["select_seconds"].append(time.perf_counter() - t0)
        picked = [position[int(i)] for i in sel.image_ids]
        if labelled[picked].any() or len(set(picked)) != len(picked):
            raise RuntimeError(f"{strategy} picked an image twice or one already labelled")
        labelled[picked] = True
    return curve


def prepare(store: ObjectStore, catalog: Catalog, key: str, cfg: dict[str, Any], quick: bool) -> dict[str, Any]:
    rows = [r for r in dataset_rows(catalog, DATASETS[key]["catalog_name"]) if r["defect"] is not None]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    if quick:
        rng = np.random.default_rng(0)
        train = stratified_subset(train, QUICK["subset"]["train"], rng)
        test = stratified_subset(test, QUICK["subset"]["test"], rng)
    t0 = time.perf_counter()
    emb = embed_rows(store, train + test, cfg["image_size"])
    embed_s = time.perf_counter() - t0
    train_emb, test_emb = emb[:len(train)], emb[len(train):]
    # standardise with the train split's statistics (label-free: every train image is in the pool)
    mean, std = train_emb.mean(0, keepdims=True), train_emb.std(0, keepdims=True) + 1e-6
    to_x = lambda e: torch.from_numpy(((e - mean) / std).astype(np.float64))  # noqa: E731
    return {
        "train_ids": np.array([r["image_id"] for r in train], dtype=np.int64),
        "train_emb": train_emb, "train_x": to_x(train_emb),
        "train_y": np.array([bool(r["defect"]) for r in train]),
        "train_strata": np.array([r["stratum"] or "" for r in train]),
        "test_x": to_x(test_emb), "test_y": np.array([bool(r["defect"]) for r in test]),
        "embed_seconds": embed_s, "embedding_dim": int(emb.shape[1]),
        "counts": {"train": len(train), "train_defects": sum(bool(r["defect"]) for r in train),
                   "test": len(test), "test_defects": sum(bool(r["defect"]) for r in test)},
    }


# -------------------------------------------------------------------------------------- summary


def reach(labels: list[int], metric: list[float], target: float) -> int | None:
    for n, m in zip(labels, metric):
        if m >= target - 1e-12:
            return n
    return None


def aggregate(curves: dict[int, dict[str, list]]) -> dict[str, Any]:
    seeds = sorted(curves)
    length = min(len(curves[s]["labels"]) for s in seeds)
    labels = curves[seeds[0]]["labels"][:length]
    if any(curves[s]["labels"][:length] != labels for s in seeds):
        raise RuntimeError("label counts differ between seeds")
    out: dict[str, Any] = {"labels": labels}
    for k in ("metric", "accuracy", "f1", "defects"):
        arr = np.array([curves[s][k][:length] for s in seeds], dtype=np.float64)
        out[k] = [round(float(v), 5) for v in arr.mean(0)]
        out[f"{k}_std"] = [round(float(v), 5) for v in arr.std(0)]
    out["metric_name"] = METRIC
    out["per_seed"] = {str(s): [round(float(v), 5) for v in curves[s]["metric"][:length]] for s in seeds}
    out["per_seed_accuracy"] = {str(s): [round(float(v), 5) for v in curves[s]["accuracy"][:length]] for s in seeds}
    out["per_seed_f1"] = {str(s): [round(float(v), 5) for v in curves[s]["f1"][:length]] for s in seeds}
    return out


def summarise(result: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rnd = result["random"]
    final_labels, final_metric = rnd["labels"][-1], rnd["metric"][-1]
    to_reach = {s: reach(c["labels"], c["metric"], final_metric) for s, c in result.items()}
    others = [s for s in result if s != "random"]
    reached = [s for s in others if to_reach[s] is not None]
    if reached:
        best = min(reached, key=lambda s: (to_reach[s], -float(np.mean(result[s]["metric"]))))
        best_by = "chosen as the one needing the fewest labels to reach random's final mean metric"
    else:
        best = max(others, key=lambda s: result[s]["metric"][-1])
        best_by = "no strategy reached random's final mean metric; chosen by its highest final mean metric"
    best_n = to_reach[best]
    # the same question per seed: the best strategy's seed curve against that seed's random curve
    per_seed = {}
    for seed, curve in result[best]["per_seed"].items():
        target = rnd["per_seed"][seed][-1]
        per_seed[seed] = reach(result[best]["labels"], curve, target)
    return {
        "random_final_labels": final_labels, "random_final_metric": final_metric,
        "random_final_metric_std": rnd["metric_std"][-1],
        "best_strategy": best, "best_by": best_by,
        "best_final_metric": result[best]["metric"][-1],
        "labels_to_reach_random_final": to_reach,
        "best_labels_to_reach_random_final_per_seed": per_seed,
        "half_random_final_labels": final_labels / 2,
        "aim_met": best_n is not None and best_n <= final_labels / 2,
        "aim_met_per_seed": {s: n is not None and n <= final_labels / 2 for s, n in per_seed.items()},
    }


# ---------------------------------------------------------------------------------------- output

# entropy, margin and near_threshold (threshold 0.5) rank a binary pool alike: distinct dashes keep
# coinciding curves visible
LINESTYLES = {"random": "--", "margin": (0, (1, 1.5)), "near_threshold": (0, (4, 2, 1, 2))}
COLOURS = {"random": "black", "top_score": "tab:red", "near_threshold": "tab:orange", "entropy": "tab:green",
           "margin": "tab:olive", "k_center": "tab:blue", "hybrid": "tab:purple"}


def write_plot(out: Path, result: dict[str, Any], datasets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.6), squeeze=False)
    for ax, key in zip(axes[0], datasets):
        curves, summ, counts = result[key], result["summary"][key], result["config"]["datasets"][key]["counts"]
        for strategy, c in curves.items():
            xs, ys, sd = np.array(c["labels"]), np.array(c["metric"]), np.array(c["metric_std"])
            style = dict(color=COLOURS.get(strategy), linewidth=2.0 if strategy == "random" else 1.4,
                         linestyle=LINESTYLES.get(strategy, "-"))
            ax.plot(xs, ys, label=strategy, **style)
            ax.fill_between(xs, ys - sd, ys + sd, color=COLOURS.get(strategy), alpha=0.10, linewidth=0)
        ax.axhline(summ["random_final_metric"], color="gray", linewidth=1, linestyle=":",
                   label=f"random's final ({summ['random_final_metric']:.3f} at {summ['random_final_labels']})")
        ax.axvline(summ["half_random_final_labels"], color="gray", linewidth=0.8, linestyle="-.",
                   label=f"half random's labels ({summ['half_random_final_labels']:g})")
        ax.set_xlabel("labelled images (acquired + initial)")
        ax.set_ylabel("test image ROC-AUC (mean ± std over seeds)")
        ax.set_title(f"{DATASETS[key]['title']}: train pool {counts['train']}, test {counts['test']} "
                     f"({counts['test_defects']} defective)", fontsize=10)
        lo = min(min(np.array(c["metric"]) - np.array(c["metric_std"])) for c in curves.values())
        hi = max(max(np.array(c["metric"]) + np.array(c["metric_std"])) for c in curves.values())
        ax.set_ylim(max(0.0, lo - 0.01), min(1.0, hi + 0.01))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle("Active learning: logistic probe on frozen EfficientNet-Lite0 embeddings, "
                 f"seeds {', '.join(map(str, result['config']['seeds']))}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def pick_columns(labels: list[int]) -> list[int]:
    n = len(labels)
    return sorted({0, n // 8, n // 4, n // 2, (3 * n) // 4, n - 1})


def fmt_n(n: int | None) -> str:
    return "not reached" if n is None else str(n)


def write_markdown(out: Path, result: dict[str, Any], datasets: list[str]) -> None:
    cfg = result["config"]
    secs = result["seconds"]
    lines = ["# Active learning: learning curves per query strategy against random", "",
             (f"Measured {result['measured_at']} on {result['machine']['cpus']} CPU cores (no GPU), "
              f"{secs['total'] / 60:.1f} min in all; seeds {', '.join(map(str, cfg['seeds']))}; "
              f"strategies: {', '.join(cfg['strategies'])}."
              + (" **Quick smoke run: the figures mean nothing.**" if result["quick"] else "")), "",
             "Aim (the issue): the best strategy reaches random's final mean test metric with at most half "
             "of random's final label count.", "",
             "## Protocol", ""]
    lines += [f"- {p}" for p in result["protocol"]] + [""]
    for key in datasets:
        curves, summ = result[key], result["summary"][key]
        counts = cfg["datasets"][key]["counts"]
        d = cfg["datasets"][key]
        labels = curves["random"]["labels"]
        cols = pick_columns(labels)
        verdict = "**met**" if summ["aim_met"] else "**not met**"
        best, best_n = summ["best_strategy"], summ["labels_to_reach_random_final"][summ["best_strategy"]]
        lines += [f"## {DATASETS[key]['title']}", "",
                  (f"Train pool {counts['train']} images ({counts['train_defects']} defective), test "
                   f"{counts['test']} ({counts['test_defects']} defective). Initial labelled set "
                   f"{d['initial']} (at least {d['min_defects']} defective), {d['budget']} a round, "
                   f"{d['rounds']} rounds: {labels[-1]} labels at the end "
                   f"({100 * labels[-1] / counts['train']:.0f} % of the train split)."), "",
                  (f"Aim {verdict}: random ends at image ROC-AUC {summ['random_final_metric']:.4f} "
                   f"(± {summ['random_final_metric_std']:.4f} over seeds) with {summ['random_final_labels']} "
                   f"labels; half of that is {summ['half_random_final_labels']:g}. The best strategy, "
                   f"`{best}` ({summ['best_by']}), "
                   + (f"reaches it at {best_n} labels" if best_n is not None else "does not reach it")
                   + f" and ends at {summ['best_final_metric']:.4f}. Per seed (its curve against that "
                   "seed's random final): "
                   + ", ".join(f"seed {s}: {fmt_n(n)}" for s, n in
                               summ["best_labels_to_reach_random_final_per_seed"].items()) + "."), "",
                  "Test image ROC-AUC, mean ± std over seeds, at these label counts; the last columns: labels "
                  "needed to reach random's final mean, and final accuracy / F1 at p >= 0.5:", "",
                  "| strategy | " + " | ".join(str(labels[i]) for i in cols)
                  + " | labels to reach random's final | final acc / F1 |",
                  "|---|" + "---|" * (len(cols) + 2)]
        for strategy, c in curves.items():
            cells = [f"{c['metric'][i]:.3f} ± {c['metric_std'][i]:.3f}" for i in cols]
            n = summ["labels_to_reach_random_final"][strategy]
            name = f"**{strategy}**" if strategy == best else strategy
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt_n(n)} | "
                         f"{100 * c['accuracy'][-1]:.1f} % / {c['f1'][-1]:.3f} |")
        lines += ["", "Defective images in the labelled set (mean over seeds) at the same label counts:", "",
                  "| strategy | " + " | ".join(str(labels[i]) for i in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for strategy, c in curves.items():
            lines.append(f"| {strategy} | " + " | ".join(f"{c['defects'][i]:.1f}" for i in cols) + " |")
        lines.append("")
    lines += ["## Timings", "", "| dataset | import + split | embeddings | AL loop (all strategies, seeds) |",
              "|---|---|---|---|"]
    for key in datasets:
        s = secs[key]
        lines.append(f"| {DATASETS[key]['title']} | {s['import']:.1f} s | {s['embed']:.1f} s "
                     f"({s['embed_images']} images, {s['embed_images'] / max(s['embed'], 1e-9):.1f} img/s) | "
                     f"{s['loop']:.1f} s |")
    lines += ["", f"Total {secs['total']:.1f} s (S3 server start included).", "",
              "## Notes", ""] + [f"- {n}" for n in result["notes"]] + ["",
              "## Config", "", "```json", json.dumps(cfg, indent=2), "```", "",
              "![learning curves per strategy](active_learning.png)", ""]
    out.write_text("\n".join(lines))


def notes_for(result: dict[str, Any], datasets: list[str]) -> list[str]:
    notes = [
        "The model is a linear probe on frozen ImageNet features, chosen so that "
        f"{len(datasets)} datasets × {len(result['config']['strategies'])} strategies × "
        f"{len(result['config']['seeds'])} seeds × about 20 rounds fit on 2 CPU cores; the platform's "
        "trained detectors and classifiers would rank differently, and so might the strategies. Absolute "
        "ROC-AUCs are those of a frozen-feature probe, not of the platform's best models.",
        "The platform's loop around the strategies (Label Studio round trips, scoring and retraining as "
        "Ray jobs) is exercised by the tests, not by this benchmark: here the oracle is the imported ground "
        "truth and everything runs in one process.",
        "Embeddings are computed once per image, so they do not improve as labels arrive: the diversity "
        "strategies (k_center, hybrid) see the same geometry in every round.",
        "Curves are means over seeds of one fixed test split; the initial set differs per seed, the test "
        "split does not. The std band is over seeds only.",
    ]
    for key in datasets:
        summ, title = result["summary"][key], DATASETS[key]["title"]
        same: dict[str, list[str]] = {}
        for strategy, c in result[key].items():
            same.setdefault(json.dumps(c["per_seed"], sort_keys=True), []).append(strategy)
        for group in (g for g in same.values() if len(g) > 1):
            why = (" with a binary probe, probs = [1 - p, p] and threshold 0.5, entropy, margin and "
                   "near_threshold all rank the pool by |p - 0.5|, so they pick the same images"
                   if set(group) <= {"entropy", "margin", "near_threshold"} else "")
            notes.append(f"{title}: {', '.join(group)} gave identical curves for every seed{':' if why else ''}"
                         f"{why}.")
        n_rand = summ["labels_to_reach_random_final"]["random"]
        if n_rand is not None and n_rand < summ["random_final_labels"]:
            notes.append(f"{title}: random's own mean curve first reaches its final value at {n_rand} labels "
                         f"(of {summ['random_final_labels']}): the curve is "
                         + ("flat at the end, so the aim is easier to meet than it sounds."
                            if n_rand <= summ["half_random_final_labels"] else "not monotone at the end."))
        per_seed = summ["aim_met_per_seed"]
        if len(set(per_seed.values())) > 1:
            met = [s for s, ok in per_seed.items() if ok]
            missed = [s for s, ok in per_seed.items() if not ok]
            counts = ", ".join(f"seed {s}: {fmt_n(n)}" for s, n in
                               summ["best_labels_to_reach_random_final_per_seed"].items())
            notes.append(f"{title}: seed by seed (the best strategy's curve against the same seed's random "
                         f"final), the aim is met for seed(s) {', '.join(met)} and not for {', '.join(missed)} "
                         f"({counts}; half is {summ['half_random_final_labels']:g}): one seed's verdict is "
                         "not to be trusted on its own.")
        curves = result[key]
        hunter = max(curves, key=lambda s: curves[s]["defects"][-1])
        rank = sorted(curves, key=lambda s: -curves[s]["metric"][-1]).index(hunter) + 1
        notes.append(f"{title}: {hunter} labels the most defective images ({curves[hunter]['defects'][-1]:.0f} "
                     f"of {curves[hunter]['labels'][-1]} at the end, random {curves['random']['defects'][-1]:.0f}) "
                     f"and ranks {rank} of {len(curves)} by final ROC-AUC: finding defects and improving the "
                     "ranking of the test set are different goals.")
    if not result["quick"] and result["seconds"]["total"] > BUDGET_MINUTES * 60:
        notes.append(f"This run took {result['seconds']['total'] / 60:.1f} min, over the {BUDGET_MINUTES}-minute "
                     "budget (2 cores shared with other work).")
    notes.append("Machine shared with other work while it ran: seconds are indicative.")
    return notes


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--strategies", nargs="+", default=None, help="default: every registered strategy")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 px, subsets, 3 rounds; output to /tmp")
    p.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the S3 server
    torch.set_num_threads(CONFIG["threads"])
    out = args.out or (Path(tempfile.gettempdir()) / "active-learning-bench-quick" if args.quick
                       else REPO / "docs" / "benchmarks")
    cfg = json.loads(json.dumps(CONFIG))
    if args.quick:
        cfg["image_size"] = QUICK["image_size"]
        cfg["quick"] = QUICK
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    strategies = args.strategies or strategy_names()
    if "random" not in strategies:
        strategies = ["random", *strategies]
    strategies = ["random"] + [s for s in strategies if s != "random"]
    cfg.update(seeds=seeds, strategies=strategies, datasets={})

    started = time.perf_counter()
    result: dict[str, Any] = {}
    seconds: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flawline-al-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = LocalS3Server.on_free_ports(tmp / "s3")
        server.start(timeout=90)
        try:
            url = f"sqlite:///{tmp / 'catalog.db'}"
            upgrade(make_engine(url))
            catalog = Catalog(url)
            store = ObjectStore(server.endpoint, server.access_key, server.secret_key, "al-bench")
            store.ensure_bucket()
            for key in args.datasets:
                d = DATASETS[key]
                imp = import_and_split(catalog, store, key)
                print(f"[{time.perf_counter() - started:6.0f}s] {key}: imported {imp['images']} images in "
                      f"{imp['seconds']:.1f}s; split {imp['split']}", flush=True)
                data = prepare(store, catalog, key, cfg, args.quick)
                n_train = data["counts"]["train"]
                print(f"[{time.perf_counter() - started:6.0f}s] {key}: embedded "
                      f"{n_train + data['counts']['test']} images ({data['embedding_dim']}-d) in "
                      f"{data['embed_seconds']:.1f}s", flush=True)
                rounds = (QUICK["rounds"] if args.quick else
                          max(1, round((cfg["target_labelled_fraction"] * n_train - d["initial"]) / d["budget"])))
                cfg["datasets"][key] = {"layout": d["layout"], "stratify_by": d["stratify_by"],
                                        "initial": d["initial"], "min_defects": d["min_defects"],
                                        "budget": d["budget"], "rounds": rounds, "counts": data["counts"],
                                        "split": imp["split"], "embedding_dim": data["embedding_dim"]}
                initial = {s: initial_set(data["train_y"], data["train_strata"], d["initial"], d["min_defects"], s)
                           for s in seeds}
                t_loop = time.perf_counter()
                result[key] = {}
                for strategy in strategies:
                    curves = {}
                    for seed in seeds:
                        t0 = time.perf_counter()
                        curves[seed] = run_curve(strategy, data, seed, rounds, d["budget"], initial[seed])
                        c = curves[seed]
                        print(f"[{time.perf_counter() - started:6.0f}s] {key} {strategy:>14} seed {seed}: "
                              f"{METRIC} {c['metric'][0]:.3f} @ {c['labels'][0]} -> {c['metric'][-1]:.3f} @ "
                              f"{c['labels'][-1]} labels ({c['defects'][-1]} defective), "
                              f"{time.perf_counter() - t0:.1f}s", flush=True)
                    result[key][strategy] = aggregate(curves)
                seconds[key] = {"import": round(imp["seconds"], 1), "embed": round(data["embed_seconds"], 1),
                                "embed_images": n_train + data["counts"]["test"],
                                "loop": round(time.perf_counter() - t_loop, 1)}
            catalog.dispose()
        finally:
            server.stop()
    seconds["total"] = round(time.perf_counter() - started, 1)

    result["summary"] = {key: summarise(result[key]) for key in args.datasets}
    result["config"] = cfg
    result["protocol"] = [line.strip() for line in _protocol_lines()]
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                         "python": std_platform.python_version(), "system": std_platform.platform()}
    result["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["seconds"] = seconds
    result["quick"] = args.quick
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    result["notes"] = notes_for(result, args.datasets)
    out.mkdir(parents=True, exist_ok=True)
    (out / "active_learning.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "active_learning.md", result, args.datasets)
    write_plot(out / "active_learning.png", result, args.datasets)
    for key in args.datasets:
        s = result["summary"][key]
        print(f"{key}: random {s['random_final_metric']:.4f} @ {s['random_final_labels']} labels; best "
              f"{s['best_strategy']} reaches it @ {s['labels_to_reach_random_final'][s['best_strategy']]}; "
              f"aim met: {s['aim_met']}", flush=True)
    print(f"wrote {out / 'active_learning.json'}, .md, .png in {seconds['total'] / 60:.1f} min", flush=True)


def _protocol_lines() -> list[str]:
    """The protocol bullets of the module docstring, one string each (the Markdown repeats them)."""
    text = (__doc__ or "").split("Protocol (the oracle is the imported ground truth):", 1)[1]
    text = text.split("    python bench/", 1)[0]
    bullets, current = [], ""
    for line in text.splitlines():
        if line.startswith("- "):
            if current:
                bullets.append(current)
            current = line[2:].strip()
        elif line.strip() and current:
            current += " " + line.strip()
    if current:
        bullets.append(current)
    return bullets


if __name__ == "__main__":
    main()
