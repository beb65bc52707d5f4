"""Large images with small defects: resized to 256 px against tiled at native resolution.

A script-made set (no download): 1024 x 1024 gray woven textures (a fine grating of period 5.5-6.5
px, its direction fixed per seed within a few degrees, its phase varying from image to image, under
slow illumination changes and sensor noise) with one defect of 10-40 px per defective image, of three kinds:

- ``weave``: inside an ellipse the grating runs at another angle: the mean brightness is unchanged,
  so a resize that averages the 6 px period away also averages the defect away;
- ``spot``: a soft-edged ellipse a little darker or brighter than its surroundings;
- ``scratch``: a thin bright line, 2 px wide.

Per seed: 40 normal images to fit the normal-only detectors; 24 normal + 24 defective images
(with masks) to train the label-aware one (the ``segmenter``, through the supervised setting's
training loop); 30 normal + 30 defective test images (10 of each kind). Each detector twice:
``resized`` (images brought to 256 px, the default) and ``tiled`` (1024 px cut into 256 px tiles
overlapping by 25 %, the maps stitched back: the ``tile`` setting). Test images are made and
scored 6 at a time, and pixel metrics are streamed (``evaluate.streaming.PixelAccumulator``, bin
edges from the maps of 8 training normals) at 1024 px against the 1024 px masks (resized maps are
upsampled), so memory does not hold the test set. Peak memory: the process's resident set,
sampled every 10 ms, during the first half of the test images and during all of them.

    python bench/high_resolution_bench.py [--seeds 0 1 2] [--detectors padim patchcore segmenter]

Writes docs/benchmarks/high_resolution.json and high_resolution.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as std_platform
import statistics
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flawline.evaluate.metrics import roc_auc
from flawline.evaluate.streaming import PixelAccumulator, bin_edges
from flawline.models import create_detector

REPO = Path(__file__).resolve().parents[1]
SIZE, RESIZED, TILE, OVERLAP = 1024, 256, 256, 0.25
KINDS = ("weave", "spot", "scratch")
N_FIT, N_LABELLED, N_TEST = 40, 24, 30  # per class where it applies (normal / defect)
CHUNK = 6  # test images made and scored at a time
SETTINGS = {  # per detector: its settings in both modes (patchcore keeps 1 % of the tiled patches: 2.5x the resized bank's count)
    "padim": {},
    "patchcore": {"coreset_ratio": 0.01},
    "segmenter": {},
}
SEGMENTER_EPOCHS = 20


def texture(rng: np.random.Generator, seed: int) -> tuple[np.ndarray, dict]:
    """A woven texture: the weave's direction is the line's (fixed per seed) within a few degrees."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    period = rng.uniform(5.5, 6.5)
    angle = np.random.default_rng(seed).uniform(0, np.pi) + rng.normal(0, np.radians(3))
    phase = rng.uniform(0, 2 * np.pi)
    grating = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    coarse = rng.normal(0, 1, (9, 9)).astype(np.float32)
    light = F.interpolate(torch.from_numpy(coarse)[None, None], size=(SIZE, SIZE), mode="bicubic",
                          align_corners=False)[0, 0].numpy()
    img = 0.5 + 0.12 * grating + 0.03 * light + rng.normal(0, 0.02, (SIZE, SIZE)).astype(np.float32)
    return img, {"period": period, "angle": angle, "phase": phase, "yy": yy, "xx": xx}


