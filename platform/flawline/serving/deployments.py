"""The Ray Serve application, in one of two layouts (``layout`` in the application's args):

- ``split`` (the default, serve/config.yaml): a FastAPI ``Gateway`` in front of a batched,
  multiplexed ``ModelServer``: front ends and model replicas scale apart, and Serve routes a
  model id to the model replicas that hold it;
- ``single`` (serve/config-single.yaml): one deployment, ``Inspector``, is the ingress and
  holds the models, so a request crosses the proxy and one replica: no second hop, no second
  serialisation of the image. ``docs/benchmarks/serve.md`` measures both.

The front is the same code in both (``_Front``), for HTTP and for gRPC: it reads and checks the
request (bounded body and pixels; 4xx with a one-line message), resolves the model reference to
``name:version`` (production version, else the newest; a cheap catalog query cached
``resolve_ttl_s``), so promotion and rollback take effect within ``resolve_ttl_s`` without a
restart, and answers.

- ``POST /v1/models/{model}/predict``: one image (raw body, multipart or ``{"uri": ...}``).
  ``?reference=s3://...`` (both routes; gRPC ``reference_uri``) names the defect-free reference
  image a model that compares each image with its reference needs (``Detector.uses_reference``):
  fetched and checked once per request, refused for other models, shared by a batch's images
  (a bad reference fails the whole request).
- ``POST /v1/models/{model}/predict/batch``: a batch inspection request, many images (multipart
  parts or ``{"uris": [...]}``) in one request, answered per image in order: one HTTP exchange for
  all of them, forward passes of up to ``max_batch_size``. A bad image gets its own status in
  ``results``; the request fails as a whole only when it is bad as a whole (no image, over
  ``max_batch_images``, unknown model).
- gRPC (serve/flawline.proto, on Serve's gRPC proxy when the config's ``grpc_options`` names
  ``add_InspectionServicer_to_server``): ``flawline.Inspection/Predict`` and ``/PredictMany``, the
  same two inspections; the messages map to and from the JSON answers in ``grpc_api.convert``, and
  an error is the call's gRPC status code (``errors.grpc_code``) with the same one-line details.

The model side is also one piece of code (``_ModelHolder``): versions load from S3 on demand
(``@serve.multiplexed``, an LRU of ``max_models_per_replica`` models per replica), requests for one
model are batched (``@serve.batch``; size and wait in ``user_config``, changed in place), every
torch call runs on one thread while images decode on others (two batches in flight: one decoding,
one in the forward pass), and a version whose artifact cannot be loaded answers 503 for that
model only.

Metrics (``ray.util.metrics``, defined in ``flawline.monitoring.metrics``): ``flawline_predictions``
{model, version, verdict}, ``flawline_request_errors`` {model, status}, ``flawline_predict_latency_ms``
{model}, ``flawline_score`` and ``flawline_score_to_threshold`` {model}, ``flawline_batch_size``.
"""


import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from flawline.config import get_settings
from flawline.context import open_catalog, open_store
from flawline.data.images import MAX_PIXELS
from flawline.errors import FlawlineError
from flawline.models.base import detector_class
from flawline.monitoring.metrics import metric
from flawline.serving.errors import (
    ModelUnavailable,
    PayloadTooLarge,
    RequestError,
    grpc_code,
    http_status,
    one_line,
)
from flawline.serving.grpc_api import convert
from flawline.serving.grpc_api import flawline_pb2 as pb
from flawline.serving.inputs import (
    MAX_REQUEST_BYTES,
    CheckedImage,
    Limits,
    check_image,
    fetch_from_store,
    image_from_request,
    image_from_source,
    images_from_batch_request,
    images_from_sources,
    parse_flag,
    reference_from_uri,
    reference_policy,
)
from flawline.serving.models import ModelResolver, list_models, load_model
from flawline.serving.pipeline import Item, Outcome, decode_items, forward_items, make_item
from flawline.serving.response import build_response

GATEWAY_DEFAULTS: dict[str, Any] = {"resolve_ttl_s": 1.0, "max_request_bytes": MAX_REQUEST_BYTES,
                                    "max_image_pixels": MAX_PIXELS, "max_batch_images": 64}
SERVER_DEFAULTS: dict[str, Any] = {"max_batch_size": 8, "batch_wait_timeout_s": 0.01, "torch_threads": None,
                                   "decode_threads": 1}
