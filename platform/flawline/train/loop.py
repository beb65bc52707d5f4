"""The one gradient loop every training setting and every gradient-trained detector uses: AdamW
(or Adam) with a cosine (or constant) schedule, gradient clipping, optional bf16 autocast, a
checkpoint per epoch, resume after a worker failure. A setting (or ``models.training.fit_network``
for flow, reconstruction and self-supervised detectors) only supplies ``steps(epoch, model)``: a
generator of losses for one epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flawline.train.context import TrainContext

Steps = Callable[[int, nn.Module], Iterator[torch.Tensor]]


@dataclass
class OptimConfig:
    epochs: int
    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    precision: str = "fp32"
    clip: float = 5.0
    seed: int = 0
    optimizer: str = "adamw"  # or "adam" (weight decay added to the gradient, as the detectors' papers)
    schedule: str = "cosine"  # or "constant"


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    if cfg.schedule == "constant":
        return 1.0
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def train_network(net: nn.Module, steps: Steps, cfg: OptimConfig, ctx: TrainContext,
                  extra_metrics: Callable[[int], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Train ``net`` in place for ``cfg.epochs``; returns the per-epoch metrics this worker saw."""
    torch.manual_seed(cfg.seed + ctx.rank)
    model = ctx.wrap(net)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.optimizer]
    opt = optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    state = ctx.resume()
    if state is not None:  # restarted after a failure: pick up where the last checkpoint left off
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
    history = []
    for epoch in range(start, cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(epoch, cfg)
        started, cpu_started = time.perf_counter(), time.process_time()
        net.train()
        total, count = 0.0, 0
        for loss in steps(epoch, model):
            if not torch.isfinite(loss):
                raise FloatingPointError("training loss became non-finite; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            # Autocast caches its bf16 copies of the weights until the outermost autocast region
            # ends; a caller already inside one (``Detector.fit_embedded``) would otherwise go on
            # using the weights from before this step.
            torch.clear_autocast_cache()
            total += float(loss.detach())
            count += 1
        net.eval()
        metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": ctx.mean(total / max(count, 1)),
                   "steps": count, "epoch_seconds": round(time.perf_counter() - started, 2),
                   # this process's CPU time in the epoch (every thread): against epoch_seconds, the
                   # share of a core the loop got (a worker starved by other processes shows it)
                   "epoch_cpu_seconds": round(time.process_time() - cpu_started, 2)}
        if extra_metrics is not None:
            metrics.update(extra_metrics(epoch))
        history.append(metrics)
        ctx.report(metrics, {"net": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch})
    return history


def autocast(device: torch.device, precision: str):  # noqa: ANN201
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
