"""The CUDA paths CI cannot run: every normal-only detector fits and predicts on the GPU (fp32 and
bf16 autocast) and agrees with the CPU; the supervised classifier trains with the platform's one
gradient loop (``train_network``, AdamW, clipping, bf16 autocast, checkpoint state) on the GPU and
learns. Plain tensors (smooth textures, a bright blotch as the defect), no services.

    python bench/gpu_check.py [--out docs/benchmarks/gpu_check.json]

Writes JSON and Markdown with what ran where; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform as pyplatform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from flawline.evaluate.metrics import roc_auc  # noqa: E402
from flawline.models import create_detector  # noqa: E402
from flawline.train.context import LocalContext  # noqa: E402
from flawline.train.data import TensorBatches  # noqa: E402
from flawline.train.loop import OptimConfig, train_network  # noqa: E402
from flawline.train.supervised import classifier_steps  # noqa: E402

SIZE = 128
UNSUPERVISED = {"patchcore": {}, "padim": {}, "flow": {"epochs": 6}, "reconstruction": {"epochs": 6},
                "selfsup": {"epochs": 3}}
DETERMINISTIC = ("patchcore", "padim")  # no gradient training: CPU and GPU fits must agree


def textures(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE // 8, SIZE // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (0.35 + 0.3 * x).expand(-1, 3, -1, -1).contiguous()


def with_defects(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[:, :, 40:68, 48:76] = 1.0
    return y


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_detector(method: str, device: str, precision: str, data) -> dict:  # noqa: ANN001
    train, normal, defect = data
    det = create_detector(method, image_size=SIZE, batch_size=16, device=device, precision=precision,
                          **UNSUPERVISED[method])
    started = time.perf_counter()
    det.fit(train)
    sync()
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    pred = det.predict(torch.cat([normal, defect]))
    sync()
    predict_s = time.perf_counter() - started
    scores = np.asarray(pred.scores, dtype=np.float64)
    return {"method": method, "device": str(det.device), "precision": precision, "fit_s": round(fit_s, 3),
            "predict_s": round(predict_s, 3), "finite": bool(np.isfinite(scores).all()),
            "auroc": float(roc_auc([0] * len(normal) + [1] * len(defect), scores)),
            "map_shape": list(pred.maps.shape), "scores": scores.tolist()}


def check_classifier(device: str, precision: str) -> dict:
    det = create_detector("classifier", image_size=SIZE, device=device, precision=precision)
    x = torch.cat([textures(48, 10), with_defects(textures(48, 11))])
    y = torch.tensor([0] * 48 + [1] * 48)
    source = TensorBatches({"labelled": {"image": (x * 255).round().to(torch.uint8), "target": y}},
                           batch_size=16, seed=0, device=det.device)
    ctx = LocalContext(device=det.device)
    cfg = OptimConfig(epochs=4, lr=1e-3, precision=precision)
    started = time.perf_counter()
    history = train_network(det.net, classifier_steps(source, ctx, torch.ones(2), precision, 0), cfg, ctx)
    sync()
    train_s = time.perf_counter() - started
    det.fitted = True
    test = torch.cat([textures(16, 12), with_defects(textures(16, 13))])
    pred = det.predict(test)
    scores = np.asarray(pred.scores, dtype=np.float64)
    checkpoint_devices = sorted({str(v.device) for v in ctx.last_state["net"].values()})
    return {"method": "classifier (train_network)", "device": str(det.device), "precision": precision,
            "train_s": round(train_s, 3), "losses": [round(h["loss"], 4) for h in history],
            "learned": history[-1]["loss"] < history[0]["loss"], "finite": bool(np.isfinite(scores).all()),
            "auroc": float(roc_auc([0] * 16 + [1] * 16, scores)), "checkpoint_on": checkpoint_devices}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 1
    device = args.device
    data = (textures(32, 0), textures(16, 1), with_defects(textures(16, 2)))
    rows, failures = [], []
    for method in UNSUPERVISED:
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            row = check_detector(method, device, precision, data)
            rows.append(row)
            print(f"{method:15s} {device} {precision}: auroc {row['auroc']:.3f} fit {row['fit_s']:.2f} s "
                  f"predict {row['predict_s']:.3f} s", flush=True)
            if not row["finite"] or row["auroc"] < 0.9 or not row["device"].startswith(device):
                failures.append(f"{method} {precision}")
        if method in DETERMINISTIC:  # the same fit on the CPU: the GPU must give the same scores
            torch.manual_seed(0)
            cpu = check_detector(method, "cpu", "fp32", data)
            gpu = next(r for r in rows if r["method"] == method and r["precision"] == "fp32")
            rel = float(np.max(np.abs(np.array(gpu["scores"]) - np.array(cpu["scores"]))
                               / (np.abs(np.array(cpu["scores"])) + 1e-6)))
            gpu["max_rel_diff_vs_cpu"] = round(rel, 6)
            print(f"{method:15s} {device} fp32 vs cpu fp32: max relative score difference {rel:.2e}", flush=True)
            if rel > 1e-2:
                failures.append(f"{method} cpu/gpu mismatch {rel:.2e}")
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        row = check_classifier(device, precision)
        rows.append(row)
        print(f"classifier      {device} {precision}: losses {row['losses']} auroc {row['auroc']:.3f} "
              f"checkpoint on {row['checkpoint_on']}", flush=True)
        if not (row["learned"] and row["finite"] and row["auroc"] >= 0.9):
            failures.append(f"classifier {precision}")
    for row in rows:
        row.pop("scores", None)
    result = {"measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (cpu dry run)", "torch": torch.__version__,
              "python": pyplatform.python_version(), "image_size": SIZE, "checks": rows, "failures": failures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# GPU check ({result['gpu']}, torch {result['torch']})", "",
             f"Measured {result['measured']} with `python bench/gpu_check.py`: the CUDA paths CI cannot run, "
             f"on {SIZE} px synthetic textures (a bright blotch is the defect). Times include CUDA start-up "
             "and kernel compilation on first use; they are not a speed benchmark.", "",
             "| check | precision | AUROC | time (s) | notes |", "|---|---|---|---|---|"]
    for r in rows:
        t = r.get("fit_s", r.get("train_s"))
        note = (f"max rel. score diff vs CPU {r['max_rel_diff_vs_cpu']:.1e}" if "max_rel_diff_vs_cpu" in r
                else f"loss {r['losses'][0]} → {r['losses'][-1]}; checkpoint on {', '.join(r['checkpoint_on'])}"
                if "losses" in r else "")
        lines.append(f"| {r['method']} | {r['precision']} | {r['auroc']:.3f} | {t} | {note} |")
    lines += ["", f"Failures: {', '.join(failures) if failures else 'none'}.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("failures:", failures or "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
