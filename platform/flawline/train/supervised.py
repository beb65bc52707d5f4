"""Supervised: every training image labelled. ``classifier`` learns image labels over the defect
classes; ``segmenter`` learns pixel masks (normal images count as all-background masks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.data import augment
from flawline.models import Detector
from flawline.models.tiling import random_crops
from flawline.train.context import TrainContext
from flawline.train.data import BatchSource, RunData
from flawline.train.loop import autocast, train_network
from flawline.train.settings import TrainingSetting, missing_verdicts, register_setting
from flawline.train.spec import TrainSpec


def class_weights(class_counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights (normalised to mean 1): defects are rare."""
    counts = torch.tensor(class_counts, dtype=torch.float32).clamp_min(1)
    w = counts.sum() / counts
    return w / w.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2))
    return (1 - (2 * inter + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 4.0,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCE (defect pixels up-weighted) + Dice, at the network's output resolution; ``valid`` masks
    out pixels with no verdict (weak labels)."""
    target = F.adaptive_avg_pool2d(target.unsqueeze(1), logits.shape[-2:]).squeeze(1)
    weight = None
    if valid is not None:
        weight = (F.adaptive_avg_pool2d(valid.unsqueeze(1), logits.shape[-2:]).squeeze(1) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight,
                                             pos_weight=torch.tensor(pos_weight, device=logits.device))
    return bce + dice_loss(logits if valid is None else logits.masked_fill(weight == 0, -20.0), target)


def classifier_steps(source: BatchSource, ctx: TrainContext, weights: torch.Tensor, precision: str, seed: int,
                     stream: str = "labelled"):  # noqa: ANN201
    def steps(epoch: int, model: nn.Module) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + ctx.rank)
        w = weights.to(ctx.device)
        for batch in source.epoch(stream, epoch):
            (x,) = augment.geometric(batch["image"].cpu(), gen)
            x = augment.photometric(x, gen).to(ctx.device)
            with autocast(ctx.device, precision):
                logits, _ = model(x)
            yield F.cross_entropy(logits.float(), batch["target"].to(ctx.device), weight=w, label_smoothing=0.05)
    return steps


def segmenter_steps(source: BatchSource, ctx: TrainContext, precision: str, seed: int, target_key: str = "mask",
                    stream: str = "labelled", tile: int = 0):  # noqa: ANN201
    """Segmentation loss per batch; ``tile`` > 0 (a tiled segmenter): one random crop of that size
    per image, half of them over a defect (``models.tiling.random_crops``)."""
    def steps(epoch: int, model: nn.Module) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + ctx.rank)
        for batch in source.epoch(stream, epoch):
            x, target = augment.geometric(batch["image"].cpu(), gen, batch[target_key].cpu())
            if tile:
                x, target = random_crops(x, target, tile, gen)
            x = augment.photometric(x, gen).to(ctx.device)
            with autocast(ctx.device, precision):
                logits = model(x)
            yield segmentation_loss(logits.float(), target.to(ctx.device))
    return steps


@register_setting
class Supervised(TrainingSetting):
    name = "supervised"
    description = "every training image labelled: a classifier over defect classes, or segmentation from masks"
    methods = ("classifier", "segmenter")
    default_epochs = 8
    default_lr = 1e-3

    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        missing = missing_verdicts(data)
        if self.method(spec) == "segmenter" and data.count("labelled", defect=True, with_masks=True) == 0:
            missing.append("no defect masks in the train split (segmenter learns from masks; "
                           "use --method classifier, or --setting weakly for boxes)")
        return missing

    def select(self, data: RunData, spec: TrainSpec) -> dict[str, list[dict[str, Any]]]:
        rows = data.labelled
        if self.method(spec) == "segmenter":  # defects without a mask say nothing about pixels
            rows = [r for r in rows if not r.defect or r.mask_key]
        return {"labelled": rows}

    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        cfg = self.optim(spec)
        if detector.name == "segmenter":
            steps = segmenter_steps(source, ctx, spec.precision, spec.seed, tile=detector.config.tile)
        else:
            weighted = getattr(detector.config, "class_weighted", True)
            weights = class_weights(class_counts) if weighted else torch.ones(len(class_counts))
            steps = classifier_steps(source, ctx, weights, spec.precision, spec.seed)
        history = train_network(detector.net, steps, cfg, ctx)
        detector.fitted = True
        return history
