"""Helpers shared by the detectors that learn weights: feature caching and a plain Adam loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch


@torch.no_grad()
def collect(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
            batches: Iterator[torch.Tensor]) -> tuple[list, int]:
    """Run ``fn`` over every batch (no gradients), keeping its outputs on the CPU."""
    out, count = [], 0
    for x in batches:
        y = fn(x)
        out.append(tuple(t.cpu() for t in y) if isinstance(y, tuple) else y.cpu())
        count += x.shape[0]
    return out, count


def train_epochs(model: torch.nn.Module, loss_fn: Callable[[int, torch.Generator], torch.Tensor],
                 steps_per_epoch: int, epochs: int, lr: float, weight_decay: float = 0.0, seed: int = 0,
                 info: dict | None = None) -> list[float]:
    """Adam over ``epochs`` x ``steps_per_epoch`` calls of ``loss_fn(step, generator)``; returns the
    mean loss per epoch (also recorded in ``info['loss_per_epoch']``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        total = 0.0
        for step in range(steps_per_epoch):
            loss = loss_fn(step, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError("training loss became non-finite; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            total += float(loss.detach())
        history.append(total / max(steps_per_epoch, 1))
    model.eval()
    if info is not None:
        info["loss_per_epoch"] = [round(v, 5) for v in history]
        info["train_seconds"] = round(time.perf_counter() - started, 2)
    return history
