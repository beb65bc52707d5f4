"""Semi-supervised: a few labelled images plus a pool of unlabelled ones (FixMatch, Sohn et al. 2020).

Each step takes a labelled batch (weak view: flips/rotations + photometric jitter; class-weighted
cross-entropy, exactly the supervised classifier's loss) and ``mu`` unlabelled batches. The model
labels the weak view of each unlabelled image without gradients; where its top class probability
reaches ``tau`` that class becomes the image's pseudo-label, and the strong view (more jitter,
noise, blur, cut-out) is trained towards it. Unconfident images add nothing (but are still run
through the network, so every step has the same shape on every worker).

An epoch is a fixed number of steps that every worker computes alike from the stream sizes
(``BatchSource.size``, the same on every rank): enough to pass over the unlabelled pool once and
over the labelled rows at least once. Both streams cycle (each pass a fresh shuffle) until then.

After training, ``store_pseudo_labels`` writes the model's confident verdicts on the unlabelled
pool to the catalog as ``source = pseudo`` annotations (``after_training``); they never decide an
image's label (``catalog.queries.image_labels`` reads human and imported annotations only).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flawline.catalog import Catalog, Label
from flawline.data import augment
from flawline.errors import ConfigError, InvalidInput
from flawline.models import Detector
from flawline.models.base import iter_batches
from flawline.storage import ObjectStore
from flawline.train.context import TrainContext
from flawline.train.data import BatchSource, RunData
from flawline.train.loop import autocast, train_network
from flawline.train.pseudo import PseudoVerdict, predict_and_store
from flawline.train.settings import TrainingSetting, missing_verdicts, register_setting
from flawline.train.spec import TrainSpec
from flawline.train.supervised import class_weights, classifier_steps

if TYPE_CHECKING:
    from flawline.train.runner import RunPlan

PASS_STRIDE = 1000  # virtual epoch numbers for repeated passes over a stream within one epoch


def cycle(source: BatchSource, stream: str, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``stream`` without end: pass ``p`` of epoch ``e`` is the source's epoch
    ``e * PASS_STRIDE + p`` (a fresh shuffle each pass)."""
    for p in range(PASS_STRIDE):
        empty = True
        for batch in source.epoch(stream, epoch * PASS_STRIDE + p):
            empty = False
            yield batch
        if empty:
            raise InvalidInput(f"stream {stream!r} gave this worker no batches")
    raise RuntimeError(f"stream {stream!r}: more than {PASS_STRIDE} passes in one epoch")


