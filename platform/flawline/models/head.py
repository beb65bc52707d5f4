"""The mixed-supervision head: which inputs, which penalty, chosen by cross-validation.

Inputs per image (``flawline.models.mixed.HeadInputs``): the base detector's z-score, pooled
backbone features, and patch features. Two memory banks turn patches into a label-aware score
(``PatchContrast``): a *normal bank* (k-center coreset of patches of normal images held back for
it) and a *defect bank* (k-center coreset of the patches a mask or box covers in labelled defect
images, or of the most anomalous patches where an image has only its verdict). A patch scores
d(normal bank) - d(defect bank): PatchCore's nearest-neighbour distance (Roth et al. 2022), made
two-sided by the labelled defects; an image scores its highest patch.

Plain numpy + scikit-learn (``LogisticRegression``, ``StratifiedKFold``, ``roc_auc_score``,
``PCA``) and flawline's k-center and nearest-neighbour blocks; ``flawline.models.mixed`` turns the
result into torch buffers for its scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flawline.models.neighbors import nearest_distances, select_k_center

Z_SCALE = 100.0  # z enters the head multiplied by this: its L2 penalty is 1/Z_SCALE**2 of the others'
BANK_SIZE = 1024  # patches kept in each memory bank (k-center coreset)
TOP_PATCHES_WEAK = 3  # defect images without mask or box: their most anomalous patches go to the defect bank


def coreset(patches: np.ndarray, size: int = BANK_SIZE, seed: int = 0) -> torch.Tensor:
    """At most ``size`` rows of ``patches`` [n, D] by greedy k-center (float32 tensor)."""
    x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    if len(x) <= size:
        return x
    return x[select_k_center(x, size, seed=seed)].contiguous()


def defect_patches(patches: np.ndarray, targets: list[np.ndarray | None], patch_map: np.ndarray) -> np.ndarray:
    """The defect bank's candidates from defect images [N, P, D]: patches a mask or box covers by
    half or more (the most covered one where a region is smaller than a patch); where an image has
    neither, its ``TOP_PATCHES_WEAK`` most anomalous patches by the base map [N, P]."""
    rows = []
    for p, target, m in zip(patches, targets, patch_map):
        if target is None:
            sel = np.argsort(-m)[:TOP_PATCHES_WEAK]
        else:
            sel = np.flatnonzero(target >= 0.5)
            if not len(sel):  # a region smaller than a patch: the patch it covers most, if any
                sel = np.array([int(np.argmax(target))]) if target.max() > 0 else np.argsort(-m)[:TOP_PATCHES_WEAK]
        rows.append(p[sel])
    return np.concatenate(rows)


def bank_distances(patches: np.ndarray, bank: torch.Tensor) -> np.ndarray:
    """Nearest-neighbour distance of every patch [N, P, D] to ``bank`` [K, D] → [N, P]."""
    if not len(patches):
        return np.zeros(patches.shape[:2], np.float32)
    q = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).reshape(-1, patches.shape[-1])
    return nearest_distances(q, bank, 1, 4096).reshape(patches.shape[:2]).numpy()


@dataclass
class PatchContrast:
    """Two banks; ``image_scores``: max over patches of d(normal bank) - d(defect bank)."""

    normal_bank: torch.Tensor  # [Kn, D]
    defect_bank: torch.Tensor  # [Kd, D]

    def patch_scores(self, patches: np.ndarray, normal_distances: np.ndarray | None = None) -> np.ndarray:
        """[N, P, D] → [N, P]; ``normal_distances`` [N, P]: already computed for the normal bank."""
        dn = bank_distances(patches, self.normal_bank) if normal_distances is None else normal_distances
        return dn - bank_distances(patches, self.defect_bank)

    def image_scores(self, patches: np.ndarray, normal_distances: np.ndarray | None = None) -> np.ndarray:
        return self.patch_scores(patches, normal_distances).max(1) if len(patches) else np.zeros(0)


@dataclass
class HeadFit:
    head: dict[str, Any]  # tensors and floats for MixedScorer (see mixed.identity_head), chosen
    chosen: str  # "z", "z+patches", "z+embedding(C=…)" or both, with a note where it fell back
    cv_auroc: dict[str, float]  # per candidate, mean out-of-fold ROC-AUC over folds (empty when not cross-validated)
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
                   pooled_defect: np.ndarray, *, normal_bank: torch.Tensor | None = None,
                   patches_normal: np.ndarray | None = None, patches_defect: np.ndarray | None = None,
                   patch_map_defect: np.ndarray | None = None, targets_defect: list[np.ndarray | None] | None = None,
                   components: int = 16, penalties: tuple[float, ...] = (0.03, 0.3, 3.0), folds: int = 5,
                   min_defects: int = 20, seed: int = 0) -> HeadFit:
    """Fit the head on z-scores of the base detector ([N_n], [N_d]), pooled backbone features
    ([N, D]) and, with a ``normal_bank`` and patches ([N, P, D']), the two-bank patch contrast.

    Candidates: "z" (logistic regression on z alone: the base detector's ranking); with at least
    ``min_defects`` defects also "z+embedding(C)" for each C in ``penalties``, "z+patches" (z and
    the image's highest patch contrast, the defect bank rebuilt from each fold's training defects)
    and "z+patches+embedding(C)". They are compared fold by fold on stratified out-of-fold ROC-AUC; a richer
    candidate replaces "z" only when its mean gain over "z" exceeds one standard error of the
    per-fold gains (the one-standard-error rule), and the largest such gain wins. With no defects
    the head is the identity on z; with one, "z" without cross-validation."""
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
    targets = targets_defect if targets_defect is not None else [None] * n_d
    if rich and components > 0:
        candidates += [(f"z+embedding(C={c:g})", c) for c in penalties]
    if rich and normal_bank is not None and patches_defect is not None:
        candidates.append(("z+patches", 1.0))
        if components > 0:
            candidates += [(f"z+patches+embedding(C={c:g})", c) for c in penalties]
    n_folds = int(min(folds, n_d, n_n))
    splits = (list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(z, labels))
              if n_folds >= 2 else [])

    banks: dict[bytes, PatchContrast] = {}  # per training set: the final fit reuses the one extra() built

    def contrast(train_idx: np.ndarray) -> PatchContrast:
        key = train_idx.tobytes()
        if key not in banks:
            dd = train_idx[train_idx >= n_n] - n_n
            bank = coreset(defect_patches(patches_defect[dd], [targets[i] for i in dd], patch_map_defect[dd]),
                           seed=seed)
            banks[key] = PatchContrast(normal_bank, bank)
        return banks[key]

    dn_normal = dn_defect = None
    if any(name.startswith("z+patches") for name, _ in candidates):  # the normal bank is fixed: once
        dn_normal, dn_defect = bank_distances(patches_normal, normal_bank), bank_distances(patches_defect, normal_bank)

    def contrast_scores(pc: PatchContrast, idx: np.ndarray) -> np.ndarray:
        normal_i, defect_i = idx[idx < n_n], idx[idx >= n_n] - n_n
        out = np.empty(len(idx))
        out[idx < n_n] = pc.image_scores(patches_normal[normal_i], dn_normal[normal_i])
        out[idx >= n_n] = pc.image_scores(patches_defect[defect_i], dn_defect[defect_i])
        return out

    contrast_cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # per fold: shared by the patch candidates

    def extra(name: str, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Columns beside z for the training and the applied rows: patch contrast, then embedding."""
        cols_tr, cols_te = [], []
        if name.startswith("z+patches"):
            key = tr.tobytes() + b"|" + te.tobytes()
            if key not in contrast_cache:
                pc = contrast(tr)
                contrast_cache[key] = (contrast_scores(pc, tr)[:, None], contrast_scores(pc, te)[:, None])
            cols_tr.append(contrast_cache[key][0])
            cols_te.append(contrast_cache[key][1])
        if "embedding" in name:
            mean, proj = _whiten(pooled[tr], components)
            cols_tr.append((pooled[tr] - mean) @ proj)
            cols_te.append((pooled[te] - mean) @ proj)
        if not cols_tr:
            return None, None
        return np.concatenate(cols_tr, 1), np.concatenate(cols_te, 1)

    fold_auc: dict[str, np.ndarray] = {}
    oof_by: dict[str, np.ndarray] = {}
    for name, c in candidates if splits else []:
        oof, aucs = np.zeros(len(z)), []
        for tr, te in splits:
            e_tr, e_te = extra(name, tr, te)
            oof[te] = _fit(z[tr], e_tr, labels[tr], c).decision_function(_design(z[te], e_te))
            aucs.append(roc_auc_score(labels[te], oof[te]))
        fold_auc[name], oof_by[name] = np.array(aucs), oof
    cv = {k: round(float(v.mean()), 6) for k, v in fold_auc.items()}
    best, best_gain = "z", 0.0
    for name, aucs in fold_auc.items():
        gain = aucs - fold_auc["z"]
        se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
        if name != "z" and gain.mean() - se > 0 and gain.mean() > best_gain:
            best, best_gain = name, float(gain.mean())
    c_best = dict(candidates)[best]
    everything = np.arange(len(z))
    e_all, _ = extra(best, everything, everything)
    model = _fit(z, e_all, labels, c_best)
    coef = model.coef_.ravel()
    coef_z = float(coef[0] * Z_SCALE)
    if best == "z" and coef_z <= 0:  # labels that contradict the base: keep its ranking (the score is z)
        return HeadFit(identity_head(), "z (the labels did not rank with the base score)", cv, z, labels)
    head = identity_head()
    head.update(coef_z=coef_z, intercept=float(model.intercept_[0]), chosen=best)
    rest = coef[1:]
    if best.startswith("z+patches"):
        pc = contrast(everything)
        head.update(normal_bank=pc.normal_bank, defect_bank=pc.defect_bank, coef_p=float(rest[0]))
        rest = rest[1:]
    if "embedding" in best:
        mean, proj = _whiten(pooled, components)
        head.update(pca_mean=torch.from_numpy(mean), pca=torch.from_numpy(proj),
                    coef_e=torch.from_numpy(rest.astype(np.float32)))
    oof = oof_by.get(best)
    if oof is None:  # not cross-validated: in-sample logits (stated in ``chosen``)
        oof = model.decision_function(_design(z, e_all))
        best = f"{best} (one image of a verdict: not cross-validated)"
    return HeadFit(head, best, cv, oof, labels)
