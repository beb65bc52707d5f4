"""Label efficiency of mixed supervision on Magnetic Tile and ELPV: what each number of labelled
defect images buys over the label-free detector, per label setting.

Per dataset and seed (the test split fixed per seed):
- Magnetic Tile: a random 80 % of the defect-free images for training, 20 % for testing (the
  literature's protocol, ../shared/README.md); the defective images split 50/50 per class into a
  train pool and the test split. ELPV: 75 % / 25 %, stratified by verdict and cell type.
- The base detector (``--base``, the label-free model) is fitted once on the train normals less a
  seeded 20 % held back; the backbone runs once per image (``MixedDetector.head_inputs``) and every
  head below is fitted on those cached inputs, then scored through ``scores_from_inputs`` (checked
  against ``predict`` on real images each seed).
- "labels" = labelled defect images, the first L of a seeded order of the train pool; normal
  images are known in every setting (a normal-only detector needs them). Settings:
  ``label_free`` (L = 0), ``fewshot`` (k <= 10 defects, image verdicts), ``weakly_image`` (image
  verdicts), ``weakly_boxes`` (boxes around each mask component; Magnetic Tile only),
  ``semi`` (the L labelled defects with their masks where the dataset has them, the rest of the
  defect pool unlabelled: the fitted model's confident outliers among them, at or above its
  threshold with conformal confidence >= 0.99 against the held-out normals
  (``flawline.train.pseudo.conformal_confidence``, the rule the ``mixed`` setting stores
  ``pseudo`` annotations by), join as image-level defects and the head is refitted; the pool holds
  no unlabelled normal image here, so every pseudo-defect is right by construction),
  ``supervised`` (pixel masks where the dataset has them, else verdicts).
- The threshold is the setting's own (``flawline.train.mixed.head_threshold``: out-of-fold
  balanced accuracy, or the normals' 0.99-quantile at L = 0); accuracy and F1 at it on the test split, and the
  accuracy of always answering the majority class beside them.
- pixel AUROC (Magnetic Tile): at the feature grid (32 x 32 at 256 px), mask coverage >= 0.5.

    python bench/label_efficiency_bench.py [--datasets magnetic-tile elpv] [--seeds 0 1 2] [--base padim]

Writes docs/benchmarks/label_efficiency.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from flawline.catalog import Label
from flawline.data.importers import get_importer
from flawline.data.loading import decode_image, decode_mask, stack_rgb
from flawline.models import create_detector
from flawline.models.mixed import HeadInputs, MixedDetector
from flawline.train.mixed import head_threshold
from flawline.train.pseudo import conformal_confidence

REPO = Path(__file__).resolve().parents[1]
COUNTS = [0, 5, 10, 25, 50, 100, 200, 400, "all"]
SETTINGS = ["label_free", "fewshot", "weakly_image", "weakly_boxes", "semi", "supervised"]
FITTED = ["weakly_image", "weakly_boxes", "semi", "supervised"]  # fewshot = weakly_image's points at k <= 10 (same model)


def load(name: str, size: int):
    if name == "magnetic-tile":
        items = list(get_importer("magnetic-tile").scan(REPO.parent / "shared" / "datasets" / "magnetic-tile"))
    else:
        items = list(get_importer("elpv").scan(None))
    images = stack_rgb([decode_image(i.image.read(), size, i.image.name) for i in items])
    masks = np.stack([decode_mask(i.mask.read() if i.mask else None, size) for i in items]) if any(
        i.mask for i in items) else None
    labels = np.array([i.label is Label.defect for i in items])
    strata = [(i.defect_class or "") + "|" + str((i.image_attrs or {}).get("cell_type", "")) for i in items]
    return images, masks, labels, strata


def split(labels: np.ndarray, strata: list[str], dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for key in sorted(set(zip(labels.tolist(), strata))):
        idx = np.flatnonzero([(bool(l), s) == key for l, s in zip(labels, strata)])
        idx = idx[rng.permutation(len(idx))]
        share = (0.8 if not key[0] else 0.5) if dataset == "magnetic-tile" else 0.75
        cut = int(round(share * len(idx)))
        train += idx[:cut].tolist()
        test += idx[cut:].tolist()
    return np.array(sorted(train)), np.array(sorted(test))


def boxes_from_mask(mask: np.ndarray) -> np.ndarray:
    """Each connected component of a mask replaced by its bounding box (scipy.ndimage)."""
    from scipy import ndimage

    out = np.zeros_like(mask, dtype=bool)
    for box in ndimage.find_objects(ndimage.label(mask)[0]):
        out[box] = True
    return out


def inputs(det: MixedDetector, images: torch.Tensor, regions: np.ndarray | None, batch: int = 32) -> HeadInputs:
    parts = []
    for s in range(0, len(images), batch):
        r = None if regions is None else torch.from_numpy(regions[s:s + batch]).float()
        has = None if regions is None else torch.from_numpy(regions[s:s + batch].reshape(len(r), -1).any(1))
        parts.append(det.head_inputs(images[s:s + batch], r, has))
    return HeadInputs.concat(parts)


def metrics(det: MixedDetector, test: HeadInputs, y: np.ndarray, test_masks: np.ndarray | None) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    scores, maps = det.scores_from_inputs(test)
    verdict = scores >= det.threshold.value
    out = {"image_auroc": float(roc_auc_score(y, scores)), "accuracy": float(accuracy_score(y, verdict)),
           "f1": float(f1_score(y, verdict, zero_division=0))}
    if test_masks is not None:
        out["pixel_auroc"] = float(roc_auc_score(test_masks.ravel(), maps.ravel()))
    return out


def base_of(choices: list[str], dataset: str) -> str:
    pairs = dict(c.split("=", 1) for c in choices if "=" in c)
    plain = [c for c in choices if "=" not in c]
    return pairs.get(dataset, plain[0] if plain else "padim")


def run_dataset(name: str, args, log) -> dict:  # noqa: ANN001
    t0 = time.perf_counter()
    images, masks, labels, strata = load(name, args.size)
    log(f"{name}: {len(images)} images ({int(labels.sum())} defective) decoded in {time.perf_counter() - t0:.0f} s")
    result: dict = {s: {"labels": [], "image_auroc": [], "accuracy": [], "f1": [], "majority_accuracy": [],
                        "head": []} for s in SETTINGS}
    per_seed = []
    for seed in args.seeds:
        ts = time.perf_counter()
        train, test = split(labels, strata, name, seed)
        rng = np.random.default_rng([seed, 1])
        normals = train[~labels[train]][rng.permutation(int((~labels[train]).sum()))]
        n_cal = int(round(0.2 * len(normals)))
        cal, fit = normals[:n_cal], normals[n_cal:]
        pool = train[labels[train]][rng.permutation(int(labels[train].sum()))]  # labelled in this order
        det = create_detector("mixed", base_method=base_of(args.base, name), image_size=args.size, batch_size=32,
                              seed=seed)
        det.fit(images[fit])
        fit_s = time.perf_counter() - ts
        h_cal = inputs(det, images[cal], None)
        det.set_normal_stats(h_cal.scores, h_cal.patch_map)
        h_pool_mask = inputs(det, images[pool], masks[pool] if masks is not None else None)
        h_pool_box = None
        if masks is not None:  # the same images, each mask component replaced by its bounding box
            g = int(round(h_pool_mask.patches.shape[1] ** 0.5))
            boxes = torch.from_numpy(np.stack([boxes_from_mask(m) for m in masks[pool]])).float().unsqueeze(1)
            cover = torch.nn.functional.adaptive_avg_pool2d(boxes, (g, g)).flatten(1).numpy()
            h_pool_box = h_pool_mask.take(np.arange(len(pool)),
                                          [cover[i] if t is not None else None for i, t in enumerate(h_pool_mask.targets)])
        h_test = inputs(det, images[test], None)
        grid = int(round(h_test.patches.shape[1] ** 0.5))
        test_masks = None
        if masks is not None:
            test_masks = torch.nn.functional.adaptive_avg_pool2d(
                torch.from_numpy(masks[test]).float().unsqueeze(1), (grid, grid)).flatten(1).numpy() >= 0.5
        y = labels[test]
        majority = float(max(y.mean(), 1 - y.mean()))
        # The cached path must score as predict does (one batch of real images).
        check = test[:8]
        det.head = None
        s_cached, _ = det.scores_from_inputs(h_test.take(np.arange(8)))
        s_real = det.predict(images[check]).scores
        drift = float(np.max(np.abs(s_cached - s_real)))
        assert drift < 1e-2, f"cached scores drift from predict by {drift}"
        seed_facts = {"seed": seed, "train_normals_fit": len(fit), "calibration_normals": len(cal),
                      "defect_pool": len(pool), "test_images": len(test), "test_defects": int(y.sum()),
                      "base_fit_seconds": round(fit_s, 1), "cached_vs_predict_max_diff": drift}
        rows = {"label_free": [None]}
        for setting in FITTED:
            if setting == "weakly_boxes" and h_pool_box is None:
                continue
            if setting == "supervised" and masks is None:
                continue  # no masks: supervised = image verdicts, i.e. weakly_image (stated in the notes)
            for c in [c for c in COUNTS if c == "all" or 0 < c < len(pool)]:
                if setting == "semi" and c == "all":
                    continue  # nothing left unlabelled
                rows.setdefault(setting, []).append(c)
        if "semi" in rows:
            rows["semi"].insert(0, 0)  # confident outliers alone, no label
        for setting, counts in rows.items():
            for c in counts:
                n = 0 if c is None else (len(pool) if c == "all" else int(c))
                idx = np.arange(n)
                src = h_pool_box if setting == "weakly_boxes" else h_pool_mask
                d = src.take(idx, None if setting in ("weakly_boxes", "supervised", "semi") else [None] * n)
                tf = time.perf_counter()
                fitted = det.fit_head(h_cal, d)
                det.set_threshold(head_threshold(fitted, det.z(h_cal.scores), n))
                pseudo = 0
                if setting == "semi":  # the unlabelled rest of the pool: confident outliers join as verdicts
                    rest = np.arange(n, len(pool))
                    s_rest, _ = det.scores_from_inputs(h_pool_mask.take(rest))
                    normal_s = fitted["oof_scores"][fitted["oof_labels"] == 0] if n else det.z(h_cal.scores)
                    conf = conformal_confidence(np.sort(normal_s), s_rest)
                    picked = rest[(s_rest >= det.threshold.value) & (conf >= 0.99)]
                    pseudo = len(picked)
                    if pseudo:
                        d = HeadInputs.concat([d, h_pool_mask.take(picked, [None] * pseudo)])
                        fitted = det.fit_head(h_cal, d)
                        det.set_threshold(head_threshold(fitted, det.z(h_cal.scores), n + pseudo))
                m = metrics(det, h_test, y, test_masks)
                point = {"labels": n, "label_count": 0 if c is None else c, "seed": seed, **m,
                         **({"pseudo_defects": pseudo} if setting == "semi" else {}),
                         "majority_accuracy": majority, "head": fitted["chosen"],
                         "head_seconds": round(time.perf_counter() - tf, 1)}
                reported = [setting] + (["fewshot"] if setting == "weakly_image" and n <= 10 else [])
                reported += ["fewshot"] if setting == "label_free" else []
                for as_setting in reported:
                    seed_facts.setdefault("points", []).append({"setting": as_setting, **point})
                log(f"  seed {seed} {setting:13s} L={n:4d}{f' +{pseudo} pseudo' if pseudo else ''} AUROC {m['image_auroc']:.4f} acc {m['accuracy']:.4f} "
                    f"F1 {m['f1']:.4f} head {fitted['chosen']} ({point['head_seconds']} s)")
        per_seed.append(seed_facts)
        log(f"{name} seed {seed}: {time.perf_counter() - ts:.0f} s")
    # aggregate: per setting, per label count, mean over seeds (and std)
    for setting in SETTINGS:
        rows = [p for s in per_seed for p in s.get("points", []) if p["setting"] == setting]
        for c in sorted({r["label_count"] for r in rows}, key=lambda v: 10**9 if v == "all" else v):
            group = [r for r in rows if r["label_count"] == c]
            out = result[setting]
            out["labels"].append(c if c != "all" else f"all ({statistics.median(r['labels'] for r in group):.0f})")
            for k in ("image_auroc", "accuracy", "f1", "majority_accuracy", "pixel_auroc", "pseudo_defects"):
                vals = [r[k] for r in group if k in r]
                if vals:
                    out.setdefault(k, []).append(round(statistics.mean(vals), 4))
                    out.setdefault(k + "_std", []).append(round(statistics.pstdev(vals), 4))
            out["head"].append(sorted({r["head"] for r in group}))
    result = {k: v for k, v in result.items() if v["labels"]}
    return {"settings": result, "seeds": per_seed, "seconds": round(time.perf_counter() - t0, 1),
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": base_of(args.base, name),
            "size": args.size, "seed_list": args.seeds}


AIMS = {"magnetic-tile": ("image_auroc", 0.995, 50, "image ROC-AUC >= 0.995 with at most 50 labelled images"),
        "elpv": ("accuracy", 0.884, None, "accuracy >= 88.4 % (Deitsch et al. 2019, every label) with at most 25 % "
                                          "of the train labels")}


def notes_for(name: str, d: dict) -> list[str]:
    """What the figures say against the issue's aims, computed from them (and what was not run)."""
    s = d["settings"]
    base = s["label_free"]
    b_mean, b_std = base["image_auroc"][0], base["image_auroc_std"][0]
    below = [f"{k} at {c}: {v['image_auroc'][i]:.4f}" for k, v in s.items() for i, c in enumerate(v["labels"])
             if b_mean - v["image_auroc"][i] > 2 * max(b_std, v["image_auroc_std"][i])]
    majority = base["majority_accuracy"][0]
    under = [f"{k} at {c}: {v['accuracy'][i]:.4f}" for k, v in s.items() for i, c in enumerate(v["labels"])
             if v["accuracy"][i] < majority]
    notes = ["**Aims** (computed from the table):",
             "- no point more than two standard deviations below the label-free image ROC-AUC: "
             + ("met." if not below else f"**not met** at {'; '.join(below)}."),
             f"- no accuracy below always answering the majority class ({majority:.4f}): "
             + ("met." if not under else f"**not met** at {'; '.join(under)}.")]
    if name in AIMS:
        metric, target, max_labels, words = AIMS[name]
        best = max(((v[metric][i], k, c) for k, v in s.items() for i, c in enumerate(v["labels"])
                    if max_labels is None or (not isinstance(c, str) and c <= max_labels)), default=None)
        if best is not None:
            verdict = "met" if best[0] >= target else "**not met**"
            notes.append(f"- {words}: {verdict}; the best is {best[0]:.4f} ({best[1]} at {best[2]} labelled defects"
                         + ("" if max_labels else "; any count") + ").")
    if "supervised" not in s:
        notes.append("- No pixel masks in this dataset: fully supervised means image verdicts, the weakly_image rows.")
    if "semi" not in s:
        notes.append("- The semi-supervised setting was not run for this dataset in its last measurement "
                     "(the setting came later); rerun with `--datasets " + name + "` to add it.")
    return notes


