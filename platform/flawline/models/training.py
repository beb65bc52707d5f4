"""The gradient fit of normal-only detectors (flow, feature reconstruction, self-supervised).

Such a detector learns a network on its own embeddings (``Detector.embed``). It says how training
starts (``TrainedDetector.begin_training``: statistics over all workers, a fresh network) and what
one step's loss is (``training_loss``); ``fit_network`` runs it with the one gradient loop every
training setting uses (``flawline.train.loop.train_network``): in this process with a
``LocalContext``, or on every Ray Train worker under DDP with per-epoch checkpoints
(``flawline.train.distributed``). Each epoch's batch order is seeded by (seed, epoch, rank), so a
run resumed from a checkpoint draws the same batches as one that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flawline.models.base import Embedded, TrainedDetector
    from flawline.train.context import TrainContext


@torch.no_grad()
def collect(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
            batches: Iterable[torch.Tensor]) -> tuple[list, int]:
    """Run ``fn`` over every batch (no gradients), keeping its outputs on the CPU."""
    out, count = [], 0
    for x in batches:
        y = fn(x)
        out.append(tuple(t.cpu() for t in y) if isinstance(y, tuple) else y.cpu())
        count += (y[0] if isinstance(y, tuple) else y).shape[0]
    return out, count


def concat(batches: list[Embedded]) -> Embedded:
    """Embedded batches → one (a tensor [N, ...], or a tuple of them), on the CPU. Outside
    autocast: under bf16 autocast, cat refuses fp16 inputs ("Unexpected floating ScalarType")."""
    with torch.autocast("cpu", enabled=False):
        if isinstance(batches[0], tuple):
            return tuple(torch.cat([b[i].cpu() for b in batches]) for i in range(len(batches[0])))
        return torch.cat([b.cpu() for b in batches])


def take(embedded: Embedded, idx: torch.Tensor, device: torch.device) -> Embedded:
    """Rows ``idx`` of concatenated embeddings, on ``device``."""
    if isinstance(embedded, tuple):
        return tuple(e[idx].to(device) for e in embedded)
    return embedded[idx].to(device)


def rows(embedded: Embedded) -> int:
    return int((embedded[0] if isinstance(embedded, tuple) else embedded).shape[0])


def embedded_bytes(embedded: Embedded) -> int:
    """Bytes held by an embedded batch (a tensor or a tuple of them)."""
    parts = embedded if isinstance(embedded, tuple) else (embedded,)
    return sum(t.numel() * t.element_size() for t in parts)


def fit_network(detector: TrainedDetector, embedded: Embedded, ctx: TrainContext) -> list[dict[str, Any]]:
    """Train ``detector``'s network on this worker's concatenated embeddings (its shard), with
    ``ctx`` deciding rank, DDP, checkpoints and resume; returns the per-epoch metrics. Every rank
    takes the same number of steps per epoch (all ranks' rows / world size / batch size), wrapping
    around its own rows where its shard is smaller."""
    c = detector.config
    net = detector.begin_training(embedded, ctx.total)
    n = rows(embedded)
    total = int(ctx.total(torch.tensor([float(n)], dtype=torch.float64)).item())
    steps_per_epoch = max(1, -(-total // (ctx.world_size * c.batch_size)))

    def batches(epoch: int, gen: torch.Generator) -> Iterator[Embedded]:
        order = torch.randperm(n, generator=gen)
        order = order.repeat(-(-steps_per_epoch * c.batch_size // n))
        for step in range(steps_per_epoch):
            yield take(embedded, order[step * c.batch_size:(step + 1) * c.batch_size], ctx.device)

    return _train(detector, net, batches, ctx)


def fit_network_streamed(detector: TrainedDetector, sample: Embedded,
                         epoch_inputs: Callable[[int], Iterator[Embedded]], steps_per_epoch: int,
                         ctx: TrainContext) -> list[dict[str, Any]]:
    """``fit_network`` for a shard too large to keep embedded: ``begin_training`` sees ``sample``
    (the first embedded batches, for its statistics) and each epoch embeds the shard again as it
    streams in (``epoch_inputs(epoch)``: embedded batches, at least ``steps_per_epoch`` of them,
    the same count on every rank). Memory stays at one sample and a few batches whatever the
    shard's size; the price is the backbone's forward pass every epoch, and batch order follows
    the stream (seeded local shuffling), so a resumed run is not bit-identical to an uninterrupted
    one."""
    net = detector.begin_training(sample, ctx.total)

    def batches(epoch: int, gen: torch.Generator) -> Iterator[Embedded]:
        inputs = epoch_inputs(epoch)
        for _, batch in zip(range(steps_per_epoch), inputs):
            yield take(batch, torch.arange(rows(batch)), ctx.device)
        for _ in inputs:  # the rest of this epoch's stream (the next epoch starts after it)
            pass

    return _train(detector, net, batches, ctx)


def _train(detector: TrainedDetector, net: torch.nn.Module,
           batches: Callable[[int, torch.Generator], Iterator[Embedded]], ctx: TrainContext) -> list[dict[str, Any]]:
    """The one gradient loop (``train.loop.train_network``) over ``batches(epoch, generator)``:
    the generator is seeded by (seed, epoch, rank) and also drives the loss's own draws."""
    from flawline.train.loop import OptimConfig, train_network

    c = detector.config
    optim = detector.optim()
    cfg = OptimConfig(epochs=optim["epochs"], lr=optim["lr"], weight_decay=optim.get("weight_decay", 0.0),
                      precision=c.precision, seed=c.seed, optimizer="adam", schedule="constant")

    def steps(epoch: int, model: torch.nn.Module) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + 7_919 * epoch + ctx.rank)
        detector.begin_epoch(epoch)
        for batch in batches(epoch, gen):
            with detector.autocast():
                loss = detector.training_loss(model, batch, gen)
            yield loss

    with torch.enable_grad():  # a caller may be inside no_grad (an embedding generator's consumer)
        history = train_network(net, steps, cfg, ctx)
    detector.info["loss_per_epoch"] = [round(float(h["loss"]), 5) for h in history]
    detector.info["train_seconds"] = round(sum(h["epoch_seconds"] for h in history), 2)
    return history
