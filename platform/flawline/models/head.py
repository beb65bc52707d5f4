"""The mixed-supervision image head: which inputs, which penalty, chosen by cross-validation.

Plain numpy + scikit-learn (``LogisticRegression``, ``StratifiedKFold``, ``roc_auc_score``,
``PCA``); ``flawline.models.mixed`` turns the result into torch buffers for its scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Z_SCALE = 100.0  # z enters the head multiplied by this: its L2 penalty is 1/Z_SCALE**2 of the embedding's


PATCH_COMPONENTS = 16  # principal components of patch features the patch head uses
NORMAL_PATCHES_PER_IMAGE = 48  # negatives sampled from each normal image
TOP_PATCHES_WEAK = 3  # defect images without mask or box: their most anomalous patches are positives


@dataclass
class PatchHead:
    """Logistic regression on whitened patch features: logit = (f - mean) @ proj @ coef + intercept."""

    mean: np.ndarray  # [D]
    proj: np.ndarray  # [D, k]
    coef: np.ndarray  # [k]
    intercept: float

    def logits(self, patches: np.ndarray) -> np.ndarray:
        """[..., D] → [...]."""
        return ((patches.astype(np.float32) - self.mean) @ self.proj) @ self.coef + self.intercept

    def image_max(self, patches: np.ndarray) -> np.ndarray:
        """[N, P, D] → [N]: each image's most defect-like patch."""
        return np.stack([self.logits(p).max() for p in patches]) if len(patches) else np.zeros(0)