def defect(img: np.ndarray, g: dict, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add one ``kind`` defect of 10-40 px; returns (image, mask)."""
    yy, xx = g["yy"], g["xx"]
    cy, cx = rng.uniform(60, SIZE - 60, 2)
    if kind == "scratch":
        length, theta = rng.uniform(20, 40), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        mask = (np.abs(u) <= length / 2) & (np.abs(v) <= 1.0)
        out = img + 0.2 * mask
    else:
        ry, rx = rng.uniform(5, 20, 2)  # diameters 10-40 px
        r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        mask = r2 <= 1.0
        soft = np.clip(1.5 - r2, 0, 1) if kind == "spot" else mask.astype(np.float32)
        if kind == "spot":
            out = img + rng.choice([-1, 1]) * 0.12 * soft
        else:  # weave: the grating turned by 45-90 degrees inside the ellipse, same mean and amplitude
            a = g["angle"] + rng.choice([-1, 1]) * rng.uniform(np.pi / 4, np.pi / 2)
            turned = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / g["period"] + g["phase"])
            old = np.sin(2 * np.pi * (xx * np.cos(g["angle"]) + yy * np.sin(g["angle"])) / g["period"] + g["phase"])
            out = img + 0.12 * soft * (turned - old)
    return np.clip(out, 0, 1).astype(np.float32), mask


def make(seed: int, part: str, index: int, kind: str | None) -> tuple[torch.Tensor, np.ndarray]:
    """One image [1, S, S] and its mask [S, S]; every (seed, part, index) draws its own."""
    rng = np.random.default_rng([seed, {"fit": 0, "labelled": 1, "test": 2, "calib": 3}[part], index,
                                 KINDS.index(kind) + 1 if kind else 0])
    img, g = texture(rng, seed)
    mask = np.zeros((SIZE, SIZE), bool)
    if kind:
        img, mask = defect(img, g, kind, rng)
    return torch.from_numpy(img)[None], mask


def batch(seed: int, part: str, specs: list[tuple[int, str | None]]) -> tuple[torch.Tensor, np.ndarray]:
    made = [make(seed, part, i, k) for i, k in specs]
    return torch.stack([m[0] for m in made]), np.stack([m[1] for m in made])


def rss_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The process's peak resident set (MiB) since ``reset``, sampled every 10 ms by a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def reset(self) -> None:
        self.peak = rss_bytes()

    def mib(self) -> float:
        return round(max(self.peak, rss_bytes()) / 2 ** 20, 1)

    def stop(self) -> None:
        self._stop.set()


def fit(method: str, mode: str, seed: int):  # noqa: ANN201
    tiled = {"image_size": SIZE, "tile": TILE, "tile_overlap": OVERLAP} if mode == "tiled" else {"image_size": RESIZED}
    det = create_detector(method, seed=seed, batch_size=16, **tiled, **SETTINGS[method])
    started = time.perf_counter()
    if method == "segmenter":
        from flawline.train.context import LocalContext
        from flawline.train.data import TensorBatches
        from flawline.train.spec import TrainSpec
        from flawline.train.supervised import Supervised

        specs = [(i, None) for i in range(N_LABELLED)] + [(i, KINDS[i % 3]) for i in range(N_LABELLED)]
        x, masks = batch(seed, "labelled", specs)
        size = det.config.image_size
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True) if size != SIZE else x
        m = torch.from_numpy(masks).float()[:, None]
        m = F.adaptive_max_pool2d(m, size)[:, 0] if size != SIZE else m[:, 0]  # a 10 px defect stays marked
        # uint8 images, as the training runs decode them (the loop's to_model scales them to [0, 1])
        x = (x.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
        source = TensorBatches({"labelled": {"image": x, "mask": m,
                                             "target": torch.tensor([0] * N_LABELLED + [1] * N_LABELLED)}},
                               batch_size=8, seed=seed)
        spec = _spec(TrainSpec, size, seed)
        Supervised().train(det, source, spec, LocalContext("cpu"), [N_LABELLED, N_LABELLED])
    else:
        images = (batch(seed, "fit", [(i, None)])[0] for i in range(N_FIT))
        det.fit(_grouped(images, 4))
    return det, time.perf_counter() - started


def _spec(TrainSpec, size: int, seed: int):  # noqa: ANN001, ANN202, N803
    return TrainSpec(datasets=["synthetic"], setting="supervised", method="segmenter", image_size=size,
                     epochs=SEGMENTER_EPOCHS, lr=1e-3, seed=seed)


def _grouped(images, n: int):  # noqa: ANN001, ANN202
    group = []
    for x in images:
        group.append(x)
        if len(group) == n:
            yield torch.cat(group)
            group = []
    if group:
        yield torch.cat(group)


def full_maps(maps: np.ndarray) -> np.ndarray:
    if maps.shape[-1] == SIZE:
        return maps
    return F.interpolate(torch.from_numpy(maps)[:, None], size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)[:, 0].numpy()


def evaluate(det, seed: int, rss: PeakRSS) -> dict:  # noqa: ANN001
    calib, _ = batch(seed, "calib", [(i, None) for i in range(8)])
    edges = bin_edges(full_maps(det.predict(calib).maps)[:, ::4, ::4], lo=None, hi=None)
    acc = PixelAccumulator(edges)
    specs = [(i, None) for i in range(N_TEST)] + [(i, KINDS[i % 3]) for i in range(N_TEST)]
    order = np.random.default_rng(seed).permutation(len(specs))  # normals and defects interleaved
    specs = [specs[i] for i in order]
    scores, labels, kinds, predict_s, half_mib = [], [], [], 0.0, None
    rss.reset()
    for start in range(0, len(specs), CHUNK):
        part = specs[start:start + CHUNK]
        x, masks = batch(seed, "test", part)
        t0 = time.perf_counter()
        pred = det.predict(x)
        predict_s += time.perf_counter() - t0
        for amap, mask, (_, kind) in zip(full_maps(pred.maps), masks, part):
            acc.add(amap, mask, kind is not None, kind)
        scores += pred.scores.tolist()
        labels += [k is not None for _, k in part]
        kinds += [k for _, k in part]
        if half_mib is None and start + CHUNK >= len(specs) // 2:
            half_mib = rss.mib()
    pixel = acc.metrics()
    s, y = np.array(scores), np.array(labels)
    per_kind = {k: roc_auc(np.r_[np.zeros((~y).sum()), np.ones(sum(kk == k for kk in kinds))],
                           np.r_[s[~y], s[[kk == k for kk in kinds]]]) for k in KINDS}
    return {"image_auroc": roc_auc(y, s), "image_auroc_per_kind": per_kind,
            "pixel_auroc": pixel["pixel_auroc"], "aupro": pixel["aupro"],
            "pixel_auroc_per_kind": pixel.get("pixel_auroc_per_class", {}),
            "predict_images_per_s": len(specs) / predict_s, "test_images": len(specs),
            "peak_rss_mib_first_half": half_mib, "peak_rss_mib_all": rss.mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--detectors", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--keep", action="store_true", help="merge into the saved results (rows measured now replace "
                                                        "their namesakes; the others keep their date)")
    args = p.parse_args()
    rss = PeakRSS()
    rows: dict[str, dict] = {}
    for method in args.detectors:
        for mode in ("resized", "tiled"):
            runs = []
            for seed in args.seeds:
                det, fit_s = fit(method, mode, seed)
                m = evaluate(det, seed, rss)
                runs.append({"seed": seed, "fit_seconds": round(fit_s, 1), **m, "fit_info": det.info})
                print(f"{method} {mode} seed {seed}: image AUROC {m['image_auroc']:.4f} pixel {m['pixel_auroc']:.4f} "
                      f"AUPRO {m['aupro']:.4f} fit {fit_s:.0f}s predict {m['predict_images_per_s']:.2f} img/s "
                      f"peak {m['peak_rss_mib_first_half']}/{m['peak_rss_mib_all']} MiB", flush=True)
                del det

            def agg(key: str, fn=statistics.mean) -> float:  # noqa: ANN001
                return fn([r[key] for r in runs])

            rows[f"{method} {mode}"] = {
                "method": method, "mode": mode,
                "image_auroc_mean": agg("image_auroc"), "image_auroc_std": agg("image_auroc", statistics.pstdev),
                "pixel_auroc_mean": agg("pixel_auroc"), "aupro_mean": agg("aupro"),
                "image_auroc_per_kind_mean": {k: statistics.mean(r["image_auroc_per_kind"][k] for r in runs)
                                             for k in KINDS},
                "fit_seconds_median": agg("fit_seconds", statistics.median),
                "predict_images_per_s_median": agg("predict_images_per_s", statistics.median),
                "peak_rss_mib_first_half_median": agg("peak_rss_mib_first_half", statistics.median),
                "peak_rss_mib_all_median": agg("peak_rss_mib_all", statistics.median),
                "settings": {"image_size": SIZE if mode == "tiled" else RESIZED,
                             **({"tile": TILE, "tile_overlap": OVERLAP} if mode == "tiled" else {}),
                             **SETTINGS[method]},
                "runs": runs, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
    rss.stop()
    saved = args.out / "high_resolution.json"
    if args.keep and saved.exists():
        old = json.loads(saved.read_text())
        rows = {**{k: dict(v, measured=v.get("measured", old["date"])) for k, v in old["rows"].items()}, **rows}
        args.detectors = list(dict.fromkeys([*(v["method"] for v in rows.values())]))
    out = {
        "data": {"image_size": SIZE, "defect_sizes_px": [10, 40], "kinds": list(KINDS),
                 "fit_normals": N_FIT, "labelled": {"normal": N_LABELLED, "defect": N_LABELLED},
                 "test": {"normal": N_TEST, "defect": N_TEST}, "seeds": args.seeds},
        "protocol": "pixel metrics at 1024 px (resized maps upsampled), streamed; threshold-free metrics only",
        "rows": rows,
        "aims": {m: {"tiled_image_auroc": rows[f"{m} tiled"]["image_auroc_mean"],
                     "gain_over_resized": rows[f"{m} tiled"]["image_auroc_mean"] - rows[f"{m} resized"]["image_auroc_mean"]}
                 for m in args.detectors},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": std_platform.python_version(), "device": "cpu"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "high_resolution.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "high_resolution.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    d = out["data"]
    lines = ["# High resolution: resized against tiled", "",
             f"Written {out['date']} on {out['machine']['cpus']} CPUs (no GPU). Script-made {d['image_size']} px woven "
             f"textures with one defect of {d['defect_sizes_px'][0]}-{d['defect_sizes_px'][1]} px per defective image "
             f"({', '.join(d['kinds'])}); fit on {d['fit_normals']} normals (segmenter: {d['labelled']['normal']} normal + "
             f"{d['labelled']['defect']} defective images with masks, {SEGMENTER_EPOCHS} epochs); test "
             f"{d['test']['normal']} + {d['test']['defect']}; seeds {d['seeds']}. Resized: 256 px. Tiled: {TILE} px "
             f"tiles overlapping {OVERLAP:.0%} at 1024 px, maps stitched. Pixel metrics at 1024 px, streamed. "
             "Script: `bench/high_resolution_bench.py`.", "",
             "| detector | mode | image AUROC (mean ± std) | pixel AUROC | AUPRO | weave / spot / scratch image AUROC "
             "| fit s | predict img/s | peak RSS MiB (half / all test images) | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"].values():
        k = r["image_auroc_per_kind_mean"]
        lines.append(f"| {r['method']} | {r['mode']} | {r['image_auroc_mean']:.4f} ± {r['image_auroc_std']:.4f} | "
                     f"{r['pixel_auroc_mean']:.4f} | {r['aupro_mean']:.4f} | "
                     f"{k['weave']:.3f} / {k['spot']:.3f} / {k['scratch']:.3f} | {r['fit_seconds_median']:.0f} | "
                     f"{r['predict_images_per_s_median']:.2f} | {r['peak_rss_mib_first_half_median']:.0f} / "
                     f"{r['peak_rss_mib_all_median']:.0f} | {str(r.get('measured', out['date']))[:16]} |")
    lines += ["", "Aims (issue 16): tiled image ROC-AUC at least 0.95 and at least 0.2 above resized.", ""]
    for m, a in out["aims"].items():
        met = a["tiled_image_auroc"] >= 0.95 and a["gain_over_resized"] >= 0.2
        lines.append(f"- {m}: tiled {a['tiled_image_auroc']:.4f}, {a['gain_over_resized']:+.4f} against resized: "
                     f"{'met' if met else 'not met'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
