"""The one interface every detector implements, and the registry detectors add themselves to.

A detector is fitted on normal images and predicts, per image, a score and a pixel anomaly map.
Algorithms are plain torch code here; Ray jobs (issue 4) and Serve (issue 5) only call these methods.
Fitting is two steps so the costly one can be spread over workers: ``embed`` turns each prepared
batch into what fitting consumes (backbone features, usually), ``fit_embedded`` fits on those;
``fit`` is both in one process. A detector implements ``embed`` (unless it fits on the images
themselves), ``_fit_embedded``, ``scorer`` and its state.
Adding a detector = one module with a ``@register_detector`` class, imported in ``models/__init__``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from flawline.errors import ConfigError, InvalidInput
from flawline.evaluate.thresholds import Threshold, decide
from flawline.models.backbones import FeatureExtractor, build_feature_extractor
from flawline.models.features import as_model_batch
from flawline.models.tiling import TiledScorer, check_tiling, grid, tiles
from flawline.registry import Registry

Images = torch.Tensor | Iterable[torch.Tensor]  # one batch, or an iterable of batches
Embedded = torch.Tensor | tuple[torch.Tensor, ...]  # what Detector.embed returns for one batch


@dataclass
class DetectorConfig:
    """Settings shared by all detectors; subclasses add their own fields."""

    backbone: str = "efficientnet_lite0"
    weights: str = "packaged"
    image_size: int = 256
    batch_size: int = 16
    device: str = "auto"  # auto = cuda if available
    seed: int = 0
    # "bf16": run backbone and scoring under bfloat16 autocast — about 2x faster on GPUs and on CPUs
    # with AMX/AVX512-BF16, slower elsewhere; scores then differ from fp32 by about 1e-2 relative.
    precision: str = "fp32"
    # Images of more than 8 bits: the stored value that decodes to full brightness (the training
    # data's range, ``flawline.data.images.white_level``); None: the container's full scale.
    white: int | None = None
    # Tiled detection (``flawline.models.tiling``) for large images with small defects: the image is
    # brought to image_size and cut into overlapping tiles of ``tile`` px (0: no tiling, the network
    # sees the whole image); maps are stitched back to image_size. ``tile_overlap``: share of a tile.
    tile: int = 0
    tile_overlap: float = 0.25


@dataclass
class Prediction:
    scores: np.ndarray  # [N] image anomaly scores (higher = more anomalous)
    maps: np.ndarray  # [N, S, S] pixel anomaly maps at the model's input size
    threshold: Threshold | None = None

    @property
    def is_defect(self) -> np.ndarray:
        if self.threshold is None:
            raise ConfigError("this model has no threshold; set one (flawline models threshold) or calibrate")
        return decide(self.threshold, self.scores, self.maps)


def iter_batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
    else:
        yield from images


class Detector(ABC):
    """Base class: backbone handling, batching, device placement, thresholds and state."""

    name: ClassVar[str]
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    uses_backbone: ClassVar[bool] = True
    # True for detectors that need labelled defects (``flawline train``'s label settings train
    # them); False: they fit on normal images alone (``fit``, the unsupervised and selfsup settings).
    learns_from_labels: ClassVar[bool] = False
    # True: it compares each image with its defect-free reference image; its inputs are pairs
    # [N, 6, H, W] (image channels, then the reference's), as decoders build with ``reference=True``.
    uses_reference: ClassVar[bool] = False
    # Why this detector cannot be tiled (None: it can): the ``tile`` setting is refused with it.
    no_tiling: ClassVar[str | None] = None

    def __init__(self, config: DetectorConfig | None = None, **overrides: Any) -> None:
        base = config or self.Config()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(base)}
        if unknown:
            raise ConfigError(f"{self.name}: unknown settings {', '.join(sorted(unknown))}; its settings: "
                              f"{', '.join(f.name for f in dataclasses.fields(base))}")
        self.config = dataclasses.replace(base, **overrides)
        if self.config.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{self.name}: precision {self.config.precision!r} must be 'fp32' or 'bf16'")
        if overrides:  # the same ranges as --option (check_settings), for callers from Python too
            import typing

            hints = typing.get_type_hints(type(base))
            for key, value in overrides.items():
                problem = _out_of_range(key, value, hints.get(key))
                if problem:
                    raise ConfigError(f"{self.name}: setting {key}={value!r} {problem} "
                                      f"(default {getattr(type(base)(), key)!r})")
        if self.config.tile and self.no_tiling:
            raise ConfigError(f"{self.name}: cannot be tiled ({self.no_tiling}); leave tile at 0")
        check_tiling(self.config.image_size, self.config.tile, self.config.tile_overlap, self.name)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if self.config.device == "auto" else self.config.device)
        self.threshold: Threshold | None = None
        self.fitted = False
        self._extractor: FeatureExtractor | None = None
        self.info: dict[str, Any] = {}  # fit facts: images seen, seconds, bank size ...

    # -- backbone -------------------------------------------------------------------------------
    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.config.backbone, self.config.weights).to(self.device)
        return self._extractor

    def autocast(self, precision: str | None = None):  # noqa: ANN201
        precision = precision or self.config.precision
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch [N, C, H, W] in [0, 1] → checked, [N, 3, S, S] at ``image_size``, on the device."""
        return as_model_batch(batch, self.config.image_size).to(self.device)

    @property
    def input_channels(self) -> int:
        """Channels of what ``predict`` and the exported model take: 6 for image/reference pairs, else 3."""
        return 6 if self.uses_reference else 3

    @property
    def network_size(self) -> int:
        """The side (px) of what the network sees: ``tile`` when tiled, else ``image_size``."""
        return self.config.tile or self.config.image_size

    @property
    def tiles_per_image(self) -> int:
        c = self.config
        return len(grid(c.image_size, c.tile, c.tile_overlap)) if c.tile else 1

    def embed_images(self, batch: torch.Tensor) -> Embedded:
        """``embed`` of a raw batch [N, C, H, W]: prepared, and cut into tiles when tiled (every
        tile is a training example). The one way fitting paths (here, Ray Data, Ray Train) embed."""
        x = self.prepare(batch)
        if self.config.tile:
            x = tiles(x, self.config.tile, self.config.tile_overlap)
        return self.embed(x)

    def predictor(self, chunked: bool = True) -> torch.nn.Module:
        """``scorer`` for whole images at ``image_size``: the scorer itself, or, when tiled, the
        scorer over tiles with the maps stitched (``TiledScorer``). ONNX export exports this."""
        scorer = self.scorer(chunked)
        c = self.config
        if not c.tile:
            return scorer
        return TiledScorer(scorer, c.tile, c.tile_overlap, c.batch_size if chunked else None)

    # -- the interface --------------------------------------------------------------------------
    def fit(self, images: Images) -> Detector:
        """Fit on normal images (a tensor [N, C, H, W] in [0, 1] or an iterable of such batches)."""
        torch.manual_seed(self.config.seed)
        with self.autocast():
            # Tiled: about batch_size tiles per embedding call, not batch_size images' worth.
            batches = iter_batches(images, max(1, self.config.batch_size // self.tiles_per_image))
            return self.fit_embedded(self.embed_images(b) for b in batches)

    def embed(self, x: torch.Tensor) -> Embedded:
        """A prepared batch (``prepare``'s output) → what fitting consumes, without gradients.

        This is the per-image part of fitting, so it may run elsewhere: in other processes, by a
        detector made with the same config, under its ``autocast()``. Callers that move the output
        between processes move it to the CPU first; ``_fit_embedded`` moves what it needs to
        ``self.device``. The default is the batch itself (for detectors that fit on images)."""
        return x

    def fit_embedded(self, embedded: Iterable[Embedded]) -> Detector:
        """Fit on ``embed`` outputs: computed here or elsewhere, on any device, in any batch sizes."""
        torch.manual_seed(self.config.seed)
        if self.uses_backbone:
            # Building it draws from the global RNG: build it now, as fit() does on its first batch,
            # so weights initialised after it start from the same random state on both paths.
            self.extractor  # noqa: B018
        with self.autocast():
            count = self._fit_embedded(iter(embedded))
        if count == 0:
            raise InvalidInput(f"{self.name}: empty training set (no images)")
        per = self.tiles_per_image
        self.info["train_images"] = count // per
        if per > 1:
            self.info["train_tiles"] = count
        self.fitted = True
        return self

    @torch.no_grad()
    def predict(self, images: Images, precision: str | None = None) -> Prediction:
        """Scores and maps; ``precision`` overrides the configured one for this call."""
        if not self.fitted:
            raise ConfigError(f"{self.name}: not fitted; call fit() or load a saved model")
        scores, maps = [], []
        c = self.config
        tiled = TiledScorer(self._predict_batch, c.tile, c.tile_overlap, c.batch_size) if c.tile else None
        for batch in iter_batches(images, max(1, c.batch_size // self.tiles_per_image)):
            with self.autocast(precision):
                x = self.prepare(batch)
                s, m = tiled(x) if tiled is not None else self._predict_batch(x)
            if not (torch.isfinite(s).all() and torch.isfinite(m).all()):
                raise InvalidInput(f"{self.name}: non-finite features or scores (NaN/inf); check the "
                                   "backbone weights and the model file")
            scores.append(s.float().cpu())
            maps.append(m.float().cpu())
        if not scores:
            raise InvalidInput(f"{self.name}: nothing to predict (no images)")
        return Prediction(torch.cat(scores).numpy(), torch.cat(maps).numpy(),
                          self.threshold)

    @abstractmethod
    def _fit_embedded(self, embedded: Iterator[Embedded]) -> int:
        """Fit on embedded batches (moving what it needs to ``self.device``); return the number
        of images seen."""

    def score_embedded(self, embedded: Embedded) -> torch.Tensor:
        """Image scores [B] straight from ``embed``'s output, as ``predict`` would give them for the
        same images (no second backbone pass): lets a fit on embeddings score its own inputs
        (e.g. ``mixed`` leaving outliers out of an unlabelled pool). Detectors that cannot raise
        ConfigError."""
        raise ConfigError(f"{self.name}: cannot score embeddings")

    @abstractmethod
    def scorer(self, chunked: bool = True) -> torch.nn.Module:
        """The fitted prediction path as one module: images → (scores [B], maps [B, S, S]).
        ``predict`` runs it and the ONNX export exports it (``chunked=False``: no Python loops)."""

    def _predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B] and maps [B, S, S] for one prepared batch."""
        return self.scorer()(x)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything fit() learned (tensors and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def set_threshold(self, threshold: Threshold) -> None:
        self.threshold = threshold

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "config": dataclasses.asdict(self.config),
                "threshold": self.threshold.as_dict() if self.threshold else None, "info": self.info}


class TrainedDetector(Detector):
    """A normal-only detector that learns a network by gradient descent on its embeddings (flow,
    feature reconstruction, self-supervised). ``fit_embedded`` caches the embeddings and runs
    ``models.training.fit_network`` in this process; a Ray job runs the same two hooks on every
    Ray Train worker under DDP, each worker on its shard (``flawline.train.distributed``)."""

    @abstractmethod
    def begin_training(self, embedded: Embedded, total: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
        """Build (and return) the network to train from this worker's concatenated embeddings
        [N, ...] on the CPU. ``total`` sums a tensor over all workers: statistics that must cover
        the whole training set (e.g. flow's per-channel feature scale) are computed through it."""

    @abstractmethod
    def training_loss(self, model: torch.nn.Module, batch: Embedded, generator: torch.Generator) -> torch.Tensor:
        """One step's loss on ``batch`` (rows of the embeddings, on ``self.device``), computed
        through ``model``: the network ``begin_training`` returned, DDP-wrapped when several workers
        train. ``generator`` seeds the step's random draws (shuffles, synthetic defects)."""

    def begin_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch (0-based), before its first loss, also on
        the epoch a resumed run starts at: detectors that train in phases switch here, from the
        epoch number alone. Default: nothing."""

    def optim(self) -> dict[str, float]:
        """epochs, lr and weight_decay for the loop (the config's)."""
        c = self.config
        return {"epochs": c.epochs, "lr": c.lr, "weight_decay": getattr(c, "weight_decay", 0.0)}

    def _fit_embedded(self, embedded: Iterator[Embedded]) -> int:
        from flawline.models.training import concat, fit_network, rows
        from flawline.train.context import LocalContext

        # A plain loop, not under no_grad: ``embedded`` may be a generator that fits models itself
        # (``mixed``'s cross-fitting).
        cached = [tuple(t.cpu() for t in e) if isinstance(e, tuple) else e.cpu() for e in embedded]
        if not cached:
            return 0
        embedded_all = concat(cached)
        fit_network(self, embedded_all, LocalContext(self.device))
        return rows(embedded_all)


DETECTORS: Registry[type[Detector]] = Registry("detector", ConfigError)
register_detector = DETECTORS.register  # class decorator
detector_names = DETECTORS.names
detector_class = DETECTORS.get


def normal_only_detectors(paired: bool = False) -> list[str]:
    """Names of the registered detectors that fit on normal images alone (not ``learns_from_labels``);
    those that also need each image's reference image (``uses_reference``) only when ``paired``."""
    return [n for n in detector_names() if not detector_class(n).learns_from_labels
            and (paired or not detector_class(n).uses_reference)]


def create_detector(name: str, **settings: Any) -> Detector:
    """The detector registered as ``name`` with ``settings`` overriding its config's defaults.
    Raises ``ConfigError`` for an unknown name (listing the detectors) or setting (listing its
    settings)."""
    return detector_class(name)(**settings)


def detector_settings(name: str) -> dict[str, Any]:
    """The settings of detector ``name`` (its config's fields) with their defaults, in field order."""
    config = detector_class(name).Config()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from ``KEY=VALUE``) suits the type annotation ``hint``; hints
    it cannot read (a class of its own) accept anything."""
    import types
    import typing

    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, dict):
        return isinstance(value, list if origin is tuple else origin)  # JSON has no tuples
    return True


def check_settings(name: str, settings: dict[str, Any]) -> None:
    """Check ``settings`` against detector ``name``'s config before building it: each key must be
    one of its settings and each value of its field's type (an int does for a float). Raises
    ``ConfigError`` with one line naming the key and listing the detector's settings (with their
    defaults) or the expected type."""
    import typing

    cls = detector_class(name)
    known = detector_settings(name)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in known.items())
        raise ConfigError(f"{name}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"its settings: {listed}")
    hints = typing.get_type_hints(cls.Config)
    for key, value in settings.items():
        if key in hints and not _fits(value, hints[key]):
            shown = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{name}: setting {key}={value!r} must be {shown} (default {known[key]!r})")
        problem = _out_of_range(key, value, hints.get(key))
        if problem:
            raise ConfigError(f"{name}: setting {key}={value!r} {problem} (default {known[key]!r})")
    if settings.get("tile"):
        if cls.no_tiling:
            raise ConfigError(f"{name}: cannot be tiled ({cls.no_tiling}); leave tile at 0")
        check_tiling(settings.get("image_size", known["image_size"]), settings["tile"],
                     settings.get("tile_overlap", known["tile_overlap"]), name)


# Settings whose values have a range of their own; otherwise a count (int) is at least 1 and a
# weight, scale or rate (float) a finite number of at least 0.
_ANY_INT = {"seed"}
_AT_LEAST_0 = {"freeze_blocks", "tile", "search"}
_SHARES = ("fraction", "prob", "ratio", "dropout", "trim", "overlap")  # names of shares: 0 to 1
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def _out_of_range(key: str, value: Any, hint: Any = None) -> str | None:
    """Why ``value`` is no sane value for setting ``key`` of type ``hint`` (None when it is)."""
    import math
    import re
    import typing

    if key == "device":
        ok = isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value)
        return None if ok else f"is no device (expected {DEVICES})"
    if key == "precision":
        return None if value in ("fp32", "bf16") else "must be fp32 or bf16"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or key in _ANY_INT:
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    if any(part in key for part in _SHARES):
        return None if 0 <= value <= 1 else "is a share: it must lie between 0 and 1"
    counts = hint is int or isinstance(value, int) and float not in typing.get_args(hint) and hint is not float
    if key in _AT_LEAST_0 or not counts:
        return None if value >= 0 else "must be at least 0"
    return None if value >= 1 else "must be at least 1"


def config_from_dict(cls: type[Detector], values: dict[str, Any]) -> DetectorConfig:
    known = {f.name for f in dataclasses.fields(cls.Config)}
    return cls.Config(**{k: v for k, v in values.items() if k in known})


