"""Detectors: fit on normal images, score a defect higher, save/load through S3 with identical
scores, refuse bad input clearly, and honour a manual threshold."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import smooth_textures
from flawline.errors import ConfigError, InvalidInput
from flawline.evaluate.metrics import roc_auc
from flawline.evaluate.thresholds import manual, quantile
from flawline.models import create_detector, detector_names, normal_only_detectors
from flawline.models.artifacts import (
    detector_from_bytes,
    detector_to_bytes,
    load_detector,
    read_header,
    save_detector,
)

SIZE = 64
FAST = {"image_size": SIZE, "batch_size": 8}
ALL = ["patchcore", "padim", "flow", "reconstruction", "selfsup", "ndpnet"]
SHORT = {"flow": {"epochs": 6}, "reconstruction": {"epochs": 6}, "selfsup": {"epochs": 3},
         "ndpnet": {"epochs": 12, "phase1_epochs": 2, "lr": 1e-2}}


def make(method: str):
    return create_detector(method, **FAST, **SHORT.get(method, {}))


def textures(n: int, seed: int) -> torch.Tensor:
    return smooth_textures(n, seed, SIZE)


def with_defects(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[:, :, 20:34, 24:38] = 1.0  # a bright blotch
    return y


@pytest.fixture(scope="module")
def data():
    return textures(24, 0), textures(8, 1), with_defects(textures(8, 2))


def test_normal_only_detectors_are_those_that_fit_on_normal_images(data):
    """What the Magnetic Tile benchmark runs by default. The others need labelled defects: the
    label-trained ones refuse ``fit``; ``mixed`` fits its base there and its head in the mixed setting."""
    assert set(ALL) <= set(normal_only_detectors())
    assert "reference" in normal_only_detectors(paired=True) and "reference" not in normal_only_detectors()
    label_trained = sorted(set(detector_names()) - set(normal_only_detectors(paired=True)))
    assert {"classifier", "fewshot", "segmenter", "mixed"} <= set(label_trained)
    for name in set(label_trained) - {"mixed"}:
        with pytest.raises(ConfigError):
            create_detector(name, **FAST).fit(data[0][:4])


@pytest.mark.parametrize("method", ALL)
def test_fit_predict_separates_defects(method, data):
    train, normal, defect = data
    det = make(method).fit(train)
    pred = det.predict(torch.cat([normal, defect]))
    assert pred.scores.shape == (16,) and pred.maps.shape == (16, SIZE, SIZE)
    assert roc_auc([0] * 8 + [1] * 8, pred.scores) == 1.0
    hot = pred.maps[8:, 20:34, 24:38].mean()
    cold = pred.maps[8:, 48:, :16].mean()
    assert hot > cold  # the map points at the blotch


def test_detectors_are_registered():
    assert set(ALL) <= set(detector_names())
    with pytest.raises(ConfigError, match="unknown detector 'foo'"):
        create_detector("foo")
    with pytest.raises(ConfigError, match="unknown settings bogus"):
        create_detector("patchcore", bogus=1)


@pytest.mark.parametrize("method", ALL)
def test_save_load_through_s3_gives_identical_scores(method, data, store):
    train, normal, defect = data
    det = make(method).fit(train)
    det.set_threshold(quantile(det.predict(normal).scores, 0.9, data={"dataset": "synthetic", "split": "val"}))
    uri = save_detector(det, store, f"models/{method}/1/model.pt")
    assert uri.endswith(f"models/{method}/1/model.pt")
    loaded = load_detector(store, f"models/{method}/1/model.pt")
    x = torch.cat([normal, defect])
    np.testing.assert_array_equal(loaded.predict(x).scores, det.predict(x).scores)
    assert loaded.threshold.method == "quantile" and loaded.threshold.data["split"] == "val"
    assert loaded.config == det.config


def test_incompatible_or_foreign_files_are_refused(data):
    det = create_detector("patchcore", **FAST).fit(data[0])
    blob = detector_to_bytes(det)
    header = read_header(blob)
    header["format_version"] = 99
    import io
    buf = io.BytesIO()
    torch.save(header, buf)
    with pytest.raises(InvalidInput, match="model format v99; this flawline .* reads v1"):
        detector_from_bytes(buf.getvalue())
    with pytest.raises(InvalidInput, match="not a flawline model file"):
        detector_from_bytes(b"garbage")


def test_manual_threshold_overrides(data):
    train, normal, defect = data
    det = create_detector("patchcore", **FAST).fit(train)
    det.set_threshold(quantile(det.predict(normal).scores, 0.5))
    x = torch.cat([normal, defect])
    pred = det.predict(x)
    assert pred.is_defect.sum() > 0
    det.set_threshold(manual(float(pred.scores.max()) + 1.0, "no alarms during line restart"))
    again = det.predict(x)
    assert again.threshold.value == pytest.approx(float(pred.scores.max()) + 1.0)
    assert not again.is_defect.any()  # the manual value, not the calibrated one, decides
    det.threshold = None
    with pytest.raises(ConfigError, match="no threshold"):
        det.predict(x).is_defect


@pytest.mark.parametrize("bad,message", [
    (torch.rand(2, 4, 64, 64), "4 channels; expected 1 (gray) or 3 (RGB)"),
    (torch.rand(2, 2, 64, 64), "2 channels"),
    (torch.rand(2, 3, 8, 8), "outside 16..8192"),
    (torch.rand(1, 3, 16, 9000), "outside 16..8192"),
    (torch.full((2, 3, 64, 64), float("nan")), "NaN or infinite"),
    (torch.rand(0, 3, 64, 64), "no images"),
    (torch.rand(2, 3, 64, 64) * 255, "values span .*255; expected \\[0, 1\\]"),  # 0..255 as floats
    ((torch.rand(2, 3, 64, 64) - 0.45) / 0.226, "not normalised by a mean and std"),  # ImageNet-normalised
])
def test_bad_input_is_refused(bad, message, data):
    det = create_detector("padim", **FAST).fit(data[0])
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        det.predict(bad)


def test_uint8_images_score_as_their_float_scaling(data):
    """uint8 0..255 (torchvision.io, numpy) means x / 255: the same scores, not 255x brighter images."""
    det = create_detector("padim", **FAST).fit(data[0])
    as_uint8 = (data[2] * 255).round().to(torch.uint8)
    np.testing.assert_allclose(det.predict(as_uint8).scores, det.predict(as_uint8.float() / 255).scores, rtol=1e-5)


def test_empty_training_set_and_unfitted_model():
    det = create_detector("patchcore", **FAST)
    with pytest.raises(InvalidInput, match="empty training set"):
        det.fit([])
    with pytest.raises(ConfigError, match="not fitted"):
        det.predict(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("method", ALL)
def test_onnx_export_scores_like_the_model(method, data, tmp_path):
    from flawline.models.export import check_export, export_onnx, onnx_predict

    train, normal, defect = data
    det = make(method).fit(train)
    path = export_onnx(det, tmp_path / f"{method}.onnx")
    drift = check_export(det, path, torch.cat([normal, defect]))
    assert drift["max_rel_score_diff"] < 1e-4
    scores, _ = onnx_predict(path, det.prepare(defect).numpy())
    np.testing.assert_allclose(scores, det.predict(defect).scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_every_detector_fits_and_predicts_under_bf16(method, data):
    """Fitting runs under the configured autocast too (reconstruction once failed there: torch.cat
    of its fp16 feature cache under bf16 autocast)."""
    train, normal, defect = data
    det = create_detector(method, **FAST, **SHORT.get(method, {}), precision="bf16").fit(train)
    scores = det.predict(torch.cat([normal, defect])).scores
    assert np.isfinite(scores).all() and roc_auc([0] * 8 + [1] * 8, scores) >= 0.9


def test_bf16_precision_tracks_fp32(data):
    train, normal, defect = data
    x = torch.cat([normal, defect])
    det = create_detector("patchcore", **FAST).fit(train)
    fp32 = det.predict(x).scores
    bf16 = det.predict(x, precision="bf16").scores
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.99
    assert roc_auc([0] * 8 + [1] * 8, bf16) == 1.0
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        create_detector("patchcore", precision="fp8")


def embedded_by_workers(method: str, images: torch.Tensor, parts: int = 2, **settings) -> list:
    """Embeddings as other workers make them: each part embedded by a fresh detector, moved to the CPU."""
    out = []
    for part in images.chunk(parts):
        worker = create_detector(method, **FAST, **settings)
        e = worker.embed(worker.prepare(part))
        out.append(tuple(t.cpu() for t in e) if isinstance(e, tuple) else e.cpu())
    return out


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_fit_on_embeddings_from_two_workers_matches_fit(method, data):
    train, normal, defect = data
    x = torch.cat([normal, defect])
    direct = create_detector(method, **FAST).fit(train)
    spread = create_detector(method, **FAST).fit_embedded(embedded_by_workers(method, train))
    assert spread.fitted and spread.info["train_images"] == direct.info["train_images"] == 24
    a, b = spread.predict(x), direct.predict(x)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidInput, match="empty training set"):
        create_detector(method, **FAST).fit_embedded([])


@pytest.mark.parametrize("method", ["flow", "reconstruction"])
def test_fit_on_tuple_and_fp16_embeddings(method, data):
    train, normal, defect = data
    x = torch.cat([normal, defect])
    settings = {"epochs": 2}
    # parts of one batch each (8 images), as fit() batches them: the same features, the same training
    embedded = embedded_by_workers(method, train, parts=3, **settings)
    if method == "flow":
        assert isinstance(embedded[0], tuple) and len(embedded[0]) == 3
    else:
        assert embedded[0].dtype == torch.float16
    spread = create_detector(method, **FAST, **settings).fit_embedded(embedded)
    direct = create_detector(method, **FAST, **settings).fit(train)
    assert spread.info["train_images"] == 24
    np.testing.assert_allclose(spread.predict(x).scores, direct.predict(x).scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["flow", "reconstruction", "selfsup"])
def test_streamed_fit_embeds_again_each_epoch_and_separates_defects(method, data):
    """A shard too large to keep embedded (``fit_network_streamed``): begin_training sees the first
    batch only, every epoch embeds the images again as they stream in, and only the asked number
    of steps train; the model still separates defects."""
    from flawline.models.training import fit_network_streamed
    from flawline.train.context import LocalContext

    train, normal, defect = data
    det = make(method)
    batches = embedded_by_workers(method, train, parts=3)  # 3 batches of 8 images
    epochs_seen = []

    def epoch_inputs(epoch: int):
        epochs_seen.append(epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(train), 8):
            e = det.embed(det.prepare(train[order[i:i + 8]]))
            yield tuple(t.detach() for t in e) if isinstance(e, tuple) else e.detach()

    history = fit_network_streamed(det, batches[0], epoch_inputs, 3, LocalContext("cpu"))
    det.fitted = True
    assert epochs_seen == list(range(det.config.epochs)) and len(history) == det.config.epochs
    assert roc_auc([0] * 8 + [1] * 8, det.predict(torch.cat([normal, defect])).scores) == 1.0


def test_validflow_components_switch_off_and_models_saved_before_them_load(data):
    """ValidFlow's published components are on by default and each can be switched off (the
    ablation); a flow saved before they existed (no architecture record) loads as it was built."""
    from flawline.models.flow import LEGACY_ARCH, CBAM, ActNorm

    train, normal, defect = data
    x = torch.cat([normal, defect])
    published = create_detector("flow", **FAST, epochs=2).fit(train)
    modules = list(published.flow.modules())
    assert len(published.flow.blocks) == 6 and any(isinstance(m, ActNorm) for m in modules)
    assert sum(isinstance(m, CBAM) for m in modules) == 6 * 2 * 3  # both subnets of every block, every scale
    fb = published.flow.blocks[1].net1
    assert sorted(fb.down) == ["01", "02", "12"]  # strided convolutions, scale 1 -> 3 included
    assert fb.down["02"].stride == (4, 4)

    legacy = create_detector("flow", **FAST, epochs=2, **LEGACY_ARCH).fit(train)
    assert len(legacy.flow.blocks) == 4 and not any(isinstance(m, (ActNorm, CBAM)) for m in legacy.flow.modules())
    state = legacy.state_dict()
    del state["arch"]  # as flawline wrote it before ValidFlow's components
    old = create_detector("flow", **FAST)  # today's defaults: the published architecture
    old.load_state_dict(state)
    assert old.config.blocks == 4 and not old.config.actnorm
    np.testing.assert_allclose(old.predict(x).scores, legacy.predict(x).scores, rtol=1e-5, atol=1e-6)
    restored = detector_from_bytes(detector_to_bytes(published))
    np.testing.assert_allclose(restored.predict(x).scores, published.predict(x).scores, rtol=1e-5, atol=1e-6)


def test_feature_reconstruction_as_published_and_models_saved_before_it_load(data):
    """FRAD's network (three bottleneck modules each way, skip connections, GFE over a K x K grid)
    and loss weight are the defaults; the earlier compact network stays an option, and models saved
    before ``arch`` existed load as it, with the loss weight they were trained with."""
    from flawline.models.reconstruction import Bottleneck, GlobalFeature, ReconstructionNet

    gfe = GlobalFeature(32, grid=4)
    t = torch.zeros(1, 32, 8, 8)
    t[0, :, :2, :2] = 1.0  # only the top-left region is non-zero
    with torch.no_grad():
        gfe.fc.weight.fill_(1.0)
        gfe.fc.bias.zero_()
        out = gfe(t)
    assert out.shape == (1, 64, 8, 8) and gfe.fc.out_features == 2  # C / K^2 per region
    g = out[0, 32:, 0, 0]
    assert g[:2].tolist() == [32.0, 32.0] and not g[2:].any()  # region 1's mean, summed by the fc; others 0

    train, normal, defect = data
    x = torch.cat([normal, defect])
    paper = create_detector("reconstruction", **FAST, epochs=2).fit(train)
    assert isinstance(paper.net, ReconstructionNet) and paper.config.ssl_weight == 0.1
    assert sum(isinstance(m, Bottleneck) for m in paper.net.modules()) == 18
    compact = create_detector("reconstruction", **FAST, epochs=2, arch="compact", ssl_weight=1.0).fit(train)
    state = compact.state_dict()
    del state["arch"]  # as flawline wrote it before FRAD's network
    old = create_detector("reconstruction", **FAST)
    old.load_state_dict(state)
    assert (old.config.arch, old.config.ssl_weight) == ("compact", 1.0)
    np.testing.assert_allclose(old.predict(x).scores, compact.predict(x).scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="arch 'unet' must be one of paper, compact"):
        create_detector("reconstruction", arch="unet")


def test_ndpnet_reference_phases_and_resume(data):
    """NDP-Net (../shared/seeds/002): the fixed reference is one of the training images, saved and
    restored with the model; phase 2 leaves the encoder exactly as phase 1 left it while RBAM,
    decoder and segmentation train; a run resumed from a checkpoint lands in the right phase and
    ends where an uninterrupted one does; RBFRM repairs from reference patches only; the detector
    outlines artificial defects on held-out normals better than chance."""
    import copy

    from flawline.data.synthetic import SyntheticDefects
    from flawline.models.ndpnet import repair
    from flawline.models.training import concat, fit_network
    from flawline.train.context import LocalContext

    class Recording(LocalContext):
        def __init__(self, **kw) -> None:
            super().__init__("cpu", **kw)
            self.checkpoints: list[dict] = []

        def report(self, metrics, state) -> None:
            super().report(metrics, state)
            self.checkpoints.append(copy.deepcopy(state))

    # RBFRM: with the reference's own map as input and a sharp softmax, each patch comes back
    # (nearly) itself; any input is repaired into a mix of reference patches (padding: 5 -> 8).
    ref = torch.rand(1, 6, 5, 5)
    assert torch.allclose(repair(ref, ref, 2, scale=200.0), ref, atol=1e-3)
    out = repair(torch.rand(3, 6, 5, 5), ref, 4)
    assert out.shape == (3, 6, 5, 5) and out.min() >= ref.min() - 1e-6 and out.max() <= ref.max() + 1e-6

    train, normal, defect = data
    settings = {**FAST, **SHORT["ndpnet"]}
    det = create_detector("ndpnet", **settings)
    det.extractor  # noqa: B018  (built first, as fit does)
    torch.manual_seed(det.config.seed)
    embedded = concat([det.embed(det.prepare(b)) for b in train.split(8)])
    ctx = Recording()
    fit_network(det, embedded, ctx)
    det.fitted = True
    p1 = det.config.phase1_epochs
    states = [c["net"] for c in ctx.checkpoints]
    assert len(states) == det.config.epochs and p1 >= 2

    def part(state: dict, prefix: str) -> dict:
        return {k: v for k, v in state.items() if k.startswith(prefix)}

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    first, end1, last = states[0], states[p1 - 1], states[-1]
    assert not same(part(first, "encoder."), part(end1, "encoder."))  # phase 1 trains the encoder ...
    assert same(part(first, "segmenters."), part(end1, "segmenters."))  # ... and leaves MSDSM alone
    assert same(part(end1, "encoder."), part(last, "encoder."))  # phase 2: encoder frozen, exactly
    for prefix in ("fusion.", "decoder.", "segmenters."):
        assert not same(part(end1, prefix), part(last, prefix)), prefix

    # Resumed after phase 1's last checkpoint: phase 2 from the epoch number, same end weights.
    again = create_detector("ndpnet", **settings)
    again.extractor  # noqa: B018
    torch.manual_seed(again.config.seed)
    history = fit_network(again, embedded, LocalContext("cpu", start_from=ctx.checkpoints[p1 - 1]))
    assert again.phase == 2 and [h["epoch"] for h in history] == list(range(p1 + 1, det.config.epochs + 1))
    for k, v in again.net.state_dict().items():
        torch.testing.assert_close(v, last[k], rtol=1e-5, atol=1e-6, msg=k)

    # The reference: a training image (as embedded, fp16), kept through save and load.
    prepared = det.prepare(train).half().float()
    assert min(float((det.reference - p).abs().max()) for p in prepared) == 0.0
    loaded = detector_from_bytes(detector_to_bytes(det))
    assert torch.equal(loaded.reference, det.reference)
    x = torch.cat([normal, defect])
    np.testing.assert_array_equal(loaded.predict(x).scores, det.predict(x).scores)

    # Better than chance on artificial defects (Perlin blobs of foreign texture) on unseen normals.
    held_out = textures(64, 7).expand(-1, 3, -1, -1)
    bad, _ = SyntheticDefects(cutpaste_prob=0.0)(held_out[32:], torch.Generator().manual_seed(3))
    scores = det.predict(torch.cat([held_out[:32], bad])).scores
    assert roc_auc([0] * 32 + [1] * 32, scores) >= 0.7  # 0.78 when written


@pytest.mark.parametrize("method", ["segmenter", "classifier"])
def test_label_trained_networks_start_from_their_seed_alone(method):
    """The new layers of a label-trained detector's network are drawn from ``config.seed``: the
    same after other random work in the process (a benchmark's earlier rows once gave a tiled
    segmenter 0.89 image ROC-AUC in one process and 0.9989 in a fresh one, same seed), different
    for another seed, and the caller's random state is left untouched."""
    def head(seed: int) -> torch.Tensor:
        net = create_detector(method, seed=seed).net
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    first = head(3)
    torch.manual_seed(123)
    torch.rand(1000)
    state = torch.random.get_rng_state()
    assert torch.equal(head(3), first)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(head(4), first)


def test_settings_out_of_range_are_refused_from_python_too():
    """create_detector checks the same ranges as --option: a count below 1, a share outside 0-1, a
    negative weight or no real device is one ConfigError naming the setting and its default."""
    cases = {("patchcore", "coreset_ratio", 2.0): "coreset_ratio=2.0 is a share",
             ("patchcore", "batch_size", 0): "batch_size=0 must be at least 1 (default 16)",
             ("padim", "blur_sigma", -1.0): "blur_sigma=-1.0 must be at least 0",
             ("flow", "device", "gpu"): "device='gpu' is no device"}
    for (name, key, value), message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            create_detector(name, **{key: value})
    assert create_detector("patchcore", coreset_ratio=0.1, batch_size=1).config.coreset_ratio == 0.1
