"""Detectors: backbones, the detector interface and registry, and the detectors themselves."""

from flawline.models import flow, padim, patchcore, reconstruction, selfsup  # noqa: F401  (registration)
from flawline.models.base import Detector, DetectorConfig, Prediction, create_detector, detector_names

__all__ = ["Detector", "DetectorConfig", "Prediction", "create_detector", "detector_names"]