def patch_training_set(normal_patches: np.ndarray, defect_patches: np.ndarray, defect_targets: list[np.ndarray | None],
                       defect_z: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches and 0/1 targets: sampled patches of normal images (negatives); in defect images the
    patches a mask or box covers by half or more (positives) and those it does not touch
    (negatives); defect images with neither: their ``TOP_PATCHES_WEAK`` most anomalous patches by
    the base map ``defect_z`` [N, P] (multiple-instance learning's positive bag)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for p in normal_patches:
        idx = rng.choice(len(p), size=min(NORMAL_PATCHES_PER_IMAGE, len(p)), replace=False)
        xs.append(p[idx])
        ys.append(np.zeros(len(idx), bool))
    for p, target, z in zip(defect_patches, defect_targets, defect_z):
        if target is None:
            idx = np.argsort(-z)[:TOP_PATCHES_WEAK]
            xs.append(p[idx])
            ys.append(np.ones(len(idx), bool))
            continue
        pos, neg = np.flatnonzero(target >= 0.5), np.flatnonzero(target == 0)
        if not len(pos):  # a region smaller than a patch: its most covered patch
            pos = np.array([int(np.argmax(target))])
        neg = rng.choice(neg, size=min(NORMAL_PATCHES_PER_IMAGE // 2, len(neg)), replace=False) if len(neg) else neg
        xs += [p[pos], p[neg]]
        ys += [np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def fit_patch_head(normal_patches: np.ndarray, defect_patches: np.ndarray, defect_targets: list[np.ndarray | None],
                   defect_z: np.ndarray, c: float = 0.1, seed: int = 0) -> PatchHead:
    from sklearn.linear_model import LogisticRegression

    x, y = patch_training_set(normal_patches, defect_patches, defect_targets, defect_z, seed)
    mean, proj = _whiten(x, PATCH_COMPONENTS)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit((x - mean) @ proj, y)
    return PatchHead(mean, proj, model.coef_.ravel().astype(np.float32), float(model.intercept_[0]))


@dataclass
class HeadFit:
    head: dict[str, Any]  # pca_mean [D], pca [D, k], coef_z, coef_e [k], coef_p, patch head, intercept, chosen
    chosen: str  # "z" or "z+embedding(C=…)"
    cv_auroc: dict[str, float]  # per candidate, out-of-fold ROC-AUC (empty when not cross-validated)
    oof_scores: np.ndarray  # [N] out-of-fold logits of the chosen candidate (normals first, then defects)
    oof_labels: np.ndarray  # [N] bool


def _design(z: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    cols = [Z_SCALE * z[:, None]]
    if extra is not None:
        cols.append(extra.reshape(len(z), -1))
    return np.concatenate(cols, 1)


def _whiten(pooled: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], projection [D, k]) onto the first k principal components, each scaled to unit
    variance (so one L2 penalty treats them alike)."""
    from sklearn.decomposition import PCA

    k = int(min(components, pooled.shape[0] - 1, pooled.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit(pooled)
    scale = np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
    return pca.mean_.astype(np.float32), (pca.components_.T / scale).astype(np.float32)


def _fit(z: np.ndarray, extra: np.ndarray | None, y: np.ndarray, c: float):  # noqa: ANN202
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(_design(z, extra), y)


def fit_image_head(z_normal: np.ndarray, pooled_normal: np.ndarray, z_defect: np.ndarray,
                   pooled_defect: np.ndarray, *, patches_normal: np.ndarray | None = None,
                   patches_defect: np.ndarray | None = None, patch_z_defect: np.ndarray | None = None,
                   targets_defect: list[np.ndarray | None] | None = None, components: int = 16,
                   penalties: tuple[float, ...] = (0.03, 0.3, 3.0), folds: int = 5,
                   min_defects: int = 10, margin: float = 0.005, seed: int = 0) -> HeadFit:
    """Fit the head on z-scores of the base detector, pooled backbone features and (when patches
    are given) a patch head's most defect-like patch per image.

    Candidates: "z" (logistic regression on z alone: the base detector's ranking); with at least
    ``min_defects`` defects also "z+patch" (z and the patch head's image maximum;
    the patch head learns from masks, boxes, or the most anomalous patches of defect images with
    neither) and "z+embedding(C)" for each C in ``penalties``. With two or more defects they are
    compared by the ROC-AUC of stratified out-of-fold scores (the patch head, too, is refitted
    without each fold's images); a richer candidate wins only if it beats "z" by ``margin``. With
    no defects the head is the identity on z."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from flawline.models.mixed import identity_head

    z_normal, z_defect = np.asarray(z_normal, np.float64), np.asarray(z_defect, np.float64)
    n_n, n_d = len(z_normal), len(z_defect)
    labels = np.r_[np.zeros(n_n, bool), np.ones(n_d, bool)]
    z = np.r_[z_normal, z_defect]
    if n_d == 0 or n_n == 0:
        return HeadFit(identity_head(), "z (no labelled defects)" if n_d == 0 else "z (no labelled normals)", {},
                       z, labels)
    pooled = np.concatenate([pooled_normal, pooled_defect]).astype(np.float64)
    rich = n_d >= min_defects and n_n + n_d > 3
    candidates: list[tuple[str, float]] = [("z", 1.0)]
    if rich and patches_normal is not None and patches_defect is not None:
        candidates.append(("z+patch", 1.0))
    if rich and components > 0:
        candidates += [(f"z+embedding(C={c:g})", c) for c in penalties]
    n_folds = int(min(folds, n_d, n_n))
    splits = (list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(z, labels))
              if n_folds >= 2 else [])
    targets = targets_defect if targets_defect is not None else [None] * n_d

    def patch_head(idx: np.ndarray) -> PatchHead:
        nn_, dd = idx[idx < n_n], idx[idx >= n_n] - n_n
        return fit_patch_head(patches_normal[nn_], patches_defect[dd], [targets[i] for i in dd],
                              patch_z_defect[dd], seed=seed)

    def patch_max(head: PatchHead, idx: np.ndarray) -> np.ndarray:
        return np.array([head.logits(patches_normal[i] if i < n_n else patches_defect[i - n_n]).max()
                         for i in idx])

    oof_patch = None
    if any(name == "z+patch" for name, _ in candidates):
        oof_patch = np.zeros(len(z))
        for tr, te in splits:
            oof_patch[te] = patch_max(patch_head(tr), te)

    def extra(name: str, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if name == "z":
            return None, None
        if name == "z+patch":
            return oof_patch[tr], oof_patch[te]
        mean, proj = _whiten(pooled[tr], components)
        return (pooled[tr] - mean) @ proj, (pooled[te] - mean) @ proj

    cv: dict[str, float] = {}
    oof_by: dict[str, np.ndarray] = {}
    for name, c in candidates if splits else []:
        oof = np.zeros(len(z))
        for tr, te in splits:
            e_tr, e_te = extra(name, tr, te)
            oof[te] = _fit(z[tr], e_tr, labels[tr], c).decision_function(_design(z[te], e_te))
        cv[name] = round(float(roc_auc_score(labels, oof)), 6)
        oof_by[name] = oof
    richer = {k: v for k, v in cv.items() if k != "z" and v >= cv["z"] + margin}
    best = max(richer, key=richer.get) if richer else "z"
    c_best = dict(candidates)[best]
    everything = np.arange(len(z))
    e_all, _ = extra(best, everything, everything)
    model = _fit(z, e_all, labels, c_best)
    coef = model.coef_.ravel()
    coef_z = float(coef[0] * Z_SCALE)
    if best == "z" and coef_z <= 0:  # labels that contradict the base: keep its ranking
        return HeadFit(identity_head(), "z (the labels did not rank with the base score)", cv,
                       oof_by.get("z", z), labels)
    head = identity_head()
    head.update(coef_z=coef_z, intercept=float(model.intercept_[0]), chosen=best)
    if best == "z+patch":
        ph = patch_head(everything)
        head.update(patch_mean=torch.from_numpy(ph.mean), patch_proj=torch.from_numpy(ph.proj),
                    patch_coef=torch.from_numpy(ph.coef), patch_intercept=ph.intercept, coef_p=float(coef[1]))
    elif best != "z":
        mean, proj = _whiten(pooled, components)
        head.update(pca_mean=torch.from_numpy(mean), pca=torch.from_numpy(proj),
                    coef_e=torch.from_numpy(coef[1:].astype(np.float32)))
    oof = oof_by.get(best)
    if oof is None:  # not cross-validated: in-sample logits (stated in ``chosen``)
        oof = model.decision_function(_design(z, e_all))
        best = f"{best} (1 defect: not cross-validated)"
    return HeadFit(head, best, cv, oof, labels)
