"""Active-learning query strategies: which unlabelled images to send to the annotators next.

A model scores the unlabelled pool once (``PoolScores``: anomaly scores or p(defect), optionally
class probabilities and embeddings); a strategy then ranks the pool and returns the ``budget`` most
valuable images (``Selection``), most valuable first. Strategies are plain numpy/torch, so they run
anywhere the scores are (a notebook, a Ray task, the CLI) and are deterministic given ``seed``.

Strategies live in the ``STRATEGIES`` registry, by name, like detectors and importers:

- ``random``: seeded uniform sample (the baseline every other strategy must beat);
- ``top_score``: the highest anomaly scores (likely defects, to find rare classes fast);
- ``near_threshold``: scores closest to the decision threshold (the model's boundary);
- ``entropy`` / ``margin``: classic uncertainty sampling on class probabilities;
- ``k_center``: greedy k-center on embeddings (Sener & Savarese 2018, diversity / coverage);
- ``hybrid``: the most uncertain few times the budget, then k-center among them (uncertain *and*
  diverse, so a batch is not spent on near-duplicates of one confusing image).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from flawline.errors import InvalidInput
from flawline.registry import Registry

_EPS = 1e-6
DEFAULT_CHUNK_SIZE = 4096  # rows per distance block: a block is at most chunk_size² floats (64 MiB)


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PoolScores:
    """What a model says about the unlabelled pool, one row per image.

    ``scores`` are anomaly scores or p(defect) (higher = more defect-like); ``probs`` [n, C] class
    probabilities (classifiers only); ``embeddings`` [n, D] feature vectors (for the diversity
    strategies); ``threshold`` the model's decision threshold on ``scores``.
    """

    image_ids: np.ndarray
    scores: np.ndarray
    probs: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.image_ids)
        if ids.ndim != 1:
            raise InvalidInput(f"image_ids must be one-dimensional, got shape {ids.shape}")
        n = ids.shape[0]
        if n == 0:
            raise InvalidInput("the pool is empty: no image_ids to select from")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidInput(f"image_ids must be integers, got dtype {ids.dtype}")
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != n:
            raise InvalidInput(f"image_ids repeat: {uniq[counts > 1][:5].tolist()} appear more than once")
        object.__setattr__(self, "image_ids", ids.astype(np.int64, copy=False))

        scores = _float_array("scores", self.scores)
        if scores.shape != (n,):
            raise InvalidInput(f"scores have shape {scores.shape} but there are {n} image_ids; "
                               f"expected ({n},)")
        object.__setattr__(self, "scores", scores)

        if self.probs is not None:
            probs = _float_array("probs", self.probs)
            if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] < 2:
                raise InvalidInput(f"probs have shape {probs.shape} but there are {n} image_ids; "
                                   f"expected ({n}, C) with C >= 2 classes")
            sums = probs.sum(1)
            if probs.min() < -_EPS or probs.max() > 1 + _EPS or np.abs(sums - 1).max() > 1e-3:
                raise InvalidInput(f"probs must be probabilities with rows summing to 1 (row sums "
                                   f"{sums.min():.3g}..{sums.max():.3g}); pass softmax outputs, not logits")
            object.__setattr__(self, "probs", np.clip(probs, 0.0, 1.0))

        if self.embeddings is not None:
            emb = _float_array("embeddings", self.embeddings)
            if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] == 0:
                raise InvalidInput(f"embeddings have shape {emb.shape} but there are {n} image_ids; "
                                   f"expected ({n}, D)")
            object.__setattr__(self, "embeddings", emb)

        if self.threshold is not None:
            try:
                t = float(self.threshold)
            except (TypeError, ValueError):
                raise InvalidInput(f"threshold must be a number, got {self.threshold!r}") from None
            if not math.isfinite(t):
                raise InvalidInput(f"threshold must be finite, got {t}")
            object.__setattr__(self, "threshold", t)

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


@dataclass(frozen=True)
class Selection:
    """The images a strategy picked: ``image_ids`` most valuable first, ``priority`` per pick
    (higher = more valuable; comparable within one selection only), and the strategy's name."""

    image_ids: np.ndarray
    priority: np.ndarray
    strategy: str

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


def _float_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float array, refusing non-numbers and NaN/inf (they would sort arbitrarily)."""
    try:
        arr = np.asarray(value, dtype=np.float64) if not _is_float32(value) else np.asarray(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be numeric") from None
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise InvalidInput(f"{name} hold {bad} NaN or infinite value(s)")
    return arr


def _is_float32(value: Any) -> bool:
    # keep float32 embeddings float32 (a 50k x 1024 pool is 200 MB; no need to double it)
    return isinstance(value, np.ndarray) and value.dtype == np.float32


# ----------------------------------------------------------------------------------- k-center core


def _sq_dist_block(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [rows, centres] as ||x||² - 2 x·c + ||c||², clamped at 0."""
    return torch.addmm(c_sq.unsqueeze(0), x, c.T, alpha=-2.0).add_(x_sq.unsqueeze(1)).clamp_min_(0)


def _min_sq_dist(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Squared distance from each row of ``x`` to its nearest row of ``centers``, computed in
    chunk_size × chunk_size blocks (both many pool rows and many labelled centres stay bounded)."""
    out = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    for cs in range(0, centers.shape[0], chunk_size):
        c = centers[cs:cs + chunk_size]
        c_sq = (c * c).sum(1)
        for rs in range(0, x.shape[0], chunk_size):
            block = _sq_dist_block(x[rs:rs + chunk_size], x_sq[rs:rs + chunk_size], c, c_sq)
            torch.minimum(out[rs:rs + chunk_size], block.min(1).values, out=out[rs:rs + chunk_size])
    return out


def k_center_greedy(
    embeddings: torch.Tensor,
    budget: int,
    centers: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center (farthest-first) over all of ``embeddings`` [n, D]: indices [k] of the picks
    in order and the Euclidean distance of each to its nearest centre at the time it was picked.

    ``centers`` [m, D] (the labelled set) are the starting centres; without them the first pick is
    the point farthest from the pool mean (deterministic; its "distance" is to the mean). A running
    min-distance vector makes this O(n·k·D) time and O(n) extra memory; every distance is computed
    in blocks of at most ``chunk_size`` rows, so a 50k × 1024 pool fits on any machine or GPU.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise InvalidInput(f"embeddings must be a non-empty [n, D] tensor, got shape {tuple(embeddings.shape)}")
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be >= 1, got {chunk_size}")
    n = embeddings.shape[0]
    k = min(int(budget), n)
    if k < 1:
        raise InvalidInput(f"budget must be >= 1, got {budget}")
    # float32/float64 as given; integers and half precision in float32 (distances need the range)
    x = embeddings if embeddings.dtype in (torch.float32, torch.float64) else embeddings.float()
    x_sq = (x * x).sum(1)
    has_centers = centers is not None and centers.shape[0] > 0
    if has_centers:
        if centers.ndim != 2 or centers.shape[1] != x.shape[1]:
            raise InvalidInput(f"centers have shape {tuple(centers.shape)} but the embeddings have "
                               f"{x.shape[1]} dimensions")
        min_d = _min_sq_dist(x, x_sq, centers.to(device=x.device, dtype=x.dtype), chunk_size)
    else:
        min_d = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        to_mean = _min_sq_dist(x, x_sq, x.mean(0, keepdim=True), chunk_size)
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    priority = torch.empty(k, dtype=x.dtype, device=x.device)
    for i in range(k):
        source = min_d if has_centers or i > 0 else to_mean  # first pick: farthest from the mean
        nxt = int(torch.argmax(source))  # the first maximum on ties: deterministic
        picks[i] = nxt
        priority[i] = source[nxt].clamp_min(0).sqrt()
        c, c_sq = x[nxt:nxt + 1], x_sq[nxt:nxt + 1]
        for rs in range(0, n, chunk_size):
            d = _sq_dist_block(x[rs:rs + chunk_size], x_sq[rs:rs + chunk_size], c, c_sq).squeeze(1)
            torch.minimum(min_d[rs:rs + chunk_size], d, out=min_d[rs:rs + chunk_size])
        min_d[nxt] = -1.0  # never again, even if rounding leaves its distance a hair above 0
    return picks, priority


def select_k_center(embeddings: torch.Tensor, budget: int, centers: torch.Tensor | None = None,
                    *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Indices of ``budget`` rows of ``embeddings`` [n, D] by exact greedy k-center, starting from
    ``centers`` (the labelled set) when given: each pick is the row farthest from every centre so
    far, so the picks cover the pool. See ``k_center_greedy`` for the distances and the cost."""
    return k_center_greedy(embeddings, budget, centers, chunk_size=chunk_size)[0]


# ------------------------------------------------------------------------------------- strategies


class Strategy(ABC):
    """Base class: subclasses are registered with ``@register_strategy(name)``, set ``needs`` (the
    ``PoolScores`` fields they cannot do without) and implement ``_rank``."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()

    def select(self, pool: PoolScores, budget: int, *, labelled_embeddings: np.ndarray | None = None,
               seed: int = 0) -> Selection:
        """The ``budget`` most valuable images of ``pool``, most valuable first (all of them, ranked,
        when the budget covers the pool). ``labelled_embeddings`` [m, D] are the images already
        labelled (the diversity strategies avoid their neighbourhoods); ``seed`` fixes any randomness."""
        k = min(_check_budget(budget), len(pool))
        for field in self.needs:
            if getattr(pool, field) is None:
                raise InvalidInput(f"strategy {self.name!r} needs {field} of the pool; score it with {field}")
        labelled = _check_labelled(pool, labelled_embeddings) if "embeddings" in self.needs else None
        order, priority = self._rank(pool, k, labelled, int(seed))
        order = np.asarray(order, dtype=np.int64)[:k]
        priority = np.asarray(priority, dtype=np.float64)[:k]
        return Selection(pool.image_ids[order], priority, self.name)

    @abstractmethod
    def _rank(self, pool: PoolScores, k: int, labelled: np.ndarray | None, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the pool of the ``k`` picks, best first, and their priorities."""

    @classmethod
    def description(cls) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


S = TypeVar("S", bound=type[Strategy])

STRATEGIES: Registry[type[Strategy]] = Registry("query strategy", InvalidInput)
strategy_names = STRATEGIES.names


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: register a ``Strategy`` subclass under ``name``."""
    def decorate(cls: S) -> S:
        cls.name = name
        return STRATEGIES.register(cls)
    return decorate


def _check_budget(budget: Any) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise InvalidInput(f"budget must be a whole number of images, got {budget!r}")
    if budget <= 0:
        raise InvalidInput(f"budget must be at least 1 image, got {budget}")
    return int(budget)


def _check_labelled(pool: PoolScores, labelled: np.ndarray | None) -> np.ndarray | None:
    if labelled is None:
        return None
    arr = _float_array("labelled_embeddings", labelled)
    dim = pool.embeddings.shape[1]  # type: ignore[union-attr]  # present: checked by needs
    if arr.ndim == 2 and arr.shape[0] == 0:
        return None
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidInput(f"labelled_embeddings have shape {arr.shape} but the pool's embeddings have "
                           f"{dim} dimensions; expected (m, {dim})")
    return arr


def _top(key: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``key`` values, largest first; ties keep pool order."""
    return np.argsort(-key, kind="stable")[:k]


def _probabilities(strategy: str, pool: PoolScores) -> np.ndarray:
    """Class probabilities [n, C]: ``probs`` if given, else binary [1 - p, p] from ``scores``,
    which must then be p(defect) in [0, 1] (raw anomaly scores have no probabilistic meaning)."""
    if pool.probs is not None:
        return pool.probs
    s = pool.scores
    if s.min() < 0.0 or s.max() > 1.0:
        raise InvalidInput(f"strategy {strategy!r} needs probs, or scores that are probabilities in [0, 1] "
                           f"(scores range {s.min():.4g}..{s.max():.4g}); score it with probs")
    p = np.clip(s, _EPS, 1.0 - _EPS)
    return np.stack([1.0 - p, p], axis=1)


def _entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, _EPS, 1.0)
    return -(probs * np.log(p)).sum(1)


def _margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability (binary: |2p - 1|); small = uncertain."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _threshold(pool: PoolScores) -> float:
    return pool.threshold if pool.threshold is not None else float(np.median(pool.scores))


@register_strategy("random")
class RandomStrategy(Strategy):
    """Seeded uniform sample: the baseline that every other strategy has to beat."""

    def _rank(self, pool, k, labelled, seed):
        keys = np.random.default_rng(seed).random(len(pool))
        order = _top(keys, k)
        return order, keys[order]


@register_strategy("top_score")
class TopScoreStrategy(Strategy):
    """Highest anomaly score first: finds likely defects (rare classes) fastest."""

    def _rank(self, pool, k, labelled, seed):
        order = _top(pool.scores, k)
        return order, pool.scores[order]


@register_strategy("near_threshold")
class NearThresholdStrategy(Strategy):
    """Scores closest to the decision threshold first: the images the model is least sure about.

    Uses ``pool.threshold``; without one, the median score of the pool stands in for it (half the
    pool on each side), which is a guess: give the model's threshold when it has one. Priority is
    ``-|score - threshold|``."""

    def _rank(self, pool, k, labelled, seed):
        closeness = -np.abs(pool.scores - _threshold(pool))
        order = _top(closeness, k)
        return order, closeness[order]


@register_strategy("entropy")
class EntropyStrategy(Strategy):
    """Highest predictive entropy of the class probabilities first (uncertainty sampling).

    Uses ``probs``; without them ``scores`` are taken as p(defect) of a binary model (clipped to
    [1e-6, 1 - 1e-6]) and must then be probabilities in [0, 1]. Priority is the entropy in nats."""

    def _rank(self, pool, k, labelled, seed):
        h = _entropy(_probabilities(self.name, pool))
        order = _top(h, k)
        return order, h[order]