INSPECTOR_DEFAULTS: dict[str, Any] = {**GATEWAY_DEFAULTS, **SERVER_DEFAULTS}
LAYOUTS = ("single", "split")
APP_ARGS: dict[str, Any] = {"max_models_per_replica": 4, "device": "auto", "layout": "split"}
# Batches in flight per replica: one decodes (worker thread) while another runs the model (torch thread).
CONCURRENT_BATCHES = 2
LOAD_RETRY_AFTER_S = 10.0  # a failed load is answered from memory this long (no S3 fetch per request)


def _settings(config: dict[str, Any] | None, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    config = dict(config or {})
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"{where}: unknown settings {', '.join(sorted(unknown))}; known: {', '.join(defaults)}")
    return {**defaults, **config}


def _cause(err: BaseException) -> BaseException:
    """The replica's own exception behind a Ray wrapper (RayTaskError.cause)."""
    return getattr(err, "cause", None) or err


class _Status(FlawlineError):
    """An error the model server reported for one image, with its status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class _Metrics:
    """The gateway's metrics (defined in flawline.monitoring.metrics)."""

    def __init__(self) -> None:
        self.predictions = metric("flawline_predictions")
        self.errors = metric("flawline_request_errors")
        self.latency = metric("flawline_predict_latency_ms")
        self.score = metric("flawline_score")
        self.ratio = metric("flawline_score_to_threshold")

    def prediction(self, model: str, version: int, outcome: Outcome, latency_ms: float) -> None:
        verdict = {True: "defect", False: "ok", None: "none"}[outcome.is_defect]
        self.predictions.inc(tags={"model": model, "version": str(version), "verdict": verdict})
        self.latency.observe(latency_ms, tags={"model": model})
        if outcome.score is not None:
            self.score.observe(outcome.score, tags={"model": model})
            if outcome.threshold and outcome.threshold["value"] > 0:
                self.ratio.observe(outcome.score / outcome.threshold["value"], tags={"model": model})


class _ModelHolder:
    """The model side of a replica: versions loaded on demand (multiplexed LRU), every torch call on
    one thread, forward passes of up to ``max_batch_size`` images."""

    def _init_models(self, max_models_per_replica: int, device: str) -> None:
        settings = get_settings()
        self.catalog, self.store = open_catalog(settings), open_store(settings)
        self.device = device
        # Every torch call (load, warm-up, forward, thread settings) on one thread: torch's OpenMP
        # pool is per calling thread, and two pools on the same cores halve the forward's speed.
        self._torch = ThreadPoolExecutor(1, thread_name_prefix="flawline-torch")
        self._decoder: ThreadPoolExecutor | None = None  # decode_threads > 0: images decode here
        self._decode_threads = 0
        self._failed: dict[str, tuple[float, Exception]] = {}
        self._batch_sizes = metric("flawline_batch_size")

        async def load(model_id: str):  # noqa: ANN202 — a closure: multiplexed with a size from args
            return await self._load(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=int(max_models_per_replica))(load)

    def _reconfigure_models(self, c: dict[str, Any]) -> None:
        self.max_batch_size = int(c["max_batch_size"])
        self.predict_batch.set_max_batch_size(self.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(float(c["batch_wait_timeout_s"]))
        threads = int(c["decode_threads"])
        if threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {threads}")
        if threads != self._decode_threads:
            if self._decoder is not None:
                self._decoder.shutdown(wait=False)
            self._decoder = ThreadPoolExecutor(threads, thread_name_prefix="flawline-decode") if threads else None
            self._decode_threads = threads
        if c["torch_threads"]:
            import torch

            self._torch.submit(torch.set_num_threads, int(c["torch_threads"])).result()

    async def _load(self, model_id: str):  # noqa: ANN202
        failed = self._failed.get(model_id)
        if failed and time.monotonic() - failed[0] < LOAD_RETRY_AFTER_S:
            raise failed[1]
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._torch, load_model, self.catalog, self.store, model_id,
                                               self.device)
        except ModelUnavailable as err:
            self._failed[model_id] = (time.monotonic(), err)
            raise
        self._failed.pop(model_id, None)
        return model

    async def _forward(self, model_id: str, items: list[Item]) -> list[Outcome]:
        """``items`` of one model, in order, in forward passes of up to ``max_batch_size``. Decoding
        runs on the decode threads (no torch; ``decode_threads`` 0: on the torch thread), the forward
        pass on the torch thread: the next chunk decodes while this one runs the model, and so does
        another batch (``CONCURRENT_BATCHES``)."""
        model = await self.get_model(model_id)
        loop, outcomes = asyncio.get_running_loop(), []
        references: dict = {}  # a reference image decoded once for all the passes (a batch request shares one)
        size = self.max_batch_size
        chunks = [items[start:start + size] for start in range(0, len(items), size)]

        def decode(chunk: list[Item]) -> asyncio.Future:
            return loop.run_in_executor(self._decoder or self._torch, decode_items, model, chunk, references)

        decoding = decode(chunks[0]) if chunks else None
        try:
            for k, chunk in enumerate(chunks):
                decoded = await decoding
                decoding = decode(chunks[k + 1]) if k + 1 < len(chunks) else None
                self._batch_sizes.observe(len(chunk))
                outcomes += await loop.run_in_executor(self._torch, forward_items, model, chunk, decoded)
        finally:
            if decoding is not None and not decoding.done():
                decoding.cancel()
        return outcomes


