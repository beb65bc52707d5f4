"""Where a training loop runs: which rank it is, how to report progress and checkpoints, and
where to resume from. ``LocalContext`` runs in-process (tests, benchmarks, one-process runs);
``flawline.train.distributed.RayTrainContext`` runs inside a Ray Train worker."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class TrainContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to run forward/backward on (DDP-wrapped when several workers train)."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        """End of an epoch: record ``metrics`` and checkpoint ``state``."""

    def resume(self) -> dict[str, Any] | None:
        """The last checkpointed state when restarted after a failure, else None."""

    def mean(self, value: float) -> float:
        """``value`` averaged over all workers."""

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all workers (same shape; e.g. feature statistics of all shards)."""


class LocalContext:
    """One process: no DDP, checkpoints kept in memory (the last one), metrics in ``history``."""

    rank, world_size = 0, 1

    def __init__(self, device: torch.device | str = "cpu", start_from: dict[str, Any] | None = None) -> None:
        self.device = torch.device(device)
        self.history: list[dict[str, Any]] = []
        self.last_state: dict[str, Any] | None = start_from

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        self.history.append(dict(metrics))
        self.last_state = state

    def resume(self) -> dict[str, Any] | None:
        return self.last_state

    def mean(self, value: float) -> float:
        return value

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor
