"""The serving path in one process, without Ray: ``flawline predict --local`` and benchmarks.

Same steps, same code as the server: check the request image, resolve the model reference,
load (LRU-cached), predict, build the response.
"""

from __future__ import annotations

import time
from typing import Any

from flawline.config import Settings, get_settings
from flawline.context import open_catalog, open_store
from flawline.serving.errors import RequestError
from flawline.serving.inputs import CheckedImage, Limits, check_image, fetch_from_store, reference_from_uri
from flawline.serving.models import ModelCache, ModelResolver, load_model
from flawline.serving.pipeline import make_item, predict_items
from flawline.serving.response import build_response


class OutcomeError(RequestError):
    """An image the model could not take (carries the status the server would answer with)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LocalPredictor:
    def __init__(self, settings: Settings | None = None, max_models: int = 4, limits: Limits = Limits()) -> None:
        settings = settings or get_settings()
        self.catalog, self.store = open_catalog(settings), open_store(settings)
        self.limits = limits
        self.resolver = ModelResolver(self.catalog, ttl_s=0.0)
        self.cache = ModelCache(lambda model_id: load_model(self.catalog, self.store, model_id), max_models)

    def reference(self, source: str, data: bytes | None = None) -> CheckedImage:
        """A reference image for ``predict`` (read once, for every image compared with it): the
        s3:// URI ``source`` in this store, read and checked as the server does, or ``data`` (a local
        file's bytes, ``source`` its name), checked the same way."""
        if data is None:
            return reference_from_uri(source, lambda uri: fetch_from_store(self.store, uri), limits=self.limits)
        return check_image(data, f"reference {source}", limits=self.limits)

    def predict(self, model: str, data: bytes, name: str = "image", *, heatmap: bool = False, mask: bool = False,
                regions: bool = False, reference: CheckedImage | None = None) -> dict[str, Any]:
        """One image's answer, as the server gives it; ``reference``: its checked reference image
        (``reference()``), for models that compare each image with one."""
        started = time.perf_counter()
        checked = check_image(data, name, limits=self.limits)
        ref = self.resolver.resolve(model)
        loaded = self.cache.get(ref.model_id)
        [outcome] = predict_items(loaded, [make_item(checked, ref.threshold, heatmap or mask or regions, reference)])
        if outcome.error:
            raise OutcomeError(outcome.error, outcome.status)
        return build_response(outcome, ref, (checked.width, checked.height), (time.perf_counter() - started) * 1e3,
                              heatmap=heatmap, mask=mask, with_regions=regions)