@serve.deployment(name="ModelServer", max_ongoing_requests=32)
class ModelServer(_ModelHolder):
    """The ``split`` layout's model replicas, called by the Gateway with the model id as Serve's
    multiplexed model id (Serve routes it to replicas that hold the model, and batches by it)."""

    def __init__(self, max_models_per_replica: int = 4, device: str = "auto") -> None:
        self._init_models(max_models_per_replica, device)
        self.reconfigure({})

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._reconfigure_models(_settings(config, SERVER_DEFAULTS, "ModelServer user_config"))

    @serve.batch(max_batch_size=SERVER_DEFAULTS["max_batch_size"],
                 batch_wait_timeout_s=SERVER_DEFAULTS["batch_wait_timeout_s"],
                 max_concurrent_batches=CONCURRENT_BATCHES)
    async def predict_batch(self, items: list[Item]) -> list[Outcome]:
        # Serve splits batches by multiplexed model id: every item here is for this model.
        return await self._forward(serve.get_multiplexed_model_id(), items)

    async def predict(self, item: Item) -> Outcome:
        return await self.predict_batch(item)

    async def predict_many(self, items: list[Item]) -> list[Outcome]:
        """A batch inspection request's images, in order: forward passes of up to max_batch_size."""
        return await self._forward(serve.get_multiplexed_model_id(), items)

    def ping(self) -> str:
        return "ok"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_MODEL_DOC = "name (its production version, else its newest) or name:version"
_FLAG_DOC = "true or false (also 1/0, yes/no, on/off); absent: false"


@dataclass
class _Query:
    """The predict routes' query parameters, declared so that they appear in the OpenAPI schema
    (``/docs``); the flags stay strings here and are read by ``parse_flag`` (one-line 400s)."""

    heatmap: Annotated[str | None, Query(description=f"add the anomaly heatmap as a PNG: {_FLAG_DOC}")] = None
    mask: Annotated[str | None, Query(
        description=f"add the thresholded defect mask as a PNG: {_FLAG_DOC}")] = None
    regions: Annotated[str | None, Query(description=f"add the defect regions' polygons: {_FLAG_DOC}")] = None
    reference: Annotated[str | None, Query(
        description="s3:// URI (in the server's bucket) of the defect-free reference image, for models that "
                    "compare each image with its reference")] = None


_QUERY_NAMES = tuple(f.name for f in dataclasses.fields(_Query))


@dataclass
class _Ask:
    """What a request asks, whichever protocol brought it: the model reference, what to add to the
    verdicts (``build_response``'s keywords), how to read its image(s), run in a thread (it may
    fetch from S3): one image → (bytes, name); a batch → [(name, bytes or the error it alone gets)],
    and the s3:// URI of the reference image its images are compared with (None: it names none)."""

    model: str
    flags: dict[str, bool]
    read: Callable[[], Any]
    reference: str | None = None

    @property
    def want_map(self) -> bool:
        return any(self.flags.values())


def _flags(heatmap: bool, mask: bool, regions: bool) -> dict[str, bool]:
    return {"heatmap": heatmap, "mask": mask, "with_regions": regions}


async def _asked(ask: _Ask) -> _Ask:
    return ask


def _grpc_answer(status: int, body: dict[str, Any], grpc_context: Any, reply: Callable[[dict[str, Any]], Any],
                 empty: Callable[[], Any]) -> Any:
    """An answer as a gRPC reply, or (an error) as the call's status code and one-line details."""
    if status == 200:
        return reply(body)
    if grpc_context is not None:
        grpc_context.set_code(grpc.StatusCode[grpc_code(status)])
        grpc_context.set_details(body["error"])
    return empty()


class _Front:
    """The request side both layouts share, over HTTP (``_routes`` registers its handlers) and gRPC
    (``Predict``, ``PredictMany``: serve/flawline.proto); one home for request checks, model
    resolution, metrics and answers, whichever protocol. A subclass provides
    ``_predict_one(ref, item)``, ``_predict_many(ref, items)`` and ``_ping()``."""

    def _init_front(self) -> None:
        settings = get_settings()
        self.catalog, self.store = open_catalog(settings), open_store(settings)
        self.metrics = _Metrics()

    def _reconfigure_front(self, c: dict[str, Any]) -> None:
        self.limits = Limits(int(c["max_request_bytes"]), int(c["max_image_pixels"]))
        self.max_batch_images = int(c["max_batch_images"])
        self.resolver = ModelResolver(self.catalog, float(c["resolve_ttl_s"]))

    def _fetch(self, uri: str) -> bytes:
        return fetch_from_store(self.store, uri)

    def _reference(self, ref: Any, uri: str | None) -> CheckedImage | None:
        """The request's reference image, fetched and checked once per request (None: it names
        none). Refuses a model that compares each image with its reference without one, and a
        reference for a model that does not (``ReferenceRefused``; the model server checks again)."""
        try:
            uses = detector_class(ref.method).uses_reference
        except FlawlineError:  # a method no longer registered: the model server decides (it cannot load it)
            uses = uri is not None
        reference_policy(ref.name, ref.method, uses, uri is not None)
        return reference_from_uri(uri, self._fetch, limits=self.limits) if uri else None

    def _prepare(self, ask: _Ask):  # noqa: ANN202
        """(model reference, its reference image or None, the CheckedImage)."""
        ref = self.resolver.resolve(ask.model)
        reference = self._reference(ref, ask.reference)
        data, name = ask.read()
        return ref, reference, check_image(data, name, limits=self.limits)

    def _prepare_batch(self, ask: _Ask):  # noqa: ANN202
        """(model reference, its reference image or None, [(name, CheckedImage or the error that
        image answers with)])."""
        ref = self.resolver.resolve(ask.model)  # an unknown model fails the whole request first
        reference = self._reference(ref, ask.reference)  # then a bad reference: it is every image's
        images: list[tuple[str, CheckedImage | Exception]] = []
        for name, data in ask.read():
            if isinstance(data, Exception):
                images.append((name, data))
                continue
            try:
                images.append((name, check_image(data, name, limits=self.limits)))
            except Exception as err:  # noqa: BLE001 — this image only
                images.append((name, err))
        return ref, reference, images

    def _failure(self, err: BaseException, tag: str) -> tuple[int, str]:
        """An error → (HTTP status, one-line message), counted in the error metric."""
        cause = _cause(err)
        status = http_status(cause)
        self.metrics.errors.inc(tags={"model": tag, "status": str(status)})
        message = one_line(cause) if status < 500 or isinstance(cause, FlawlineError) else \
            f"internal error ({type(cause).__name__}: {one_line(cause)})"
        return status, message

    async def _one(self, asked: Awaitable[_Ask]) -> tuple[int, dict[str, Any]]:
        """One image's answer: (200, its verdict) or (status, ``{"error": <one line>, "status": N}``)."""
        started = time.perf_counter()
        tag = "unresolved"
        try:
            ask = await asked
            ref, reference, image = await asyncio.to_thread(self._prepare, ask)
            tag = ref.name
            item = make_item(image, ref.threshold, ask.want_map, reference)
            outcome = await self._predict_one(ref, item)
            if outcome.error:
                raise _Status(outcome.error, outcome.status)
            latency_ms = (time.perf_counter() - started) * 1e3
            build = functools.partial(build_response, outcome, ref, (image.width, image.height), latency_ms,
                                      **ask.flags)
            response = await asyncio.to_thread(build) if ask.want_map else build()
            self.metrics.prediction(ref.name, ref.version, outcome, latency_ms)
            return 200, response
        except Exception as err:  # noqa: BLE001 — every failure is one answer; the server keeps serving
            status, message = self._failure(err, tag)
            return status, {"error": message, "status": status}

    async def _many(self, asked: Awaitable[_Ask]) -> tuple[int, dict[str, Any]]:
        """A batch's answer, one result per image in order (each its verdict or its own error), or
        (status, ``{"error", "status"}``) when the request is bad as a whole."""
        started = time.perf_counter()
        tag = "unresolved"
        try:
            ask = await asked
            ref, reference, images = await asyncio.to_thread(self._prepare_batch, ask)
            tag = ref.name
            good = [(i, image) for i, (_, image) in enumerate(images) if isinstance(image, CheckedImage)]
            outcomes: dict[int, Outcome] = {}
            if good:
                answered = await self._predict_many(
                    ref, [make_item(image, ref.threshold, ask.want_map, reference) for _, image in good])
                shared = next((outcome for outcome in answered if outcome.shared), None)
                if shared:  # the reference every image shares did not decode: the request fails
                    raise _Status(shared.error, shared.status)
                outcomes = {i: outcome for (i, _), outcome in zip(good, answered)}
            latency_ms = (time.perf_counter() - started) * 1e3
            build = functools.partial(self._batch_results, images, outcomes, ref, latency_ms, **ask.flags)
            results = await asyncio.to_thread(build) if ask.want_map else build()
            return 200, {"model": ref.name, "model_version": ref.version, "images": len(results),
                         "errors": sum(r["status"] != 200 for r in results), "latency_ms": round(latency_ms, 3),
                         "results": results}
        except Exception as err:  # noqa: BLE001 — the request as a whole is bad: one answer
            status, message = self._failure(err, tag)
            return status, {"error": message, "status": status}

    def _batch_results(self, images: list[tuple[str, CheckedImage | Exception]], outcomes: dict[int, Outcome],
                       ref: Any, latency_ms: float, **flags: bool) -> list[dict[str, Any]]:
        """One answer per image, in the request's order: its verdict, or its own error and status."""
        results = []
        for i, (name, image) in enumerate(images):
            if isinstance(image, Exception):  # refused before the model saw it
                status, message = self._failure(image, ref.name)
            elif outcomes[i].error:  # it did not decode in the model server
                status, message = outcomes[i].status, outcomes[i].error
                self.metrics.errors.inc(tags={"model": ref.name, "status": str(status)})
            else:
                body = build_response(outcomes[i], ref, (image.width, image.height), latency_ms, **flags)
                self.metrics.prediction(ref.name, ref.version, outcomes[i], latency_ms)
                results.append({"image": name, "status": 200, **body})
                continue
            results.append({"image": name, "status": status, "error": message})
        return results

    # -- HTTP ----------------------------------------------------------------------------------------
    async def healthz(self) -> JSONResponse:
        checks = {}
        try:
            await asyncio.to_thread(self.catalog.ping)
            checks["catalog"] = "ok"
        except FlawlineError as err:
            checks["catalog"] = one_line(err)
        try:
            checks["model_server"] = await asyncio.wait_for(self._ping(), timeout=10)
        except Exception as err:  # noqa: BLE001
            checks["model_server"] = one_line(_cause(err))
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503)

    async def models(self) -> JSONResponse:
        try:
            return JSONResponse({"models": await asyncio.to_thread(list_models, self.catalog),
                                 "resolve_ttl_s": self.resolver.ttl_s})
        except FlawlineError as err:
            return _error(http_status(err), one_line(err))

    async def _http_ask(self, model: str, request: Request, query: _Query, *, batch: bool) -> _Ask:
        """The query's flags and the bounded body (4xx errors on bad ones, a misspelt parameter among
        them: it would otherwise be ignored), and how to read the image(s)."""
        unknown = sorted(set(request.query_params) - set(_QUERY_NAMES))
        if unknown:
            raise RequestError(f"unknown query parameter {unknown[0]!r}; a predict request takes "
                               f"{', '.join(_QUERY_NAMES)}")
        flags = _flags(*(parse_flag(value, name) for name, value in
                         (("heatmap", query.heatmap), ("mask", query.mask), ("regions", query.regions))))
        body = await _read_body(request, self.limits.max_request_bytes)
        content_type = request.headers.get("content-type")
        reference = query.reference or None
        if batch:
            return _Ask(model, flags, lambda: images_from_batch_request(
                content_type, body, self._fetch, limits=self.limits, max_images=self.max_batch_images), reference)
        return _Ask(model, flags, lambda: image_from_request(content_type, body, self._fetch, limits=self.limits),
                    reference)

    async def predict(self, model: Annotated[str, Path(description=_MODEL_DOC)], request: Request,
                      query: Annotated[_Query, Depends()]) -> JSONResponse:
        """One image: its score, verdict and threshold (and the maps asked for). The body is the
        image (``image/*``), a multipart form with one file (field ``image``), or JSON
        ``{"uri": "s3://..."}``."""
        status, body = await self._one(self._http_ask(model, request, query, batch=False))
        return JSONResponse(body, status_code=status)

    async def predict_many(self, model: Annotated[str, Path(description=_MODEL_DOC)], request: Request,
                           query: Annotated[_Query, Depends()]) -> JSONResponse:
        """Many images in one request, answered per image in order, each with its own status: a
        multipart form with several files, or JSON ``{"uris": ["s3://...", ...]}``."""
        status, body = await self._many(self._http_ask(model, request, query, batch=True))
        return JSONResponse(body, status_code=status)

    # -- gRPC (serve/flawline.proto; Serve calls the method named like the RPC) ------------------------
    async def Predict(self, request: pb.PredictRequest, grpc_context: Any = None) -> pb.PredictReply:
        image = request.image
        status, body = await self._one(_asked(_Ask(
            request.model, _flags(request.heatmap, request.mask, request.regions),
            lambda: image_from_source(image.data, image.uri, image.name, self._fetch),
            convert.reference_uri(request))))
        return _grpc_answer(status, body, grpc_context, convert.reply_from_response, pb.PredictReply)

    async def PredictMany(self, request: pb.PredictManyRequest,
                          grpc_context: Any = None) -> pb.PredictManyReply:
        sources = [(image.data, image.uri, image.name) for image in request.images]
        status, body = await self._many(_asked(_Ask(
            request.model, _flags(request.heatmap, request.mask, request.regions),
            lambda: images_from_sources(sources, self._fetch, limits=self.limits, max_images=self.max_batch_images),
            convert.reference_uri(request))))
        return _grpc_answer(status, body, grpc_context, convert.many_reply_from_response, pb.PredictManyReply)


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERROR = {"description": "one line naming the cause", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error", "status"],
    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}}}}