@register_strategy("margin")
class MarginStrategy(Strategy):
    """Smallest margin between the two most likely classes first (binary: |2p - 1|).

    Uses ``probs``, else ``scores`` as p(defect) in [0, 1] like ``entropy``. Priority is
    ``1 - margin`` (1 = a coin toss)."""

    def _rank(self, pool, k, labelled, seed):
        value = 1.0 - _margin(_probabilities(self.name, pool))
        order = _top(value, k)
        return order, value[order]


class _EmbeddingStrategy(Strategy):
    needs = ("embeddings",)

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, device: str = "cpu") -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InvalidInput(f"chunk_size must be a whole number >= 1, got {chunk_size!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidInput(f"device {device!r} is not a torch device (try 'cpu' or 'cuda')") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInput(f"device {device!r}: no CUDA GPU is available here; use 'cpu'")
        self.chunk_size = chunk_size

    def _k_center(self, emb: np.ndarray, k: int, labelled: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(emb)).to(self.device)
        c = None if labelled is None else torch.from_numpy(np.ascontiguousarray(labelled)).to(self.device, x.dtype)
        idx, dist = k_center_greedy(x, k, c, chunk_size=self.chunk_size)
        return idx.cpu().numpy(), dist.double().cpu().numpy()


@register_strategy("k_center")
class KCenterStrategy(_EmbeddingStrategy):
    """Greedy k-center on embeddings (Sener & Savarese 2018): farthest from all chosen, to cover the pool.

    Each pick is the image farthest from every labelled and already picked image.
    Starts from ``labelled_embeddings`` as centres when given, else from the image farthest from
    the pool mean. Priority is the distance to the nearest centre when picked. Ignores ``seed``."""

    def _rank(self, pool, k, labelled, seed):
        return self._k_center(pool.embeddings, k, labelled)


@register_strategy("hybrid")
class HybridStrategy(_EmbeddingStrategy):
    """Uncertain, then diverse: k-center among the prefilter × budget most uncertain images.

    Uncertainty is ``margin`` when the pool has ``probs``, else ``near_threshold`` (override with
    ``uncertainty=``); k-center then spreads the budget over those candidates (starting from the
    labelled embeddings when given), so a batch is not spent on near-duplicates. Priority is the
    k-center distance when picked."""

    UNCERTAINTY = ("near_threshold", "margin", "entropy")

    def __init__(self, *, prefilter: float = 4.0, uncertainty: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, device: str = "cpu") -> None:
        super().__init__(chunk_size=chunk_size, device=device)
        if isinstance(prefilter, bool) or not isinstance(prefilter, (int, float)) or not prefilter >= 1:
            raise InvalidInput(f"prefilter must be a number >= 1 (candidates per pick), got {prefilter!r}")
        if uncertainty is not None and uncertainty not in self.UNCERTAINTY:
            raise InvalidInput(f"uncertainty {uncertainty!r} is not one of: {', '.join(self.UNCERTAINTY)}")
        self.prefilter = float(prefilter)
        self.uncertainty = uncertainty

    def _rank(self, pool, k, labelled, seed):
        name = self.uncertainty or ("margin" if pool.probs is not None else "near_threshold")
        m = min(len(pool), max(k, math.ceil(self.prefilter * k)))
        candidates, _ = STRATEGIES.get(name)()._rank(pool, m, None, seed)
        idx, dist = self._k_center(pool.embeddings[candidates], k, labelled)
        return candidates[idx], dist


# --------------------------------------------------------------------------------------- front door


def make_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered as ``name``, built with ``options`` (e.g. ``prefilter=8`` for
    ``hybrid``); unknown names and options fail with the choices, not a TypeError."""
    cls = STRATEGIES.get(name)
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    known = {p.name for p in params}
    unknown = sorted(set(options) - known)
    if unknown:
        takes = ", ".join(sorted(known)) if known else "no options"
        raise InvalidInput(f"strategy {name!r} got unknown option(s) {', '.join(unknown)}; it takes: {takes}")
    return cls(**options)


def list_strategies() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered strategy, by name: for the CLI and docs."""
    return [(cls.name, cls.description()) for cls in STRATEGIES.values()]


def select(pool: PoolScores, strategy: str | Strategy, budget: int, *,
           labelled_embeddings: np.ndarray | None = None, seed: int = 0, **options: Any) -> Selection:
    """One call: build ``strategy`` (a name, with ``options``, or a ready ``Strategy``) and pick
    ``budget`` images from ``pool``."""
    if isinstance(strategy, Strategy):
        if options:
            raise InvalidInput(f"options {', '.join(sorted(options))} given with a ready strategy "
                               f"{strategy.name!r}; pass its name instead")
        chosen = strategy
    else:
        chosen = make_strategy(strategy, **options)
    return chosen.select(pool, budget, labelled_embeddings=labelled_embeddings, seed=seed)
