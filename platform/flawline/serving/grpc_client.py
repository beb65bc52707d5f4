"""A small client of flawline's gRPC API (serve/flawline.proto), for Python programs on the line
and ``flawline predict --grpc``. Answers come back as the same dicts the HTTP API's JSON gives
(``grpc_api.convert``); a batch result carries ``code`` (the gRPC status code name, "OK" for a
verdict) where the HTTP answer carries ``status``.

    from flawline.serving.grpc_client import InspectionClient

    with InspectionClient("127.0.0.1:18001") as client:
        verdict = client.predict("tiles", open("part.jpg", "rb").read(), name="part.jpg")
        batch = client.predict_many("tiles:3", [("a.jpg", a_bytes), "s3://flawline/images/b.png"])
        board = client.predict("pcb", board_bytes, reference_uri="s3://flawline/golden/board7.png")

A call the server refuses raises ``InspectionError`` (its ``code``, e.g. INVALID_ARGUMENT,
NOT_FOUND, UNAVAILABLE, and the server's one-line message); no server at the address raises
``ServiceError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from flawline.errors import FlawlineError, ServiceError
from flawline.serving.grpc_api import convert
from flawline.serving.grpc_api import flawline_pb2 as pb
from flawline.serving.grpc_api.flawline_pb2_grpc import InspectionStub

MAX_MESSAGE_BYTES = 64 * 2**20  # a batch of 64 images with their heatmaps and masks fits


class InspectionError(FlawlineError):
    """The server answered the call with an error: ``code`` is the gRPC status code's name."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _image(item: tuple[str, bytes] | str) -> pb.Image:
    if isinstance(item, str):
        return pb.Image(uri=item)
    name, data = item
    return pb.Image(data=data, name=name)


class InspectionClient:
    """One channel to the server at ``address`` (host:port); ``application`` is the Serve
    application's name, sent as the ``application`` metadata Serve routes gRPC calls by."""

    def __init__(self, address: str, *, timeout: float = 60.0, connect_timeout: float = 10.0,
                 application: str = "flawline") -> None:
        self.address, self.timeout, self.connect_timeout = address, timeout, connect_timeout
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = InspectionStub(self.channel)
        self.metadata = (("application", application),)
        self._connected = False

    def __enter__(self) -> InspectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _connect(self) -> None:
        if self._connected:
            return
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise ServiceError(f"no flawline gRPC server answers at {self.address} (nothing accepted a connection "
                               f"within {self.connect_timeout:.0f} s); start it with `flawline serve up` and a "
                               "config with grpc_options") from None
        self._connected = True

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        self._connect()
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as err:
            code = err.code()
            name = code.name if code is not None else "UNKNOWN"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServiceError(f"the server at {self.address} did not answer within "
                                   f"{timeout or self.timeout:.0f} s") from None
            raise InspectionError(" ".join((err.details() or name).split()), name) from None

    def predict(self, model: str, data: bytes = b"", *, uri: str = "", name: str = "", heatmap: bool = False,
                mask: bool = False, regions: bool = False, reference_uri: str = "",
                timeout: float | None = None) -> dict[str, Any]:
        """One image (its bytes, or an s3:// ``uri`` in the server's bucket) → its verdict;
        ``reference_uri``: its defect-free reference image in the server's bucket (models that
        compare each image with its reference need one, the others refuse one)."""
        image = pb.Image(uri=uri, name=name) if uri else pb.Image(data=data, name=name)
        request = pb.PredictRequest(model=model, image=image, heatmap=heatmap, mask=mask, regions=regions,
                                    reference_uri=reference_uri)
        return convert.response_from_reply(self._call(self.stub.Predict, request, timeout), regions=regions)

    def predict_many(self, model: str, images: Sequence[tuple[str, bytes] | str], *, heatmap: bool = False,
                     mask: bool = False, regions: bool = False, reference_uri: str = "",
                     timeout: float | None = None) -> dict[str, Any]:
        """Many images, each ``(name, bytes)`` or an s3:// URI → ``{model, model_version, images,
        errors, latency_ms, results}``, one result per image in order; ``reference_uri``: the one
        reference image they are all compared with (as in ``predict``)."""
        request = pb.PredictManyRequest(model=model, images=[_image(i) for i in images], heatmap=heatmap, mask=mask,
                                        regions=regions, reference_uri=reference_uri)
        return convert.response_from_many_reply(self._call(self.stub.PredictMany, request, timeout), regions=regions)
