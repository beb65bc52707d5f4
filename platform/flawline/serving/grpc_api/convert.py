"""The one mapping between the gRPC messages (serve/flawline.proto) and the answers the HTTP API
sends as JSON (``response.build_response`` and the batch answer of ``deployments``): the server
turns its answers into replies here, and ``grpc_client`` turns replies back into the same dicts,
so everything downstream of an answer (``flawline predict``'s output and overlays) is one code path.

PNGs are bytes in the messages and base64 text in the dicts, as in the JSON. A request's
``reference_uri`` is the HTTP route's ``?reference=`` (``reference_uri`` reads it for the server).
"""

from __future__ import annotations

import base64
from typing import Any

import grpc

from flawline.serving.errors import grpc_code
from flawline.serving.grpc_api import flawline_pb2 as pb

# build_response's fields in its order; those that may be None are proto3 `optional` fields
_FIELDS = ("score", "is_defect", "threshold", "threshold_method", "defect_class", "model", "model_version",
           "latency_ms", "inference_ms", "batch_size")
_OPTIONAL = {"score", "is_defect", "threshold", "threshold_method", "defect_class", "inference_ms"}
_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def code_number(status: int) -> int:
    """The gRPC status code number an HTTP status answers with (0 for 200)."""
    return grpc.StatusCode[grpc_code(status)].value[0]


def code_name(number: int) -> str:
    return _NAMES.get(number, "UNKNOWN")


def reference_uri(request: pb.PredictRequest | pb.PredictManyRequest) -> str | None:
    """The s3:// URI of the reference image a request names, None when it names none (proto3 sends
    an unset string as empty, as the HTTP route takes ``?reference=`` left empty)."""
    return request.reference_uri or None


def reply_from_response(body: dict[str, Any]) -> pb.PredictReply:
    """``build_response``'s dict → a ``PredictReply``."""
    reply = pb.PredictReply(**{k: body[k] for k in _FIELDS if body[k] is not None})
    if "map_size" in body:
        reply.map_size.extend(body["map_size"])
        reply.image_size.extend(body["image_size"])
    if "heatmap_png" in body:
        reply.heatmap_png = base64.b64decode(body["heatmap_png"])
        reply.heatmap_scale.lo, reply.heatmap_scale.hi = body["heatmap_scale"]["lo"], body["heatmap_scale"]["hi"]
    if "mask_png" in body:
        reply.mask_png = base64.b64decode(body["mask_png"])
    for region in body.get("regions") or []:
        reply.regions.add(polygon=[pb.Point(x=x, y=y) for x, y in region["polygon"]], bbox=region["bbox"],
                          area_px=region["area_px"], peak_score=region["peak_score"])
    return reply


def response_from_reply(reply: pb.PredictReply, *, regions: bool = False) -> dict[str, Any]:
    """A ``PredictReply`` → the dict the HTTP route answers with (``regions``: a list, even an empty
    one, when regions were asked for: proto3 cannot tell none asked from none found)."""
    body: dict[str, Any] = {k: None if k in _OPTIONAL and not reply.HasField(k) else getattr(reply, k)
                            for k in _FIELDS}
    if reply.map_size:
        body["map_size"], body["image_size"] = list(reply.map_size), list(reply.image_size)
    if reply.heatmap_png:
        body["heatmap_png"] = base64.b64encode(reply.heatmap_png).decode("ascii")
        body["heatmap_scale"] = {"lo": reply.heatmap_scale.lo, "hi": reply.heatmap_scale.hi}
    if reply.mask_png:
        body["mask_png"] = base64.b64encode(reply.mask_png).decode("ascii")
    if regions or reply.regions:
        body["regions"] = [{"polygon": [[p.x, p.y] for p in r.polygon], "bbox": list(r.bbox), "area_px": r.area_px,
                            "peak_score": r.peak_score} for r in reply.regions]
    return body


def many_reply_from_response(body: dict[str, Any]) -> pb.PredictManyReply:
    """The batch answer (``{model, model_version, images, errors, latency_ms, results}``, each result
    ``{image, status, ...}``) → a ``PredictManyReply``."""
    reply = pb.PredictManyReply(model=body["model"], model_version=body["model_version"], images=body["images"],
                                errors=body["errors"], latency_ms=body["latency_ms"])
    for result in body["results"]:
        if result["status"] == 200:
            reply.results.add(image=result["image"], code=0, verdict=reply_from_response(result))
        else:
            reply.results.add(image=result["image"], code=code_number(result["status"]), error=result["error"])
    return reply


def response_from_many_reply(reply: pb.PredictManyReply, *, regions: bool = False) -> dict[str, Any]:
    """A ``PredictManyReply`` → the batch answer's dict, each result ``{image, code: "OK", ...verdict}``
    or ``{image, code: "<gRPC status code name>", error}``."""
    results = []
    for r in reply.results:
        if r.code == 0:
            results.append({"image": r.image, "code": "OK", **response_from_reply(r.verdict, regions=regions)})
        else:
            results.append({"image": r.image, "code": code_name(r.code), "error": r.error})
    return {"model": reply.model, "model_version": reply.model_version, "images": reply.images,
            "errors": reply.errors, "latency_ms": reply.latency_ms, "results": results}
