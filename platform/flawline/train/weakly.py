"""Weakly supervised (survey, section 3.3): labels coarser than what the detector outputs.

- ``classifier`` (default): image-level labels only. The classifier is trained on image verdicts
  exactly as in the supervised setting; its class activation maps (CAM) are the defect maps, so
  the labels never say where a defect is but the model still localises it.
- ``segmenter``: coarse boxes or ellipses drawn around defects → a U-Net pixel segmenter.

Box loss ("inner core positive, border ring ignored"). A box or ellipse over-covers its defect:
its border pixels are as likely background as defect, its centre is very likely defect. At the
network's output resolution each region gets a depth per pixel (chessboard distance to the
nearest pixel outside the region, by repeated 3x3 erosion) and each connected region its largest
depth ``m`` (the half-width of a box's shorter side). Then

- pixels outside every region of a defect image, and all pixels of normal images: background;
- pixels deeper than ``core_fraction * m`` (default 0.5: about the inner half of a box in each
  direction, a scaled-down copy of an ellipse): defect;
- the ring between: ignored (``valid`` = 0 in ``supervised.segmentation_loss``: no BCE, no Dice).

For a box drawn tight around a round or elongated defect the core lies inside the defect, so no
background pixel is taught as defect while the loss still fixes where the defect is and that
everything outside the boxes is normal; the U-Net's smoothness fills the ring. Regions one or
two output pixels wide are all core (too small to spare a ring). Overlapping boxes merge into
one region whose core is the inner half of the union.
"""

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
from flawline.train.settings import TrainingSetting, register_setting
from flawline.train.spec import TrainSpec
from flawline.train.supervised import class_weights, classifier_steps, segmentation_loss


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def region_depth(region: torch.Tensor) -> torch.Tensor:
    """[B, H, W] 0/1 → chessboard distance of each region pixel to the nearest pixel outside (1 at
    the region's edge, 0 outside). The image border does not erode: a box cut by the border may
    go on beyond it."""
    x = region.unsqueeze(1).float()
    depth = torch.zeros_like(x)
    while bool(x.any()):
        depth += x
        x = -_dilate(-x)  # 3x3 erosion
    return depth.squeeze(1)


def box_targets(region: torch.Tensor, size: tuple[int, int], core_fraction: float = 0.5,
                known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterised boxes [B, S, S] → (target, valid) at ``size`` (the logits' resolution): target 1
    on each region's core, valid 0 on the ring around it (see the module docstring). ``known``
    [B] bool: images whose every pixel is unknown (a defect without boxes) get valid 0 throughout."""
    inside = F.adaptive_avg_pool2d(region.float().unsqueeze(1), size).squeeze(1) > 0  # any overlap: not background
    depth = region_depth(inside)
    peak = depth.clone()  # each connected region's largest depth, spread over the region
    while True:
        spread = torch.maximum(_dilate(peak.unsqueeze(1)).squeeze(1) * inside, depth)
        if torch.equal(spread, peak):
            break
        peak = spread
    core = inside & (depth > core_fraction * peak)
    valid = ~inside | core
    if known is not None:
        valid = valid & known.view(-1, 1, 1)
    return core.float(), valid.float()


def box_steps(source: BatchSource, ctx: TrainContext, precision: str, seed: int, core_fraction: float = 0.5,
              stream: str = "labelled", tile: int = 0):  # noqa: ANN201
    """Segmenter steps on rasterised boxes with the core/ring loss; ``tile`` as in
    ``supervised.segmenter_steps`` (random crops, half of them over a box)."""
    def steps(epoch: int, model: nn.Module) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + ctx.rank)
        for batch in source.epoch(stream, epoch):
            x, region = augment.geometric(batch["image"].cpu(), gen, batch["region"].cpu())
            if tile:
                x, region = random_crops(x, region, tile, gen)
            x = augment.photometric(x, gen).to(ctx.device)
            with autocast(ctx.device, precision):
                logits = model(x)
            known = (batch["target"] == 0) | batch["has_region"]  # a defect without boxes says nothing
            target, valid = box_targets(region.to(ctx.device), tuple(logits.shape[-2:]), core_fraction,
                                        known.to(ctx.device))
            yield segmentation_loss(logits.float(), target, valid=valid)
    return steps


@register_setting
class WeaklySupervised(TrainingSetting):
    name = "weakly"
    description = ("coarse labels: image verdicts → classifier with CAM maps; "
                   "boxes or ellipses around defects → segmenter")
    methods = ("classifier", "segmenter")
    default_epochs = 8
    default_lr = 1e-3
    core_fraction = 0.5  # inside a region, pixels deeper than this share of its half-width are defect

    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        if self.method(spec) == "segmenter":
            if data.count("labelled", defect=True, with_boxes=True) == 0:
                return ["no boxes or ellipses on defect images in the train split; draw them around the "
                        "defects (Label Studio rectangles or ellipses), or use --method classifier "
                        "(image labels only)"]
            return []
        missing = []
        if data.count("labelled", defect=True) == 0:
            missing.append("no labelled defect images in the train split")
        if data.count("labelled", defect=False) == 0:
            missing.append("no labelled normal images in the train split (the classifier needs both verdicts)")
        return missing

    def select(self, data: RunData, spec: TrainSpec) -> dict[str, list[dict[str, Any]]]:
        rows = data.labelled
        if self.method(spec) == "segmenter":  # a defect without boxes says nothing about its pixels
            rows = [r for r in rows if not r.defect or r.boxes]
        return {"labelled": rows}

    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        cfg = self.optim(spec)
        if detector.name == "segmenter":
            steps = box_steps(source, ctx, spec.precision, spec.seed, self.core_fraction, tile=detector.config.tile)
        else:
            steps = classifier_steps(source, ctx, class_weights(class_counts), spec.precision, spec.seed)
        history = train_network(detector.net, steps, cfg, ctx)
        detector.fitted = True
        return history