_ERRORS = {"400": _ERROR, "404": {**_ERROR, "description": "no such model, or no such s3:// object"},
           "413": {**_ERROR, "description": "body or image over the limits"},
           "415": {**_ERROR, "description": "content type not accepted"},
           "503": {**_ERROR, "description": "the model cannot be loaded"}}


def _body(json_schema: dict[str, Any], multipart: dict[str, Any], binary: bool) -> dict[str, Any]:
    content = {"multipart/form-data": {"schema": multipart},
               "application/json": {"schema": json_schema}}
    if binary:
        content = {"image/*": _BINARY, "application/octet-stream": _BINARY, **content}
    return {"requestBody": {"required": True, "content": content}, "responses": _ERRORS}


_ONE_BODY = _body({"type": "object", "required": ["uri"], "properties": {"uri": {
    "type": "string", "example": "s3://bucket/incoming/part-0001.jpg"}}},
    {"type": "object", "required": ["image"], "properties": {"image": {"type": "string", "format": "binary"}}},
    binary=True)
_MANY_BODY = _body({"type": "object", "required": ["uris"], "properties": {"uris": {
    "type": "array", "items": {"type": "string"}, "example": ["s3://bucket/a.jpg", "s3://bucket/b.jpg"]}}},
    {"type": "object", "description": "one part per image, each with a file name",
     "additionalProperties": {"type": "string", "format": "binary"}}, binary=False)


