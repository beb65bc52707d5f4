"""Saving and loading fitted detectors: one self-describing file, locally or in S3."""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime, timezone
from typing import Any

import torch

from flawline import __version__
from flawline.errors import InvalidInput
from flawline.evaluate.thresholds import Threshold
from flawline.models.base import Detector, config_from_dict, detector_class

FORMAT = "flawline-detector"
FORMAT_VERSION = 1


def detector_to_bytes(detector: Detector) -> bytes:
    if not detector.fitted:
        raise InvalidInput(f"{detector.name}: cannot save a detector that is not fitted")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "flawline_version": __version__,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "detector": detector.name,
        "config": dataclasses.asdict(detector.config),
        "threshold": detector.threshold.as_dict() if detector.threshold else None,
        "info": detector.info,
        "state": detector.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def read_header(data: bytes, name: str = "model") -> dict[str, Any]:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors: not one of ours
        raise InvalidInput(f"{name}: not a flawline model file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInput(f"{name}: not a flawline model file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise InvalidInput(f"{name}: saved by flawline {payload.get('flawline_version')} in model format "
                           f"v{payload.get('format_version')}; this flawline {__version__} reads v{FORMAT_VERSION}")
    return payload


def detector_from_bytes(data: bytes, name: str = "model", device: str | None = None) -> Detector:
    payload = read_header(data, name)
    cls = detector_class(payload["detector"])
    config = config_from_dict(cls, payload["config"])
    if device is not None:
        config = dataclasses.replace(config, device=device)
    detector = cls(config)
    detector.load_state_dict(payload["state"])
    detector.info = dict(payload.get("info") or {})
    if payload.get("threshold"):
        detector.threshold = Threshold.from_dict(payload["threshold"])
    detector.fitted = True
    return detector


def save_detector(detector: Detector, store, key: str) -> str:  # noqa: ANN001 (ObjectStore)
    store.put_bytes(key, detector_to_bytes(detector))
    return store.uri(key)


def load_detector(store, key: str, device: str | None = None) -> Detector:  # noqa: ANN001
    return detector_from_bytes(store.get_bytes(key), store.uri(key), device)
