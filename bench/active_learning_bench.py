"""Active-learning benchmark: learning curves of every registered query strategy against random on
Magnetic Tile and ELPV, 3 seeds.

Protocol (the oracle is the imported ground truth):

- Data: each set is imported whole with the platform's importer (``import_dataset``, layouts
  ``magnetic-tile`` and ``elpv``) into a fresh local S3 server (SeaweedFS, in a temp dir) and a
  SQLite catalog (16 parallel uploads; the seeded split follows image content, so it is the same on every run),
  then split once with ``assign_splits``: seeded (0) 75 % train / 25 % test,
  stratified by label and defect class (and cell type for ELPV). The test split is fixed: the same
  for every strategy and seed. ELPV: defect probability >= 0.5 is defective.
- Model: the loop's own, the ``mixed`` detector (``flawline.models.mixed``) on a PaDiM base at
  224 px. Per seed the train split is cut in two seeded halves: the base is fitted on one half
  (unlabelled: the label-free model of the loop's round 0, cross-fitted to leave the half's 20 %
  most anomalous images out, as the platform's ``mixed`` setting does with an unlabelled pool; its
  normal statistics from a tenth of that half held back), and the other half is the pool people
  label. Head inputs (base score,
  pooled features, patch features) are computed ONCE per image and seed, and every round refits
  the head on them (``MixedDetector.fit_head``: cross-validated choice of z, embedding and patch
  contrast; defects with their masks where the dataset has them), the threshold with
  ``flawline.train.mixed.head_threshold`` (out-of-fold balanced accuracy; with no labelled defect
  the 0.99-quantile of the held-back images).
- Metric: image ROC-AUC on the test split (``image_auroc``); accuracy and F1 of the defective class
  at the model's threshold are recorded too.
- Loop, per (dataset, strategy, seed): no labels at the start. Each round: evaluate the current
  model on test, score the unlabelled pool (scores = the head's logit, probs = sigmoid of the logit
  minus the threshold, embeddings = the L2-normalised pooled features, threshold), let the
  strategy pick ``budget`` images (labelled_embeddings = the labelled set's, seed = seed * 1000 +
  round), add them with their true labels (and masks), refit the head. Budget: 20 a round on
  Magnetic Tile, 40 on ELPV, ``rounds`` rounds; the model is evaluated after the last acquisition
  too.
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

from flawline.active.strategies import PoolScores, make_strategy, strategy_names  # noqa: E402
from flawline.catalog import Catalog, upgrade  # noqa: E402
from flawline.catalog.db import make_engine  # noqa: E402
from flawline.data.ingest import import_dataset  # noqa: E402
from flawline.data.records import ImageRecord, image_records  # noqa: E402
from flawline.data.split import SplitSpec, assign_splits  # noqa: E402
from flawline.models import create_detector  # noqa: E402
from flawline.models.mixed import HeadInputs, MixedDetector  # noqa: E402
from flawline.storage import ObjectStore  # noqa: E402
from flawline.storage.local_s3 import LocalS3Server  # noqa: E402
from flawline.train.data import decode_all, to_model  # noqa: E402
from flawline.train.mixed import head_threshold  # noqa: E402

METRIC = "image_auroc"
DATASETS: dict[str, dict[str, Any]] = {
    "magnetic_tile": {"layout": "magnetic-tile", "catalog_name": "magnetic-tile",
                      "source": str(REPO.parent / "shared" / "datasets" / "magnetic-tile"),
                      "stratify_by": None, "budget": 20,
                      "title": "Magnetic Tile"},
    "elpv": {"layout": "elpv", "catalog_name": "elpv", "source": None, "stratify_by": "cell_type",
             "budget": 40, "title": "ELPV"},
}
CONFIG: dict[str, Any] = {
    "split": {"train": 0.75, "val": 0.0, "test": 0.25, "seed": 0},
    "backbone": "efficientnet_lite0",
    "weights": "packaged",
    "image_size": 224,
    "model": "mixed (flawline.models.mixed) on the base below; head refitted every round on cached inputs",
    "base": "padim",
    "base_share": 0.5,
    "trim": 0.2,
    "rounds": 6,
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


def stratified_subset(rows: list[ImageRecord], n: int, rng: np.random.Generator) -> list[ImageRecord]:
    """A seeded share of ``rows`` of size about ``n``, proportional per (label, stratum)."""
    strata: dict[tuple, list[dict]] = {}
    for r in rows:
        strata.setdefault((r.defect, r.stratum), []).append(r)
    out = []
    for k in sorted(strata, key=str):
        group = strata[k]
        take = max(1, round(n * len(group) / len(rows)))
        out += [group[i] for i in rng.permutation(len(group))[:take]]
    return sorted(out, key=lambda r: r.image_id)


def head_inputs(det: MixedDetector, decoded: dict[str, np.ndarray], idx: np.ndarray, batch: int = 32) -> HeadInputs:
    parts = []
    for b in range(0, len(idx), batch):
        sel = idx[b:b + batch]
        batch = to_model({k: decoded[k][sel] for k in ("image", "mask", "has_mask")})
        parts.append(det.head_inputs(batch["image"], batch["mask"], batch["has_mask"]))
    return HeadInputs.concat(parts)


def prepare_seed(decoded: dict[str, np.ndarray], y: np.ndarray, train: np.ndarray, test: np.ndarray,
                 cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """The label-free model of one seed and the cached head inputs of its pool and the test split."""
    rng = np.random.default_rng([seed, 3])
    order = train[rng.permutation(len(train))]
    half = order[:round(cfg["base_share"] * len(order))]
    pool = np.sort(order[len(half):])
    held, fit = half[:max(10, len(half) // 10)], half[max(10, len(half) // 10):]
    det = create_detector("mixed", base_method=cfg["base"], backbone=cfg["backbone"], weights=cfg["weights"],
                          image_size=cfg["image_size"], batch_size=32, seed=seed, trim=cfg["trim"])
    t0 = time.perf_counter()
    det.fit(to_model({"image": decoded["image"][fit]})["image"])
    h_held = head_inputs(det, decoded, held)
    det.set_normal_stats(h_held.scores, h_held.patch_map)
    h_pool, h_test = head_inputs(det, decoded, pool), head_inputs(det, decoded, test)
    return {"det": det, "held_z": det.z(h_held.scores), "pool": h_pool, "pool_y": y[pool],
            "pool_ids": pool.astype(np.int64), "test": h_test, "test_y": y[test],
            "seconds": time.perf_counter() - t0}


def evaluate(det: MixedDetector, data: dict[str, Any]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    scores, _ = det.scores_from_inputs(data["test"])
    verdict = scores >= det.threshold.value
    y = data["test_y"]
    return {"metric": float(roc_auc_score(y, scores)), "accuracy": float(accuracy_score(y, verdict)),
            "f1": float(f1_score(y, verdict, zero_division=0))}


def run_curve(strategy: str, data: dict[str, Any], seed: int, rounds: int, budget: int) -> dict[str, list]:
    """One simulated active-learning run from no labels; per evaluation point labels, metrics, defects."""
    strat, det = make_strategy(strategy), data["det"]
    pool, y, ids = data["pool"], data["pool_y"], data["pool_ids"]
    emb = pool.pooled / np.linalg.norm(pool.pooled, axis=1, keepdims=True)
    labelled = np.zeros(len(ids), dtype=bool)
    curve: dict[str, list] = {"labels": [], "metric": [], "accuracy": [], "f1": [], "defects": [],
                              "select_seconds": [], "head": []}
    for rnd in range(rounds + 1):
        lab = np.flatnonzero(labelled)
        normal, defects = lab[~y[lab]], lab[y[lab]]
        fitted = det.fit_head(pool.take(normal), pool.take(defects))
        det.set_threshold(head_threshold(fitted, data["held_z"] if not len(normal) else det.z(pool.scores[normal]),
                                         len(defects)))
        m = evaluate(det, data)
        curve["labels"].append(int(lab.size))
        curve["defects"].append(int(y[lab].sum()))
        curve["head"].append(fitted["chosen"])
        for k in ("metric", "accuracy", "f1"):
            curve[k].append(float(m[k]))
        left = np.flatnonzero(~labelled)
        if rnd == rounds or left.size == 0:
            break
        logit, _ = det.scores_from_inputs(pool.take(left))
        p = 1.0 / (1.0 + np.exp(-(logit - det.threshold.value)))
        scores = PoolScores(image_ids=ids[left], scores=logit, probs=np.stack([1.0 - p, p], axis=1),
                            embeddings=emb[left], threshold=float(det.threshold.value))
        t0 = time.perf_counter()
        sel = strat.select(scores, min(budget, left.size), labelled_embeddings=emb[lab] if lab.size else None,
                           seed=seed * 1000 + rnd)
        curve["select_seconds"].append(time.perf_counter() - t0)
        position = {int(i): k for k, i in enumerate(ids)}
        picked = [position[int(i)] for i in sel.image_ids]
        if labelled[picked].any() or len(set(picked)) != len(picked):
            raise RuntimeError(f"{strategy} picked an image twice or one already labelled")
        labelled[picked] = True
    return curve


def prepare(store: ObjectStore, catalog: Catalog, key: str, cfg: dict[str, Any], quick: bool) -> dict[str, Any]:
    rows = [r for r in image_records(catalog, DATASETS[key]["catalog_name"]) if r.defect is not None]
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    if quick:
        rng = np.random.default_rng(0)
        train = stratified_subset(train, QUICK["subset"]["train"], rng)
        test = stratified_subset(test, QUICK["subset"]["test"], rng)
    t0 = time.perf_counter()
    decoded = decode_all(store, train + test, cfg["image_size"], workers=8)
    y = np.array([bool(r.defect) for r in train + test])
    return {"decoded": decoded, "y": y, "train": np.arange(len(train)),
            "test": np.arange(len(train), len(train) + len(test)),
            "decode_seconds": time.perf_counter() - t0,
            "counts": {"train": len(train), "train_defects": sum(bool(r.defect) for r in train),
                       "test": len(test), "test_defects": sum(bool(r.defect) for r in test)}}


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
        ax.set_xlabel("labelled images (from none)")
        ax.set_ylabel("test image ROC-AUC (mean ± std over seeds)")
        ax.set_title(f"{DATASETS[key]['title']}: train pool {counts['train']}, test {counts['test']} "
                     f"({counts['test_defects']} defective)", fontsize=10)
        lo = min(min(np.array(c["metric"]) - np.array(c["metric_std"])) for c in curves.values())
        hi = max(max(np.array(c["metric"]) + np.array(c["metric_std"])) for c in curves.values())
        ax.set_ylim(max(0.0, lo - 0.01), min(1.0, hi + 0.01))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle(f"Active learning with the loop's model (mixed on {result['config']['base']}), from no labels, "
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
             (f"Last run {result['measured_at']} on {result['machine']['cpus']} CPU cores (no GPU), "
              f"{secs['total'] / 60:.1f} min (each dataset below says when it was measured); seeds {', '.join(map(str, cfg['seeds']))}; "
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
                  f"Measured {result.get('measured_per_dataset', {}).get(key, result['measured_at'])}.", "",
                  (f"Train pool {counts['train']} images ({counts['train_defects']} defective), test "
                   f"{counts['test']} ({counts['test_defects']} defective); half of the train split is the "
                   f"pool. No labels at the start, {d['budget']} a round, "
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
                  "needed to reach random's final mean, and final accuracy / F1 at the model's threshold:", "",
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
    lines += ["## Timings", "", "| dataset | import + split | decode, base fits, head inputs | AL loop (all strategies, seeds) |",
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
        "The model is the loop's own (mixed supervision on the label-free base). Unlike the platform's loop, "
        "the base is not refitted as the pool shrinks: it is fitted once per seed on the half of the train "
        "split that is not the pool, so only the head learns from the labels (the platform refits both).",
        "The platform's loop around the strategies (Label Studio round trips, scoring and retraining as "
        "Ray jobs) is exercised by the tests, not by this benchmark: here the oracle is the imported ground "
        "truth and everything runs in one process.",
        "Embeddings (pooled features of the base's backbone) are computed once per image and seed, so they "
        "do not improve as labels arrive: the diversity strategies (k_center, hybrid) see the same geometry "
        "in every round.",
        "Curves are means over seeds of one fixed test split; the pool and the base differ per seed, the "
        "test split does not. The std band is over seeds only.",
    ]
    for key in datasets:
        summ, title = result["summary"][key], DATASETS[key]["title"]
        same: dict[str, list[str]] = {}
        for strategy, c in result[key].items():
            same.setdefault(json.dumps(c["per_seed"], sort_keys=True), []).append(strategy)
        for group in (g for g in same.values() if len(g) > 1):
            why = (" with probs = [1 - p, p] centred on the threshold, entropy, margin and near_threshold all "
                   "rank the pool by the distance of the logit to the threshold, so they pick the same images"
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
                print(f"[{time.perf_counter() - started:6.0f}s] {key}: decoded "
                      f"{n_train + data['counts']['test']} images in {data['decode_seconds']:.1f}s", flush=True)
                rounds = QUICK["rounds"] if args.quick else cfg["rounds"]
                cfg["datasets"][key] = {"layout": d["layout"], "stratify_by": d["stratify_by"],
                                        "budget": d["budget"], "rounds": rounds, "counts": data["counts"],
                                        "split": imp["split"]}
                t_loop, fit_s = time.perf_counter(), 0.0
                per_seed = {}
                for seed in seeds:
                    per_seed[seed] = prepare_seed(data["decoded"], data["y"], data["train"], data["test"], cfg, seed)
                    fit_s += per_seed[seed]["seconds"]
                    print(f"[{time.perf_counter() - started:6.0f}s] {key} seed {seed}: label-free base fitted and "
                          f"head inputs cached in {per_seed[seed]['seconds']:.0f}s", flush=True)
                result[key] = {}
                for strategy in strategies:
                    curves = {}
                    for seed in seeds:
                        t0 = time.perf_counter()
                        curves[seed] = run_curve(strategy, per_seed[seed], seed, rounds, d["budget"])
                        c = curves[seed]
                        print(f"[{time.perf_counter() - started:6.0f}s] {key} {strategy:>14} seed {seed}: "
                              f"{METRIC} {c['metric'][0]:.3f} @ {c['labels'][0]} -> {c['metric'][-1]:.3f} @ "
                              f"{c['labels'][-1]} labels ({c['defects'][-1]} defective; head {c['head'][-1]}), "
                              f"{time.perf_counter() - t0:.1f}s", flush=True)
                    result[key][strategy] = aggregate(curves)
                seconds[key] = {"import": round(imp["seconds"], 1), "embed": round(data["decode_seconds"] + fit_s, 1),
                                "embed_images": n_train + data["counts"]["test"],
                                "loop": round(time.perf_counter() - t_loop - fit_s, 1)}
            catalog.dispose()
        finally:
            server.stop()
    seconds["total"] = round(time.perf_counter() - started, 1)

    result["summary"] = {key: summarise(result[key]) for key in args.datasets}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    measured = {key: now for key in args.datasets}
    shown = list(args.datasets)
    previous = out / "active_learning.json"
    if previous.exists() and not args.quick:  # datasets not run now keep their last measurement, dated
        old = json.loads(previous.read_text())
        for key in [k for k in DATASETS if k not in args.datasets and k in old]:
            result[key], result["summary"][key] = old[key], old["summary"][key]
            cfg["datasets"][key] = old["config"]["datasets"][key]
            seconds[key] = old.get("seconds", {}).get(key)
            measured[key] = old.get("measured_per_dataset", {}).get(key, old.get("measured_at"))
            shown.append(key)
            print(f"{key}: kept from the run of {measured[key]} (not run now)", flush=True)
    shown = [k for k in DATASETS if k in shown]
    result["measured_per_dataset"] = measured
    result["config"] = cfg
    result["protocol"] = [line.strip() for line in _protocol_lines()]
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                         "python": std_platform.python_version(), "system": std_platform.platform()}
    result["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["seconds"] = seconds
    result["quick"] = args.quick
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    result["notes"] = notes_for(result, shown)
    out.mkdir(parents=True, exist_ok=True)
    (out / "active_learning.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "active_learning.md", result, shown)
    write_plot(out / "active_learning.png", result, shown)
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