class Cycled:
    """A BatchSource whose every epoch is exactly ``steps`` batches of the wrapped one, cycling."""

    def __init__(self, source: BatchSource, steps: int) -> None:
        self.source, self.steps = source, steps

    def size(self, stream: str) -> int:
        return self.source.size(stream)

    def epoch(self, stream: str, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for _, batch in zip(range(self.steps), cycle(self.source, stream, epoch)):
            yield batch


@register_setting
class SemiSupervised(TrainingSetting):
    name = "semisupervised"
    description = ("a few labels plus an unlabelled pool: FixMatch pseudo-labels (weak view) and "
                   "consistency (strong view)")
    methods = ("classifier",)
    streams = ("labelled", "unlabelled")
    default_epochs = 10
    default_lr = 1e-3
    tau = 0.95  # confidence a pseudo-label needs (training, and storing in the catalog)
    mu = 2  # unlabelled batches per labelled batch in a step
    unlabelled_weight = 1.0  # lambda_u: weight of the consistency loss

    def missing_labels(self, data: RunData, spec: TrainSpec) -> list[str]:
        missing = missing_verdicts(data)
        if data.count("unlabelled") == 0:
            missing.append("no unlabelled images in the train split (import some, or hold labels back "
                           "with a label fraction below 1)")
        return missing

    def steps_per_epoch(self, source: BatchSource, batch_size: int) -> int:
        """One pass over the unlabelled pool (``mu`` batches a step), at least one over the labelled
        rows; from stream sizes alone, so every worker agrees."""
        unlabelled = -(-source.size("unlabelled") // (self.mu * batch_size))
        labelled = -(-source.size("labelled") // batch_size)
        return max(unlabelled, labelled, 1)

    def train(self, detector: Detector, source: BatchSource, spec: TrainSpec, ctx: TrainContext,
              class_counts: list[int]) -> list[dict[str, Any]]:
        n_steps = self.steps_per_epoch(source, spec.batch_size)
        labelled_losses = classifier_steps(Cycled(source, n_steps), ctx, class_weights(class_counts),
                                           spec.precision, spec.seed)
        seen = {"kept": 0, "total": 0}

        def steps(epoch: int, model: nn.Module) -> Iterator[torch.Tensor]:
            seen.update(kept=0, total=0)
            gen = torch.Generator().manual_seed(spec.seed * 7919 + epoch * 31 + ctx.rank + 104_729)
            unlabelled = cycle(source, "unlabelled", epoch)
            for loss_l in labelled_losses(epoch, model):  # n_steps labelled batches
                x = torch.cat([next(unlabelled)["image"].cpu() for _ in range(self.mu)])
                (geo,) = augment.geometric(x, gen)
                weak = augment.photometric(geo, gen).to(ctx.device)
                (geo,) = augment.geometric(x, gen)
                strong = augment.strong(geo, gen).to(ctx.device)
                with torch.no_grad(), autocast(ctx.device, spec.precision):
                    logits_w, _ = model(weak)
                conf, pseudo = logits_w.float().softmax(1).max(1)
                keep = (conf >= self.tau).float()
                with autocast(ctx.device, spec.precision):
                    logits_s, _ = model(strong)
                loss_u = (F.cross_entropy(logits_s.float(), pseudo, reduction="none") * keep).mean()
                seen["kept"] += int(keep.sum())
                seen["total"] += keep.numel()
                yield loss_l + self.unlabelled_weight * loss_u

        def extra(epoch: int) -> dict[str, Any]:
            return {"pseudo_label_rate": round(ctx.mean(seen["kept"] / max(seen["total"], 1)), 4)}

        history = train_network(detector.net, steps, self.optim(spec), ctx, extra)
        detector.fitted = True
        detector.info.update(tau=self.tau, mu=self.mu, steps_per_epoch=n_steps)
        return history

    def after_training(self, catalog: Catalog, store: ObjectStore, plan: RunPlan, detector: Detector,
                       model_name: str) -> dict[str, Any]:
        n = store_pseudo_labels(catalog, detector, store, plan.data.unlabelled, plan.spec.image_size,
                                self.tau, model_name=model_name)
        return {"pseudo_labels": n}


@torch.no_grad()
def store_pseudo_labels(catalog: Catalog, detector: Detector, store: ObjectStore, rows: list[dict[str, Any]],
                        image_size: int, tau: float, *, model_name: str | None = None) -> int:
    """Predict ``rows`` (RunData rows) with a trained classifier and store every verdict whose class
    probability reaches ``tau`` as an annotation with ``source = pseudo``, ``confidence`` = that
    probability and ``annotator = "flawline:<model name>"`` (``flawline.train.pseudo``). This
    annotator's earlier pseudo-labels on these images are replaced (an image it is no longer
    confident about loses its old one). Returns the number stored.

    Raises ``ConfigError`` when ``detector`` is not a classifier (no class probabilities)."""
    net = getattr(detector, "net", None)
    classes = getattr(detector.config, "classes", None)
    if net is None or not classes:
        raise ConfigError(f"{detector.name}: pseudo-labels need a classifier (class probabilities)")
    net.eval()

    def verdicts(ids: list[int], images: torch.Tensor) -> list[PseudoVerdict]:
        probs = []
        for batch in iter_batches(images, detector.config.batch_size):
            with detector.autocast():
                logits, _ = net(detector.prepare(batch))
            probs.append(logits.float().softmax(1).cpu())
        conf, cls = torch.cat(probs).max(1)
        return [PseudoVerdict(i, Label.defect if k else Label.normal, float(p),
                              classes[k] if k and classes[k] != "defect" else None)
                for i, k, p in zip(ids, cls.tolist(), conf) if float(p) >= tau]

    return predict_and_store(catalog, store, rows, image_size, f"flawline:{model_name or detector.name}", verdicts)
