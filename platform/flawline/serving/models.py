"""Which model version a request means, and the fitted detectors behind model ids.

A request names ``name`` (the version in production, else the newest one) or ``name:version``.
``ModelResolver`` turns that into a ``ModelRef`` with a model id ``name:version`` by a small catalog
query, cached for ``ttl_s`` seconds: promoting or rolling back a version takes effect within that
time, without a restart, because the id the server loads and batches by changes with it. The
catalog's threshold travels with the ref, so a threshold set with ``flawline models threshold``
applies to the next request too.

``load_model`` reads a version's artifact from S3 through the catalog; ``ModelCache`` keeps the
most recently used ones in process (the Serve deployment uses ``serve.multiplexed`` instead, which
is the same LRU plus routing by model id across replicas).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from flawline.catalog import Catalog, ModelVersion
from flawline.catalog.model_versions import get_version, production_version
from flawline.errors import NotFound
from flawline.evaluate.thresholds import Threshold
from flawline.models.base import Detector
from flawline.serving.errors import ModelUnavailable, RequestError, one_line

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int
    stage: str
    method: str
    artifact_uri: str
    threshold: dict[str, Any] | None  # the catalog's (authoritative; may change after saving)

    @property
    def model_id(self) -> str:
        return f"{self.name}:{self.version}"

    def threshold_obj(self) -> Threshold | None:
        if not self.threshold:
            return None
        return Threshold.from_dict({k: v for k, v in self.threshold.items() if k != "history"})


def _ref(row: ModelVersion) -> ModelRef:
    return ModelRef(row.name, row.version, row.stage.value, row.method, row.artifact_uri,
                    dict(row.threshold_info) if row.threshold_info else None)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    name, sep, version = ref.partition(":")
    if not _NAME.match(name):
        raise RequestError(f"model {ref!r}: a model is name or name:version (letters, digits, . _ -)")
    if sep:
        if not version.isdigit():
            raise RequestError(f"model {ref!r}: the version must be a number (name:3)")
        return name, int(version)
    return name, None


def resolve(catalog: Catalog, ref: str) -> ModelRef:
    """``name`` → its production version, else its newest; ``name:v`` → that version (NotFound,
    naming the registered models, if there is none)."""
    name, version = parse_model_ref(ref)
    with catalog.session() as s:
        if version is None:
            row = production_version(s, name) or get_version(s, name)
        else:
            row = get_version(s, f"{name}:{version}")
        return _ref(row)


class ModelResolver:
    """``resolve`` with a short time-to-live cache (one cheap query per reference per ``ttl_s``)."""

    def __init__(self, catalog: Catalog, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog, self.ttl_s, self.clock = catalog, ttl_s, clock
        self._cache: dict[str, tuple[float, ModelRef]] = {}
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> ModelRef:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(ref)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        resolved = resolve(self.catalog, ref)
        with self._lock:
            if len(self._cache) > 4096:  # references are client input: keep the cache bounded
                self._cache.clear()
            self._cache[ref] = (now, resolved)
        return resolved


def list_models(catalog: Catalog) -> list[dict[str, Any]]:
    """Every registered name: its versions and stages, the production version, and the version a
    request for the bare name is served by."""
    with catalog.session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)).all()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(r.name, {"name": r.name, "production": None, "serving": None, "versions": []})
        entry["versions"].append({"version": r.version, "stage": r.stage.value, "method": r.method,
                                  "threshold": r.threshold, "created_at": r.created_at.isoformat()})
        if r.stage.value == "production":
            entry["production"] = r.version
    for entry in out.values():
        entry["serving"] = entry["production"] or entry["versions"][-1]["version"]
    return list(out.values())


@dataclass
class LoadedModel:
    ref: ModelRef
    detector: Detector
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)

    @property
    def image_size(self) -> int:
        return int(self.detector.config.image_size)


def load_model(catalog: Catalog, store, model_id: str, device: str = "auto",  # noqa: ANN001 (ObjectStore)
               warm_up: bool = True) -> LoadedModel:
    """The detector of ``name:version``: artifact from S3, catalog threshold applied, one warm-up
    forward pass. Any failure of a registered version is ``ModelUnavailable`` (503); an unknown
    model is ``NotFound`` (404)."""
    import torch

    from flawline.catalog.model_versions import load_version

    name, version = parse_model_ref(model_id)
    if version is None:
        raise RequestError(f"model id {model_id!r} must name a version (name:version)")
    started = time.perf_counter()
    with catalog.session() as s:
        ref = _ref(get_version(s, model_id))
    try:
        detector = load_version(catalog, store, model_id, device=device)  # with the catalog's threshold
        if warm_up:
            size = int(detector.config.image_size)
            detector.predict(torch.zeros(1, detector.input_channels, size, size))  # pairs for reference models
    except NotFound:
        raise
    except Exception as err:  # noqa: BLE001 — any failure of a registered version: that model only
        raise ModelUnavailable(f"model {model_id} cannot be loaded from {ref.artifact_uri}: {one_line(err)}") from None
    return LoadedModel(ref, detector, time.perf_counter() - started)


class ModelCache:
    """Loaded models by id, the least recently used dropped beyond ``max_models``; a failed load is
    remembered for ``retry_after_s`` so a broken artifact is not fetched on every request."""

    def __init__(self, loader: Callable[[str], LoadedModel], max_models: int = 4, retry_after_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.loader, self.max_models, self.retry_after_s, self.clock = loader, max_models, retry_after_s, clock
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._failed: dict[str, tuple[float, Exception]] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            failed = self._failed.get(model_id)
            if failed and self.clock() - failed[0] < self.retry_after_s:
                raise failed[1]
            gate = self._loading.setdefault(model_id, threading.Lock())
        with gate:  # one load per id at a time; others wait for it
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            try:
                model = self.loader(model_id)
            except ModelUnavailable as err:
                with self._lock:
                    self._failed[model_id] = (self.clock(), err)
                raise
            with self._lock:
                self._failed.pop(model_id, None)
                self._models[model_id] = model
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                self._loading.pop(model_id, None)
            return model

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