def _routes() -> FastAPI:
    """A FastAPI app with ``_Front``'s routes (one per ingress class: Serve freezes each). Its
    OpenAPI schema (``/docs``) says what the predict routes take (the body's content types) and
    answer (errors as ``{error, status}``); FastAPI's own 422 is never sent here, so it is dropped."""
    app = FastAPI(title="flawline", summary="Defect detection: registered flawline models behind Ray Serve.")
    app.add_api_route("/healthz", _Front.healthz, methods=["GET"])
    app.add_api_route("/v1/models", _Front.models, methods=["GET"])
    app.add_api_route("/v1/models/{model}/predict", _Front.predict, methods=["POST"], openapi_extra=_ONE_BODY)
    app.add_api_route("/v1/models/{model}/predict/batch", _Front.predict_many, methods=["POST"],
                      openapi_extra=_MANY_BODY)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


@serve.deployment(name="Gateway", max_ongoing_requests=64)
@serve.ingress(_routes())
class Gateway(_Front):
    """The ``split`` layout's ingress (HTTP and gRPC): calls the ModelServer with the model id as
    Serve's multiplexed model id."""

    def __init__(self, model_server: DeploymentHandle) -> None:
        self.server = model_server
        self._init_front()
        self.reconfigure({})

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._reconfigure_front(_settings(config, GATEWAY_DEFAULTS, "Gateway user_config"))

    async def _predict_one(self, ref: Any, item: Item) -> Outcome:
        return await self.server.options(multiplexed_model_id=ref.model_id).predict.remote(item)

    async def _predict_many(self, ref: Any, items: list[Item]) -> list[Outcome]:
        return await self.server.options(multiplexed_model_id=ref.model_id).predict_many.remote(items)

    async def _ping(self) -> str:
        return await self.server.ping.remote()