def write_report(out: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Label efficiency: mixed supervision on top of the label-free detector", "",
             f"Last run {data['measured']} on {data['machine']} ({data['minutes']:.1f} min); each dataset "
             f"below says when it was measured. Base detectors {data['base']}. "
             "Protocol and settings: the docstring of `bench/label_efficiency_bench.py`. "
             "Figures are means over seeds (± population std).", ""]
    fig, axes = plt.subplots(1, len(data["datasets"]), figsize=(6 * len(data["datasets"]), 4.2), squeeze=False)
    for ax, (name, d) in zip(axes[0], data["datasets"].items()):
        lines += [f"## {name}", ""]
        if "measured" in d:
            lines += [f"Measured {d['measured']}; base {d['base']}, {d['size']} px, seeds {d['seed_list']}, "
                      f"{d['seconds'] / 60:.1f} min.", ""]
        base = d["settings"]["label_free"]
        lines.append(f"Label-free ({data['base'][name]}): image AUROC {base['image_auroc'][0]:.4f} ± "
                     f"{base['image_auroc_std'][0]:.4f}, accuracy {base['accuracy'][0]:.4f}, F1 {base['f1'][0]:.4f} "
                     f"(majority class: {base['majority_accuracy'][0]:.4f}).")
        lines += ["", "| setting | labelled defects | image AUROC | accuracy | F1 | pixel AUROC | head chosen |",
                  "|---|---|---|---|---|---|---|"]
        for setting, v in d["settings"].items():
            for i, c in enumerate(v["labels"]):
                pix = f"{v['pixel_auroc'][i]:.4f}" if "pixel_auroc" in v else "-"
                if "pseudo_defects" in v:
                    c = f"{c} (+{v['pseudo_defects'][i]:.0f} pseudo)"
                lines.append(f"| {setting} | {c} | {v['image_auroc'][i]:.4f} ± {v['image_auroc_std'][i]:.4f} | "
                             f"{v['accuracy'][i]:.4f} | {v['f1'][i]:.4f} | {pix} | {', '.join(v['head'][i])} |")
            xs = [int(str(c).split("(")[-1].rstrip(")")) if isinstance(c, str) else c for c in v["labels"]]
            xs = [max(x, 1) for x in xs]
            ax.errorbar(xs, v["image_auroc"], yerr=v["image_auroc_std"], marker="o", capsize=3, label=setting)
        ax.axhline(base["image_auroc"][0], color="gray", ls="--", lw=1, label="label-free")
        ax.set_xscale("log")
        ax.set_xlabel("labelled defect images (0 plotted at 1)")
        ax.set_ylabel("test image ROC-AUC")
        ax.set_title(name)
        ax.legend(fontsize=8)
        lines += ["", *notes_for(name, d), ""]
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png", dpi=110)
    (out / "label_efficiency.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["magnetic-tile", "elpv"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base", nargs="+", default=["magnetic-tile=flow", "elpv=padim"],
                   help="the base detector: NAME for every dataset, or DATASET=NAME pairs")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown and PNG from the stored JSON")
    args = p.parse_args()
    if args.report_only:
        write_report(args.out, json.loads((args.out / "label_efficiency.json").read_text())["_run"])
        return
    started = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731
    data = {"measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()} CPU cores, {'GPU' if torch.cuda.is_available() else 'no GPU'}",
            "base": {name: base_of(args.base, name) for name in args.datasets}, "size": args.size, "seeds": args.seeds, "datasets": {}}
    for name in args.datasets:
        data["datasets"][name] = run_dataset(name, args, log)
    previous = args.out / "label_efficiency.json"
    if previous.exists():  # datasets not run this time keep their last measurement (each says when)
        kept = json.loads(previous.read_text()).get("_run", {})
        for name, d in kept.get("datasets", {}).items():
            if name not in data["datasets"]:
                d.setdefault("measured", kept.get("measured"))
                d.setdefault("base", kept.get("base", {}).get(name))
                d.setdefault("size", kept.get("size"))
                d.setdefault("seed_list", kept.get("seeds"))
                data["datasets"][name] = d
                data["base"][name] = d["base"]
                log(f"{name}: kept from the run of {d['measured']} (not run now)")
    data["minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = {name: {s: {k: v for k, v in d.items() if k != "head"} for s, d in ds["settings"].items()}
             for name, ds in data["datasets"].items()}
    (args.out / "label_efficiency.json").write_text(json.dumps({**shape, "_run": data}, indent=1, default=str))
    write_report(args.out, data)
    log(f"wrote {args.out}/label_efficiency.{{json,md,png}} in {data['minutes']} min")


if __name__ == "__main__":
    main()
