"""Export a fitted detector's whole prediction path (backbone, features, scoring, map
upsampling and blur) to ONNX, and check that the exported model scores like the original."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from flawline.errors import InvalidInput
from flawline.models.base import Detector

# Float32 paths through different kernels differ in rounding only; anything larger is a real drift.
SCORE_RTOL = 1e-4
SCORE_ATOL = 1e-4


def export_onnx(detector: Detector, path: Path, opset: int = 17) -> Path:
    if not detector.fitted:
        raise InvalidInput(f"{detector.name}: cannot export a detector that is not fitted")
    scorer = detector.predictor(chunked=False).cpu().eval()
    size = detector.config.image_size
    example = torch.rand(2, detector.input_channels, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            scorer, (example,), str(path), input_names=["images"], output_names=["scores", "maps"],
            dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}},
            opset_version=opset, dynamo=False,
        )
    return path


def onnx_predict(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(["scores", "maps"], {"images": images.astype(np.float32)})
    return scores, maps


def check_export(detector: Detector, path: Path, images: torch.Tensor) -> dict[str, float]:
    """Scores of the exported model against the original on ``images`` (already [N, 3, S, S])."""
    ref = detector.predict(images, precision="fp32")  # the export is fp32
    x = detector.prepare(images).cpu().numpy()
    scores, maps = onnx_predict(path, x)
    drift = {"max_abs_score_diff": float(np.abs(scores - ref.scores).max()),
             "max_rel_score_diff": float((np.abs(scores - ref.scores) / np.maximum(np.abs(ref.scores), 1e-12)).max()),
             "max_abs_map_diff": float(np.abs(maps - ref.maps).max())}
    if not np.allclose(scores, ref.scores, rtol=SCORE_RTOL, atol=SCORE_ATOL):
        raise InvalidInput(f"exported model drifts from the saved one: max score difference "
                           f"{drift['max_abs_score_diff']:.3g} exceeds rtol {SCORE_RTOL} / atol {SCORE_ATOL}")
    return drift
