"""Few-shot: ``shots`` labelled defect images per dataset (the first k of a seeded order) plus the
labelled normal images, trained into the ``fewshot`` detector (``models/fewshot.py``):

1. the normal-only part (PaDiM by default) is fitted on the ``normal`` stream: each worker embeds
   its shard, the embeddings are gathered over all workers (``all_gather_object``, CPU tensors),
   and every worker fits the same model on all of them;
2. its score statistics come from the ``calibration`` stream: normal images held back from that
   fit (a seeded ``calibration_fraction``; with fewer than ``MIN_HOLDOUT_NORMALS`` normal images
   none are held back and the fitted images themselves are used, which understates the spread);
3. the defect segmenter is trained with the gradient loop: each step a batch of normal images, a
   ``synthetic_fraction`` of them given a synthetic defect (CutPaste / Perlin blob, with its
   mask), plus a batch of the real defects (cycled: there are only k of them). Real defects with
   masks are learnt pixel by pixel, those without only at image level (see the detector's notes).

An epoch is one pass over the normal stream, counted from stream sizes so every worker runs the
same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flawline.data import augment
from flawline.data.synthetic import SyntheticDefects
from flawline.errors import ConfigError
from flawline.models import Detector
from flawline.models.fewshot import FewShotDetector, normal_moments
from flawline.train.context import TrainContext
from flawline.train.data import BatchSource, RunData
from flawline.train.loop import autocast, train_network
from flawline.train.semisupervised import Cycled, cycle
from flawline.train.settings import TrainingSetting, register_setting
from flawline.train.spec import TrainSpec
from flawline.train.supervised import segmentation_loss

MIN_HOLDOUT_NORMALS = 5


def gather_objects(obj: Any, ctx: TrainContext) -> list[Any]:
    """``obj`` from every worker, in rank order (just ``[obj]`` in one process)."""
    if ctx.world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _cpu(embedded: Any) -> Any:
    return tuple(t.cpu() for t in embedded) if isinstance(embedded, tuple) else embedded.cpu()


@register_setting
class FewShot(TrainingSetting):
    name = "fewshot"
    description = ("k labelled defects per dataset plus normal images: a normal-only detector combined "
                   "with a segmenter trained on the real and on synthetic defects")
    methods = ("fewshot",)
    streams = ("defects", "normal", "calibration")
    default_epochs = 10
    default_lr = 1e-3
    calibration_fraction = 0.2  # normal images held back from the normal-only fit for its statistics
    synthetic_fraction = 0.5  # share of each normal batch that gets a synthetic defect
    weak_top_fraction = 0.02  # defects without a mask: top share of pixel logits pushed to "defect"

    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        missing = []
        if data.count("labelled", defect=True) == 0:
            missing.append("no labelled defect images in the train split")
        else:
            for name in spec.datasets:
                if not any(r.defect and r.dataset == name for r in data.labelled):
                    missing.append(f"no labelled defect images in the train split of {name!r}")
        if data.count("labelled", defect=False) == 0:
            missing.append("no labelled normal images in the train split")
        return missing

    def shots(self, data: RunData, spec: TrainSpec) -> list[dict[str, Any]]:
        """The first ``spec.shots`` labelled defects of each dataset in a seeded order (all of them
        when a dataset has fewer)."""
        picked = []
        for i, name in enumerate(spec.datasets):
            rows = [r for r in data.labelled if r.defect and r.dataset == name]
            order = np.random.default_rng([spec.seed, i]).permutation(len(rows))
            picked += [rows[j] for j in order[:spec.shots]]
        return picked

    def select(self, data: RunData, spec: TrainSpec) -> dict[str, list[dict[str, Any]]]:
        normal = [r for r in data.labelled if r.defect is False]
        held: set[int] = set()
        if len(normal) >= MIN_HOLDOUT_NORMALS:
            n = max(2, round(self.calibration_fraction * len(normal)))
            held = set(np.random.default_rng(spec.seed).permutation(len(normal))[:n].tolist())
        fit = [r for i, r in enumerate(normal) if i not in held]
        return {"defects": self.shots(data, spec), "normal": fit,
                "calibration": [r for i, r in enumerate(normal) if i in held] if held else fit}

    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        if not isinstance(detector, FewShotDetector):
            raise ConfigError(f"setting 'fewshot' trains the fewshot detector, not {detector.name!r}")
        self.fit_normal(detector, source, ctx)
        n_steps = max(1, -(-source.size("normal") // spec.batch_size))
        history = train_network(detector.segmenter.net, self.segmenter_steps(source, spec, ctx, n_steps),
                                self.optim(spec), ctx)
        detector.segmenter.fitted = True
        detector.fitted = True
        detector.info.update(shots=spec.shots, defect_images=source.size("defects"), steps_per_epoch=n_steps)
        return history

    def fit_normal(self, detector: FewShotDetector, source: BatchSource, ctx: TrainContext) -> None:
        """Fit the normal-only part on every worker's normal images, then its score statistics on
        the held-back ones."""
        normal = detector.normal
        with torch.no_grad(), normal.autocast():
            mine = [_cpu(normal.embed_images(b["image"])) for b in source.epoch("normal", 0)]
        normal.fit_embedded(e for part in gather_objects(mine, ctx) for e in part)
        moments = torch.zeros(6, dtype=torch.float64)
        for b in source.epoch("calibration", 0):
            pred = normal.predict(b["image"])
            moments += normal_moments(torch.from_numpy(pred.scores), torch.from_numpy(pred.maps))
        detector.set_normal_stats(sum(gather_objects(moments, ctx)))
        detector.info["normal"] = dict(normal.info)

    def segmenter_steps(self, source: BatchSource, spec: TrainSpec, ctx: TrainContext, n_steps: int):  # noqa: ANN201
        synth = SyntheticDefects()

        def steps(epoch: int, model: nn.Module) -> Iterator[torch.Tensor]:
            gen = torch.Generator().manual_seed(spec.seed * 7919 + epoch * 31 + ctx.rank + 15_485_863)
            defects = cycle(source, "defects", epoch)
            for batch in Cycled(source, n_steps).epoch("normal", epoch):
                x = batch["image"].cpu()
                k = max(1, round(self.synthetic_fraction * x.shape[0]))
                bad, bad_masks = synth(x[:k], gen)
                real = next(defects)
                images = torch.cat((bad, x[k:], real["image"].cpu()))
                masks = torch.cat((bad_masks.float(), torch.zeros(x.shape[0] - k, *x.shape[-2:]),
                                   real["mask"].cpu().float()))
                pixel = torch.cat((torch.ones(x.shape[0], dtype=torch.bool), real["has_mask"].cpu().bool()))
                images, masks = augment.geometric(images, gen, masks)
                images = augment.photometric(images, gen).to(ctx.device)
                with autocast(ctx.device, spec.precision):
                    logits = model(images).float()
                loss = segmentation_loss(logits[pixel.to(ctx.device)], masks[pixel].to(ctx.device))
                if not pixel.all():  # real defects without a mask: "somewhere in this image"
                    weak = logits[~pixel.to(ctx.device)].flatten(1)
                    top = weak.topk(max(1, int(self.weak_top_fraction * weak.shape[1])), dim=1).values.mean(1)
                    loss = loss + F.binary_cross_entropy_with_logits(top, torch.ones_like(top))
                yield loss
        return steps
