"""The part every detector trained from labels shares: a network on a fine-tuned timm encoder,
built on first use (training updates it in place), saved and loaded as its state dict. Fitting on
normal images alone is refused: ``flawline.train``'s label settings train these."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flawline.errors import ConfigError
from flawline.models.backbones import FeatureExtractor, build_feature_extractor
from flawline.models.base import Detector


class LabelTrainedDetector(Detector):
    """Subclasses set ``build_net(encoder)``; their config has ``freeze_blocks``."""

    learns_from_labels = True

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._net: nn.Module | None = None

    def build_net(self, encoder: FeatureExtractor) -> nn.Module:
        raise NotImplementedError

    @property
    def net(self) -> nn.Module:
        """The trainable network (built on first use; training updates it in place). Its new layers
        are initialised from ``config.seed`` alone, not from whatever the process drew before: the
        same seed gives the same network in a fresh training job and after other work in one
        process (a benchmark's earlier rows), and the caller's random state is left as it was."""
        if self._net is None:
            c = self.config
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                encoder = build_feature_extractor(c.backbone, c.weights, layers=(1, 2, 3, 4), trainable=True)
                encoder.freeze_stem(c.freeze_blocks)
                self._net = self.build_net(encoder).to(self.device).eval()
        return self._net

    def state_dict(self) -> dict[str, Any]:
        return {"net": {k: v.cpu() for k, v in self.net.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.fitted = True

    def _fit_embedded(self, embedded) -> int:  # noqa: ANN001
        raise ConfigError(f"{self.name} learns from labels: train it with `flawline train submit --setting ...`")
