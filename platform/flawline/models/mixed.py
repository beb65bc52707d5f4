"""Mixed supervision: a normal-only detector refined by whatever labels exist.

The survey's "few defect labels" setting (``../shared/seeds/000_…``, section 3.3) and mixed
supervision in the sense of Božič, Tabernik and Skočaj, "Mixed supervision for surface-defect
detection" (Computers in Industry, 2021): one model learns from normal images, image-level verdicts
and the few annotated defects at once, instead of one model per kind of label.

Parts, all in one prediction path (``MixedScorer``, which ONNX export runs too):

- ``base``: a normal-only detector (``base_method``: patchcore, padim or flow) fitted on normal
  images. It gives the anomaly score s [B] and map m [B, S, S], and the backbone's feature maps it
  computed them from (``forward_features``: no second backbone pass).
- normal statistics: mean and standard deviation of s and of m on normal images the base was not
  fitted on, so z = (s - mean) / std is in units of the normal spread.
- a head: logistic regression (scikit-learn) on z and, where labels carry it, the whitened
  principal components of the globally pooled backbone features (what an image looks like as a
  whole), the patch contrast, or both. The patch contrast (``flawline.models.head.PatchContrast``): per patch, the nearest-neighbour distance to
  a normal patch bank minus that to a bank of labelled defect patches (from masks, boxes, or the
  most anomalous patches of images with a verdict only), the image taking its highest patch. The
  weight on z is (almost) unpenalised, the others are L2-penalised, so with few defects the head
  stays close to the base detector. Which inputs are used is chosen by stratified
  cross-validation on the labelled images with the one-standard-error rule; "z alone" is always
  a candidate, so labels replace the base detector's ranking only where they beat it, fold by
  fold, on images they were not fitted on.

Image score: the head's logit (a monotone function of z when the head uses z alone, and z itself
with no labelled defects: then the scores rank exactly as the base detector's). Pixel map: the
base map in normal-spread units, (m - mean_m) / std_m, plus the patch contrast map (weighted as
in the image score) where the head uses it. The threshold is chosen by the setting on
out-of-fold scores of images the model was not fitted on (``flawline.train.mixed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flawline.errors import ConfigError, InvalidInput
from flawline.models.base import Detector, DetectorConfig, Embedded, create_detector, detector_class, register_detector
from flawline.models.features import patch_features, upsample_map
from flawline.models.neighbors import nearest_distances

MIN_BANK_NORMALS = 15  # fewer held-back normal images: no normal patch bank, so no patch contrast
SHARED_FIELDS = ("backbone", "weights", "image_size", "batch_size", "device", "seed", "precision")
BASE_METHODS = ("patchcore", "padim", "flow")


def pooled_features(feats: list[torch.Tensor]) -> torch.Tensor:
    """Backbone maps [B, C_i, h_i, w_i] → [B, 2 * sum(C_i)]: global average and global max per
    channel (the max keeps small defects that the average washes out)."""
    return torch.cat([f.float().mean((2, 3)) for f in feats] + [f.float().amax((2, 3)) for f in feats], 1)


class MixedScorer(nn.Module):
    """Images [B, 3, S, S] → (scores [B] = the head's logit, maps [B, S, S]: the base map in
    normal-spread units, plus the patch contrast map where the head uses it). ``chunk``: query
    patches per distance block (None: one block, for ONNX export)."""

    def __init__(self, base: nn.Module, stats: torch.Tensor, head: dict[str, Any], blur_sigma: float,
                 chunk: int | None = 1024) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("stats", stats.float())  # score mean, score std, map mean, map std
        for name in ("pca_mean", "pca", "coef_e", "normal_bank", "defect_bank"):
            self.register_buffer(name, head[name].float().to(stats.device))
        self.coef_z, self.intercept, self.coef_p = float(head["coef_z"]), float(head["intercept"]), float(head["coef_p"])
        self.uses_embedding = self.pca.shape[-1] > 0
        self.uses_patches = self.defect_bank.shape[0] > 0
        self.blur_sigma, self.chunk = blur_sigma, chunk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, m, feats = self.base.forward_features(x)
        z = (s.float() - self.stats[0]) / self.stats[1]
        z_map = (m.float() - self.stats[2]) / self.stats[3]
        logit = self.coef_z * z + self.intercept
        if self.uses_embedding:
            logit = logit + ((pooled_features(feats) - self.pca_mean) @ self.pca) @ self.coef_e
        if self.uses_patches:
            f = patch_features([t.float() for t in feats])
            b, d, h, w = f.shape
            q = f.permute(0, 2, 3, 1).reshape(-1, d)
            chunk = self.chunk or q.shape[0]
            contrast = (nearest_distances(q, self.normal_bank, 1, chunk)
                        - nearest_distances(q, self.defect_bank, 1, chunk)).reshape(b, h, w)
            logit = logit + self.coef_p * contrast.flatten(1).max(1).values
            z_map = z_map + self.coef_p / max(self.coef_z, 1e-6) * upsample_map(contrast, x.shape[-2:],
                                                                                 self.blur_sigma)
        return logit, z_map


@dataclass
class MixedConfig(DetectorConfig):
    base_method: str = "padim"  # the normal-only detector refined by the labels
    base_options: dict[str, Any] = field(default_factory=dict)  # its own settings (e.g. coreset_ratio)
    components: int = 16  # principal components of the pooled features the head may use
    penalties: tuple[float, ...] = (0.03, 0.3, 3.0)  # inverse L2 strengths (C) tried for the embedding
    folds: int = 5  # cross-validation folds (fewer when there are fewer labelled defects)
    min_defects: int = 20  # below this many labelled defects the head uses z alone (CV needs >= 4 a fold)
    margin: float = 0.005  # a richer head must beat z's out-of-fold ROC-AUC by this much
    bank_fraction: float = 1 / 3  # held-back normal images that form the normal patch bank
    # Share of the fit images left out as outliers by cross-fitting (``_trimmed``); the mixed setting
    # sets it when the base fits on an unlabelled pool, which may hold defects.
    trim: float = 0.0
    blur_sigma: float = 4.0  # the patch contrast map, like the base maps


@dataclass
class HeadInputs:
    """What the head learns from, for a set of images: base scores [N], pooled features [N, D],
    patch features [N, P, D'] (float16, P = h * w positions) with the base map at patch
    resolution [N, P], and per image the share of each patch a mask or box covers ([P], or None
    where the image has neither)."""

    scores: np.ndarray
    pooled: np.ndarray
    patches: np.ndarray
    patch_map: np.ndarray
    targets: list[np.ndarray | None] = field(default_factory=list)

    @staticmethod
    def concat(parts: list[HeadInputs]) -> HeadInputs:
        if not parts:
            return HeadInputs(np.zeros(0), np.zeros((0, 0), np.float32), np.zeros((0, 0, 0), np.float16),
                              np.zeros((0, 0), np.float32), [])
        return HeadInputs(*(np.concatenate([getattr(p, k) for p in parts])
                            for k in ("scores", "pooled", "patches", "patch_map")),
                          [t for p in parts for t in p.targets])

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, idx: np.ndarray, targets: list[np.ndarray | None] | None = None) -> HeadInputs:
        """The rows ``idx``; ``targets`` replaces theirs (e.g. boxes instead of masks)."""
        own = [self.targets[i] for i in idx] if self.targets else [None] * len(idx)
        return HeadInputs(self.scores[idx], self.pooled[idx], self.patches[idx], self.patch_map[idx],
                          own if targets is None else list(targets))


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64).ravel()
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return mean, max(std, 1e-3 * abs(mean), 1e-6)  # never divide by (about) zero


@register_detector
class MixedDetector(Detector):
    """Fitted in two steps by the ``mixed`` setting: ``fit_embedded`` fits the base on normal
    images (embeddings may come from other processes); ``fit_head`` then learns the normal
    statistics and the image head from images the base was not fitted on."""

    name = "mixed"
    Config = MixedConfig
    learns_from_labels = True
    no_tiling = "its head learns from whole-image features; a tiled segmenter or normal-only detector can be"

    def __init__(self, config: MixedConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c: MixedConfig = self.config
        if c.base_method not in BASE_METHODS:
            raise ConfigError(f"mixed: base_method {c.base_method!r} must be one of {', '.join(BASE_METHODS)}")
        detector_class(c.base_method)
        shared = {k: getattr(c, k) for k in SHARED_FIELDS}
        clash = sorted(set(shared) & set(c.base_options))
        if clash:
            raise ConfigError(f"mixed: base_options cannot set {', '.join(clash)} (shared with the base detector)")
        if c.components < 0 or c.folds < 2:
            raise ConfigError("mixed: components must be >= 0 and folds >= 2")
        if not 0.0 <= c.trim < 0.5:
            raise ConfigError(f"mixed: trim {c.trim} must lie in [0, 0.5)")
        self.base: Detector = create_detector(c.base_method, **shared, **c.base_options)
        self.stats: torch.Tensor | None = None
        self.head: dict[str, Any] | None = None
        self._scorer: MixedScorer | None = None  # pca_mean, pca, coef_z, coef_e, intercept, chosen

    # -- the backbone is the base detector's ----------------------------------------------------
    @property
    def extractor(self):  # noqa: ANN201
        return self.base.extractor

    # -- step 1: the base, on normal images -----------------------------------------------------
    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> Embedded:
        """The base detector's ``embed`` (patch features, or multi-scale features for flow)."""
        return self.base.embed(x)

    def _fit_embedded(self, embedded: Iterator[Embedded]) -> int:
        c: MixedConfig = self.config
        if c.trim <= 0:
            self.base.fit_embedded(embedded)
        else:
            self.base.fit_embedded(self._trimmed([_cpu(e) for e in embedded]))
        self.stats, self.head, self._scorer = None, None, None
        return int(self.base.info.get("train_images", 0))

    def _trimmed(self, batches: list[Embedded]) -> Iterator[Embedded]:
        """Cross-fitting on an unlabelled pool that may hold defects: the batches are dealt into two
        halves, a base detector is fitted on each and scores the other half, and the ``trim`` share
        of each half that scores highest (the confident outliers) is left out of the final fit.
        Yields the kept rows, batch by batch."""
        c: MixedConfig = self.config
        shared = {k: getattr(c, k) for k in SHARED_FIELDS}
        halves = [batches[0::2], batches[1::2]]
        if not halves[1]:  # one batch: nothing to cross-fit with
            self.info["trimmed"] = {"share": 0.0, "left_out": 0, "note": "one batch: nothing to cross-fit"}
            yield from batches
            return
        keep: list[torch.Tensor] = [None] * len(batches)  # type: ignore[list-item]
        left_out = 0
        for h, (fit_on, score) in enumerate(((halves[0], halves[1]), (halves[1], halves[0]))):
            model = create_detector(c.base_method, **shared, **c.base_options)
            model._extractor = self.base.extractor  # one backbone for the three fits
            model.fit_embedded(iter(fit_on))
            scores = torch.cat([model.score_embedded(e).float().cpu() for e in score])
            flags = torch.ones(len(scores), dtype=torch.bool)  # rank cut: ties never empty a half
            flags[torch.argsort(scores, descending=True)[:int(round(c.trim * len(scores)))]] = False
            left_out += int((~flags).sum())
            start = 0
            for i, e in enumerate(score):
                n = _rows_of(e)
                keep[(1 - h) + 2 * i] = flags[start:start + n]
                start += n
        self.info["trimmed"] = {"share": c.trim, "left_out": left_out}
        for e, k in zip(batches, keep):
            if k.any():
                yield _take(e, k)

    # -- step 2: statistics and head, on images the base did not see ----------------------------
    @torch.no_grad()
    def head_inputs(self, images: torch.Tensor, regions: torch.Tensor | None = None,
                    has_region: torch.Tensor | None = None) -> HeadInputs:
        """Head inputs of a batch of images [B, C, H, W] in [0, 1]; ``regions`` [B, H', W'] (masks
        or rasterised boxes, > 0.5 = defect) where ``has_region`` [B] says an image has one."""
        if not self.base.fitted:
            raise ConfigError("mixed: fit the base detector first")
        scorer = self.base.scorer()
        with self.autocast():
            s, m, feats = scorer.forward_features(self.prepare(images))
        f = patch_features([t.float() for t in feats])  # [B, D, h, w]
        hw = tuple(f.shape[-2:])
        patch_map = F.adaptive_avg_pool2d(m.float().unsqueeze(1), hw).flatten(1)
        targets: list[np.ndarray | None] = [None] * len(s)
        if regions is not None and has_region is not None:
            cover = F.adaptive_avg_pool2d((regions.float() > 0.5).float().unsqueeze(1), hw).flatten(1).cpu().numpy()
            targets = [cover[i] if bool(has_region[i]) else None for i in range(len(s))]
        return HeadInputs(s.float().cpu().numpy().astype(np.float64), pooled_features(feats).cpu().numpy(),
                          f.flatten(2).transpose(1, 2).cpu().numpy().astype(np.float16),
                          patch_map.cpu().numpy(), targets)

    def set_normal_stats(self, scores: np.ndarray, maps: np.ndarray) -> None:
        """From the base's scores [N] and maps (any shape, e.g. ``HeadInputs.patch_map``) on normal
        images it was not fitted on."""
        if len(scores) == 0:
            raise InvalidInput("mixed: no normal images to take the normal score statistics from")
        s_mean, s_std = _mean_std(scores)
        m_mean, m_std = _mean_std(maps)
        self.stats = torch.tensor([s_mean, s_std, m_mean, m_std], dtype=torch.float32)
        self._scorer = None
        self.info["normal_stats"] = {"images": int(len(scores)), "score_mean": round(s_mean, 6),
                                     "score_std": round(s_std, 6), "map_mean": round(m_mean, 6),
                                     "map_std": round(m_std, 6)}

    def z(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - float(self.stats[0])) / float(self.stats[1])

    def fit_head(self, normal: HeadInputs, defects: HeadInputs) -> dict[str, Any]:
        """Choose and fit the head; returns what was chosen and its out-of-fold scores.

        ``normal``/``defects``: head inputs of labelled normal images the base was not fitted on and
        of labelled defect images. A seeded ``bank_fraction`` of the normal images (when there are
        at least ``MIN_BANK_NORMALS``, and ``min_defects`` defects for the patch contrast to be a
        candidate) gives the normal patch bank and takes no other part, so no
        image meets its own patches. Returns ``{"chosen", "cv_auroc", "oof_scores" [N],
        "oof_labels" [N]}`` (the head's normals first, then the defects)."""
        from flawline.models.head import coreset, fit_image_head

        if self.stats is None:
            raise ConfigError("mixed: set the normal statistics first (set_normal_stats)")
        c: MixedConfig = self.config
        bank, bank_images = None, 0
        if len(normal) >= MIN_BANK_NORMALS and len(defects) >= c.min_defects:
            order = np.random.default_rng([c.seed, 11]).permutation(len(normal))
            cut = max(1, round(c.bank_fraction * len(normal)))
            bank = coreset(normal.patches[order[:cut]].reshape(-1, normal.patches.shape[-1]), seed=c.seed)
            bank_images = cut
            normal = normal.take(np.sort(order[cut:]))
        result = fit_image_head(self.z(normal.scores), normal.pooled, self.z(defects.scores), defects.pooled,
                                normal_bank=bank, patches_normal=normal.patches, patches_defect=defects.patches,
                                patch_map_defect=defects.patch_map, targets_defect=defects.targets,
                                components=c.components, penalties=c.penalties, folds=c.folds,
                                min_defects=c.min_defects, seed=c.seed)
        self.head, self._scorer = result.head, None
        self.info["head"] = {"chosen": result.chosen, "cv_auroc": result.cv_auroc,
                             "normal_images": len(normal), "defect_images": len(defects),
                             "normal_bank_images": bank_images,
                             "normal_bank": 0 if bank is None else int(bank.shape[0]),
                             "defect_bank": int(result.head["defect_bank"].shape[0])}
        return {"chosen": result.chosen, "cv_auroc": result.cv_auroc, "oof_scores": result.oof_scores,
                "oof_labels": result.oof_labels}

    def scores_from_inputs(self, inputs: HeadInputs) -> tuple[np.ndarray, np.ndarray]:
        """What ``predict`` returns, from cached ``head_inputs`` (benchmarks refit heads many times on
        one backbone pass): scores [N] and maps at the patch grid [N, P] (before upsampling and
        blur). Matches ``predict``'s scores to float16 rounding of the cached patches."""
        from flawline.models.head import PatchContrast

        head = {**identity_head(), **(self.head or {})}
        z = self.z(inputs.scores)
        z_map = (inputs.patch_map - float(self.stats[2])) / float(self.stats[3])
        logit = head["coef_z"] * z + head["intercept"]
        if head["pca"].shape[-1]:
            logit = logit + ((inputs.pooled - head["pca_mean"].numpy()) @ head["pca"].numpy()) @ head["coef_e"].numpy()
        if head["defect_bank"].shape[0]:
            contrast = PatchContrast(head["normal_bank"], head["defect_bank"]).patch_scores(inputs.patches)
            logit = logit + head["coef_p"] * contrast.max(1)
            z_map = z_map + head["coef_p"] / max(head["coef_z"], 1e-6) * contrast
        return logit, z_map

    # -- prediction -----------------------------------------------------------------------------
    def scorer(self, chunked: bool = True) -> MixedScorer:
        if self.stats is None:
            raise ConfigError("mixed: not trained (no normal statistics); train it with --setting mixed")
        head = {**identity_head(), **(self.head or {})}
        return MixedScorer(self.base.scorer(chunked), self.stats.to(self.device), head, self.config.blur_sigma,
                           1024 if chunked else None)

    def _predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scorer is None:  # built once: it copies the banks to the device
            self._scorer = self.scorer()
        return self._scorer(x)

    def state_dict(self) -> dict[str, Any]:
        if self.stats is None:
            raise ConfigError("mixed: not trained (no normal statistics); nothing to save")
        head = {**identity_head(), **(self.head or {})}
        return {"base": self.base.state_dict(), "base_info": dict(self.base.info), "stats": self.stats.cpu(),
                "head": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in head.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.base.info = dict(state.get("base_info") or {})
        self.stats = state["stats"].float()
        self.head, self._scorer = dict(state["head"]), None
        self.fitted = True

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["config"] = {**dataclasses.asdict(self.config), "penalties": list(self.config.penalties)}
        return out


def _rows_of(e: Embedded) -> int:
    return int((e[0] if isinstance(e, tuple) else e).shape[0])


def _cpu(e: Embedded) -> Embedded:
    return tuple(t.cpu() for t in e) if isinstance(e, tuple) else e.cpu()


def _take(e: Embedded, keep: torch.Tensor) -> Embedded:
    return tuple(t[keep] for t in e) if isinstance(e, tuple) else e[keep]


def identity_head() -> dict[str, Any]:
    """The head with no labelled defects: score = z (ranks exactly as the base detector)."""
    return {"pca_mean": torch.zeros(0), "pca": torch.zeros(0, 0), "coef_e": torch.zeros(0), "coef_z": 1.0,
            "intercept": 0.0, "normal_bank": torch.zeros(0, 0), "defect_bank": torch.zeros(0, 0), "coef_p": 0.0,
            "chosen": "z"}