@serve.deployment(name="Inspector", max_ongoing_requests=64)
@serve.ingress(_routes())
class Inspector(_Front, _ModelHolder):
    """The ``single`` layout: ingress (HTTP and gRPC) and model holder in one replica. Requests are
    batched per model id here (a batch may hold several models' requests: each model's run together)."""

    def __init__(self, max_models_per_replica: int = 4, device: str = "auto") -> None:
        self._init_front()
        self._init_models(max_models_per_replica, device)
        self.reconfigure({})

    def reconfigure(self, config: dict[str, Any]) -> None:
        c = _settings(config, INSPECTOR_DEFAULTS, "Inspector user_config")
        self._reconfigure_front(c)
        self._reconfigure_models(c)

    @serve.batch(max_batch_size=SERVER_DEFAULTS["max_batch_size"],
                 batch_wait_timeout_s=SERVER_DEFAULTS["batch_wait_timeout_s"],
                 max_concurrent_batches=CONCURRENT_BATCHES)
    async def predict_batch(self, requests: list[tuple[str, Item]]) -> list[Outcome]:
        by_model: dict[str, list[int]] = {}
        for i, (model_id, _) in enumerate(requests):
            by_model.setdefault(model_id, []).append(i)
        outcomes: list[Outcome | None] = [None] * len(requests)
        for model_id, index in by_model.items():
            try:
                answered = await self._forward(model_id, [requests[i][1] for i in index])
            except Exception as err:  # noqa: BLE001 — a model that cannot load fails its own requests only
                answered = [Outcome(error=one_line(err), status=http_status(err)) for _ in index]
            for i, outcome in zip(index, answered):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    async def _predict_one(self, ref: Any, item: Item) -> Outcome:
        return await self.predict_batch((ref.model_id, item))

    async def _predict_many(self, ref: Any, items: list[Item]) -> list[Outcome]:
        return await self._forward(ref.model_id, items)

    async def _ping(self) -> str:
        return "ok"


def build_app(args: dict[str, Any] | None = None):  # noqa: ANN201 — serve.Application
    """The application in ``args["layout"]`` (``serve/app.py`` exposes it; ``args`` from
    serve/config.yaml). Raises ``ValueError`` for an unknown arg or layout."""
    a = _settings(args, APP_ARGS, "application args")
    if int(a["max_models_per_replica"]) < 1:
        raise ValueError("application args: max_models_per_replica must be at least 1")
    if a["layout"] not in LAYOUTS:
        raise ValueError(f"application args: layout {a['layout']!r} must be one of {', '.join(LAYOUTS)}")
    if a["layout"] == "single":
        return Inspector.bind(int(a["max_models_per_replica"]), str(a["device"]))
    return Gateway.bind(ModelServer.bind(int(a["max_models_per_replica"]), str(a["device"])))
