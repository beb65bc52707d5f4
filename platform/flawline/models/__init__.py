"""Detectors: backbones, the detector interface and registry, and the detectors themselves."""

from flawline.models import (  # noqa: F401  (registration)
    classifier, fewshot, flow, mixed, ndpnet, padim, patchcore, reconstruction, reference, segmenter, selfsup)
from flawline.models.base import (Detector, DetectorConfig, Prediction, create_detector, detector_names,
                                  normal_only_detectors)

__all__ = ["Detector", "DetectorConfig", "Prediction", "create_detector", "detector_names", "normal_only_detectors"]
