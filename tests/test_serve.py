"""Serving on a real local Ray cluster: `flawline serve up` deploys serve/config.yaml (Serve HTTP on a
free port), small PaDiM models fitted on real Magnetic Tile images are registered in a real
catalog with artifacts in the real S3 server, and requests go over loopback HTTP.

Covers: raw, multipart and s3:// requests; batch inspection requests answered per image; heatmap, mask and region polygons on request; the model
list and health endpoints; a `reference` model (each image against the request's reference image)
over HTTP, gRPC and `flawline predict`; promotion and rollback switching predictions without a redeploy; bad
input answered 4xx while the server keeps serving; a broken artifact answering 503 for that model
only; the gRPC API answering as HTTP does, errors as gRPC status codes; `flawline predict` over
HTTP, gRPC and --local writing overlays; Ray metrics; `serve status|down`.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from flawline.catalog import Catalog, upgrade
from flawline.catalog.db import make_engine
from flawline.catalog.model_versions import promote, register_version
from flawline.cli.main import app
from flawline.cluster.local_ray import LocalRayCluster, free_ports
from flawline.config import get_settings
from flawline.evaluate import thresholds as th
from flawline.storage import ObjectStore

from conftest import MAGNETIC_TILE, REPO

SIZE = 64


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, a few hundred bytes long."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _fit(images: list[bytes], seed: int):
    from flawline.data.loading import decode_image, stack_rgb
    from flawline.models import create_detector

    batch = stack_rgb([decode_image(b, SIZE) for b in images])
    det = create_detector("padim", image_size=SIZE, seed=seed, channels=40, batch_size=8).fit(batch)
    det.set_threshold(th.max_score(det.predict(batch).scores, {"images": len(images)}))
    return det


def _reference_model() -> dict:
    """A tiny `reference` detector fitted on synthetic board pairs (tests/test_reference.py), and
    one board's golden image with three more photos of it."""
    import torch

    from flawline.data.loading import decode_image, pair
    from flawline.models import create_detector
    from test_reference import _png as board_png
    from test_reference import boards, capture, design

    images, refs, _ = boards(6, 20)
    batch = torch.stack([pair(decode_image(board_png(i), SIZE), decode_image(board_png(r), SIZE))
                         for i, r in zip(images, refs)])
    det = create_detector("reference", image_size=SIZE, batch_size=8).fit(batch)
    det.set_threshold(th.max_score(det.predict(batch).scores, {"images": len(images)}))
    rng = np.random.default_rng(21)
    board = design(rng)
    return {"det": det, "golden": board_png(capture(board, rng)),
            "shots": [board_png(capture(board, rng)) for _ in range(3)]}


@pytest.fixture(scope="module")
def served(s3_server, tmp_path_factory):
    """A Ray cluster, a catalog and bucket with models, and the application deployed by the CLI."""
    from flawline.models.artifacts import detector_to_bytes

    tmp = tmp_path_factory.mktemp("serve")
    mp = pytest.MonkeyPatch()
    # Ray's metrics reach the node's endpoint every report interval: short, so the test sees them.
    mp.setenv("RAY_metrics_report_interval_ms", "1000")
    cluster = LocalRayCluster.on_free_ports(num_cpus=4, log_file=tmp / "ray.log")
    cluster.start()
    try:
        url = f"sqlite:///{tmp / 'catalog.db'}"
        upgrade(make_engine(url))
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        port, grpc_port = free_ports(2)
        env = {
            "FLAWLINE_DATA_DIR": str(tmp / "data"), "FLAWLINE_CATALOG_URL": url,
            "FLAWLINE_S3_ENDPOINT": s3_server.endpoint, "FLAWLINE_S3_ACCESS_KEY": s3_server.access_key,
            "FLAWLINE_S3_SECRET_KEY": s3_server.secret_key, "FLAWLINE_S3_BUCKET": bucket,
            "FLAWLINE_UPLOAD_WORKERS": "4", "FLAWLINE_LABELSTUDIO_URL": "http://127.0.0.1:9",
            "FLAWLINE_RAY_DASHBOARD_URL": cluster.dashboard_url, "FLAWLINE_SERVE_PORT": str(port),
            "FLAWLINE_SERVE_GRPC_PORT": str(grpc_port),
        }
        mp.delenv("FLAWLINE_CONFIG", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        store = ObjectStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
        store.ensure_bucket()
        catalog = Catalog(url)

        free = sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))
        blowholes = sorted((MAGNETIC_TILE / "MT_Blowhole" / "Imgs").glob("*.jpg"))
        normals = [p.read_bytes() for p in free[:8]]
        v1, v2 = _fit(normals, seed=0), _fit(normals, seed=1)
        pcb = _reference_model()
        # "tiles-regions": v1's artifact with a threshold at the 90th percentile of a blowhole's map,
        # so that image has defect regions to outline.
        probe = v1.predict(torch_image(blowholes[0].read_bytes()))
        low = th.manual(float(np.quantile(probe.maps[0], 0.9)), "test: regions")
        with catalog.session() as s:
            uris = []
            for det in (v1, v2):
                key = f"models/tiles/{uuid.uuid4().hex}.pt"
                store.put_bytes(key, detector_to_bytes(det))
                uris.append(store.uri(key))
                register_version(s, name="tiles", artifact_uri=uris[-1], method="padim",
                                 backbone="efficientnet_lite0", threshold=det.threshold.as_dict(), metrics=None)
            register_version(s, name="tiles-regions", artifact_uri=uris[0], method="padim", backbone=None,
                             threshold=low.as_dict(), metrics=None)
            store.put_bytes("models/pcb-ref.pt", detector_to_bytes(pcb["det"]))
            register_version(s, name="pcb-ref", artifact_uri=store.uri("models/pcb-ref.pt"), method="reference",
                             backbone=None, threshold=pcb["det"].threshold.as_dict(), metrics=None)
            store.put_bytes("references/board.png", pcb["golden"])  # the product's golden image, uploaded once
            store.put_bytes("references/junk.png", b"not an image")
            store.put_bytes("models/broken.pt", b"this is not a model")
            register_version(s, name="broken", artifact_uri=store.uri("models/broken.pt"), method="padim",
                             backbone=None, threshold=None, metrics=None)
            promote(s, "tiles:1")
        result = _cli("serve", "up", "--config", REPO / "serve" / "config.yaml", "--timeout", 240)
        assert result.exit_code == 0, result.output + (tmp / "ray.log").read_text()[-3000:]
        assert f"127.0.0.1:{port}" in result.output and f"gRPC (serve/flawline.proto) on port {grpc_port}" in result.output
        _warm_up(f"http://127.0.0.1:{port}", normals[0], ["tiles"])
        yield {"url": f"http://127.0.0.1:{port}", "store": store, "catalog": catalog, "cluster": cluster,
               "free": free, "blowholes": blowholes, "v1": v1, "v2": v2, "port": port,
               "grpc": f"127.0.0.1:{grpc_port}", "grpc_port": grpc_port, "pcb": pcb}
    finally:
        _cli("serve", "down")
        cluster.stop()
        mp.undo()
        get_settings.cache_clear()


def torch_image(data: bytes):
    from flawline.data.loading import decode_image, stack_rgb

    return stack_rgb([decode_image(data, SIZE)])


def _warm_up(url: str, image: bytes, models: list[str], within_s: float = 300.0) -> None:
    """The first request for a model loads it into the replica (S3, warm-up pass): on a loaded
    machine that alone took over the tests' 60 s per request (and Serve's own 60 s request timeout,
    answered 408), so it happens here, asked again until ``within_s``."""
    for model in models:
        deadline = time.monotonic() + within_s
        while True:
            warm = requests.post(f"{url}/v1/models/{model}/predict", data=image,
                                 headers={"Content-Type": "image/jpeg"}, timeout=within_s)
            if warm.status_code not in (408, 503, 504) or time.monotonic() > deadline:
                break
        assert warm.status_code == 200, (model, warm.text)


def _predict(served, model="tiles", data=None, query="", **kwargs):
    headers = kwargs.pop("headers", {"Content-Type": "image/jpeg"})
    return requests.post(f"{served['url']}/v1/models/{model}/predict{query}", data=data, headers=headers,
                         timeout=60, **kwargs)


def _expected(det, data: bytes) -> float:
    return float(det.predict(torch_image(data)).scores[0])


def test_predict_raw_multipart_and_s3_key(served):
    image = served["free"][20].read_bytes()
    raw = _predict(served, data=image)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert set(body) >= {"score", "is_defect", "threshold", "defect_class", "model_version", "latency_ms"}
    assert body["model"] == "tiles" and body["model_version"] == 1  # the production version
    assert body["score"] == pytest.approx(_expected(served["v1"], image), rel=1e-4)
    assert body["threshold"] == pytest.approx(served["v1"].threshold.value)
    assert body["is_defect"] == (body["score"] >= body["threshold"]) and body["defect_class"] is None
    assert body["latency_ms"] >= body["inference_ms"] > 0 and body["batch_size"] >= 1 and "heatmap_png" not in body

    multipart = requests.post(f"{served['url']}/v1/models/tiles/predict", timeout=60,
                              files={"image": ("tile.jpg", image, "image/jpeg")}, data={"note": "line 3"})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["score"] == pytest.approx(body["score"], rel=1e-6)

    served["store"].put_bytes("incoming/tile.jpg", image)
    by_key = _predict(served, data=json.dumps({"uri": served["store"].uri("incoming/tile.jpg")}),
                      headers={"Content-Type": "application/json"})
    assert by_key.status_code == 200, by_key.text
    assert by_key.json()["score"] == pytest.approx(body["score"], rel=1e-6)

    pinned = _predict(served, model="tiles:2", data=image)  # a version by number, whatever its stage
    assert pinned.status_code == 200 and pinned.json()["model_version"] == 2
    assert pinned.json()["score"] == pytest.approx(_expected(served["v2"], image), rel=1e-4)


def test_heatmap_mask_and_region_polygons_on_request(served):
    data = served["blowholes"][0].read_bytes()
    width, height = Image.open(io.BytesIO(data)).size
    r = _predict(served, model="tiles-regions", data=data, query="?heatmap=true&mask=1&regions=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["map_size"] == [SIZE, SIZE] and body["image_size"] == [width, height]
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert heat.shape == mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
    assert 0.05 < (mask > 0).mean() < 0.2  # the threshold is the map's 90th percentile
    assert body["is_defect"] is True and body["regions"]
    for region in body["regions"]:
        polygon = np.array(region["polygon"])
        assert len(polygon) >= 3
        assert (polygon[:, 0] >= 0).all() and (polygon[:, 0] <= width).all()
        assert (polygon[:, 1] >= 0).all() and (polygon[:, 1] <= height).all()
        x0, y0, x1, y1 = region["bbox"]
        assert x0 - 1 <= polygon[:, 0].min() and polygon[:, 0].max() <= x1 + 1
        assert y0 - 1 <= polygon[:, 1].min() and polygon[:, 1].max() <= y1 + 1
    assert sum(reg["area_px"] for reg in body["regions"]) == pytest.approx(
        (mask > 0).mean() * width * height, rel=0.01)
    # the heatmap is the map on the stated scale: hi = twice the threshold
    assert body["heatmap_scale"]["hi"] == pytest.approx(2 * body["threshold"])


def test_model_list_and_health(served):
    health = requests.get(f"{served['url']}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "catalog": "ok", "model_server": "ok"}
    models = {m["name"]: m for m in requests.get(f"{served['url']}/v1/models", timeout=30).json()["models"]}
    assert set(models) == {"tiles", "tiles-regions", "broken", "pcb-ref"}
    assert models["tiles"]["production"] == 1 and models["tiles"]["serving"] == 1
    assert [(v["version"], v["stage"]) for v in models["tiles"]["versions"]] == [(1, "production"), (2, "candidate")]
    assert models["broken"]["production"] is None and models["broken"]["serving"] == 1  # the newest


def _version_within(served, data, want, seconds=15.0):
    deadline = time.monotonic() + seconds
    while True:
        r = _predict(served, data=data)
        assert r.status_code == 200, r.text
        if r.json()["model_version"] == want or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.2)


def test_promotion_and_rollback_switch_predictions_without_redeploy(served):
    image = served["free"][21].read_bytes()
    assert _version_within(served, image, 1)["model_version"] == 1
    result = _cli("models", "promote", "tiles:2")
    assert result.exit_code == 0, result.output
    body = _version_within(served, image, 2)
    assert body["model_version"] == 2
    assert body["score"] == pytest.approx(_expected(served["v2"], image), rel=1e-4)
    assert body["score"] != pytest.approx(_expected(served["v1"], image), rel=1e-3)
    models = {m["name"]: m for m in requests.get(f"{served['url']}/v1/models", timeout=30).json()["models"]}
    assert models["tiles"]["production"] == 2
    assert _cli("models", "rollback", "tiles").exit_code == 0
    assert _version_within(served, image, 1)["model_version"] == 1
    # a threshold set by hand applies to the next requests too (it travels with the resolved version)
    assert _cli("models", "threshold", "tiles:1", "--value", "0").exit_code == 0
    deadline = time.monotonic() + 15
    while (body := _predict(served, data=image).json())["threshold"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert body["threshold"] == 0 and body["is_defect"] is True
    assert _cli("models", "threshold", "tiles:1", "--value", served["v1"].threshold.value).exit_code == 0


def test_bad_input_gets_4xx_and_the_server_keeps_serving(served):
    good = served["free"][22].read_bytes()
    rgba = _png(Image.new("RGBA", (32, 32), (1, 2, 3, 4)))
    truncated = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    truncated = truncated[: len(truncated) // 2]
    cases = [
        ({"data": b"hello, I am not an image"}, 400, "not an image"),
        ({"data": truncated}, 400, "image"),
        ({"data": _huge_png(100_000, 100_000)}, 413, "exceeds"),
        ({"data": _huge_png(9_000, 9_000)}, 413, "exceeds the limit"),
        ({"data": b""}, 400, "empty"),
        ({"data": rgba}, 400, "mode RGBA"),
        ({"data": good, "headers": {"Content-Type": "text/plain"}}, 415, "text/plain is not accepted"),
        ({"data": good, "headers": {}}, 415, "Content-Type"),
        ({"data": good, "model": "nope"}, 404, "no model 'nope'"),
        ({"data": good, "model": "tiles:9"}, 404, "no model 'tiles:9'"),
        ({"data": good, "model": "tiles:x"}, 400, "version must be a number"),
        ({"data": good, "query": "?heatmap=maybe"}, 400, "heatmap"),
        ({"data": good, "query": "?heatmapp=true"}, 400, "unknown query parameter 'heatmapp'; a predict request "
                                                         "takes heatmap, mask, regions, reference"),
        ({"data": json.dumps({"uri": "s3://elsewhere/key.jpg"}), "headers": {"Content-Type": "application/json"}},
         400, "this server reads images from s3://t-"),
        ({"data": json.dumps({"uri": served["store"].uri("incoming/missing.jpg")}),
          "headers": {"Content-Type": "application/json"}}, 404, "does not exist"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "JSON"),
        ({"data": b"--x\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--x--\r\n",
          "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, "no image part"),
    ]
    for kwargs, status, message in cases:
        r = _predict(served, **kwargs)
        assert r.status_code == status, (kwargs.get("model"), r.status_code, r.text)
        body = r.json()
        assert body["status"] == status and message in body["error"], body
        assert "\n" not in body["error"]
    assert _predict(served, data=good).status_code == 200  # still serving


def test_batch_request_answers_each_image_in_order_with_its_own_status(served):
    """A batch inspection request: many images in one request, one answer per image in order; a bad
    image gets its own status, the others their verdicts, scored as one image at a time would be."""
    good = [served["free"][i].read_bytes() for i in (25, 26, 27)]
    files = [("image", ("a.jpg", good[0], "image/jpeg")), ("image", ("junk.jpg", b"not an image", "image/jpeg")),
             ("image", ("b.jpg", good[1], "image/jpeg")), ("image", ("c.jpg", good[2], "image/jpeg"))]
    batch_url = f"{served['url']}/v1/models/tiles/predict/batch"
    r = requests.post(batch_url, files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["model_version"], body["images"], body["errors"]) == ("tiles", 1, 4, 1)
    assert [x["image"] for x in body["results"]] == ["a.jpg", "junk.jpg", "b.jpg", "c.jpg"]
    bad = body["results"][1]
    assert bad["status"] == 400 and bad["error"].startswith("junk.jpg: not an image") and "score" not in bad
    for x, data in zip([body["results"][i] for i in (0, 2, 3)], good):
        assert x["status"] == 200 and x["score"] == pytest.approx(_expected(served["v1"], data), rel=1e-4)
        assert x["is_defect"] == (x["score"] >= x["threshold"]) and "heatmap_png" not in x
        assert x["batch_size"] == 3  # the three good images in one forward pass

    maps = requests.post(batch_url + "?heatmap=true&regions=true", files=files[:1], timeout=60)
    assert maps.status_code == 200, maps.text
    assert {"heatmap_png", "regions", "map_size"} <= set(maps.json()["results"][0])

    served["store"].put_bytes("incoming/batch-a.jpg", good[0])
    uris = [served["store"].uri("incoming/batch-a.jpg"), served["store"].uri("incoming/missing.jpg"),
            "s3://elsewhere/key.jpg", "http://example.com/part.jpg"]
    by_key = requests.post(batch_url, json={"uris": uris}, timeout=60)
    assert by_key.status_code == 200, by_key.text
    results = by_key.json()["results"]
    assert [x["status"] for x in results] == [200, 404, 400, 400] and [x["image"] for x in results] == uris
    assert results[0]["score"] == pytest.approx(body["results"][0]["score"], rel=1e-6)
    assert "does not exist" in results[1]["error"] and "this server reads images from s3://t-" in results[2]["error"]
    assert results[3]["error"] == "http://example.com/part.jpg: not an s3:// URI"

    # bad as a whole: one answer for the request
    too_many = [("image", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(65)]
    cases = [
        ({"data": good[0], "headers": {"Content-Type": "image/jpeg"}}, 415, "a batch request is multipart"),
        ({"files": {"note": (None, "hi")}}, 400, "carries no image"),
        ({"files": too_many}, 413, "65 images, more than the limit of 64"),
        ({"json": {"uris": "s3://x"}}, 400, '{"uris": ['),
        ({"json": {"uris": ["s3://x/y.jpg", 5]}}, 400, '"uris" entry 1 is int, not a string'),
        ({"files": files, "model": "nope"}, 404, "no model 'nope'"),
        ({"files": files, "query": "?mask=perhaps"}, 400, "mask"),
    ]
    for kwargs, status, message in cases:
        model, query = kwargs.pop("model", "tiles"), kwargs.pop("query", "")
        r = requests.post(f"{served['url']}/v1/models/{model}/predict/batch{query}", timeout=60, **kwargs)
        assert r.status_code == status, (message, r.status_code, r.text)
        assert r.json()["status"] == status and message in r.json()["error"], r.json()
    assert requests.post(batch_url, files=files[:1], timeout=60).status_code == 200  # still serving


def test_a_broken_artifact_answers_503_for_that_model_only(served):
    good = served["free"][23].read_bytes()
    for _ in range(2):  # the second answer comes from the remembered failure
        r = _predict(served, model="broken", data=good)
        assert r.status_code == 503, r.text
        assert "broken:1 cannot be loaded" in r.json()["error"] and "not a flawline model file" in r.json()["error"]
    assert _predict(served, data=good).status_code == 200


def test_flawline_predict_over_http_and_local_writes_overlays(served, tmp_path):
    images = [served["free"][24], served["blowholes"][1]]
    time.sleep(1.5)  # past the server's resolve_ttl_s (1 s): it reads the threshold an earlier test set, as --local does
    http = _cli("predict", *images, "--model", "tiles", "--out", tmp_path / "http", "--json", "--maps")
    assert http.exit_code == 0, http.output
    remote = json.loads(http.stdout)
    local = _cli("predict", *images, "--model", "tiles", "--out", tmp_path / "local", "--json", "--local", "--maps")
    assert local.exit_code == 0, local.output
    here = json.loads(local.stdout)
    assert [a["batch_size"] for a in remote] == [2, 2]  # several files: one batch request, one forward pass
    for a, b, path in zip(remote, here, images):
        assert a["model_version"] == b["model_version"] == 1
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
        for folder in ("http", "local"):
            overlay = Image.open(tmp_path / folder / f"{path.stem}.overlay.png")
            assert overlay.size == Image.open(path).size and overlay.mode == "RGB"
        # --maps: the heatmap and mask PNGs the server answered, at the model's input size, the same both ways
        maps = {(folder, kind): np.asarray(Image.open(tmp_path / folder / f"{path.stem}.{kind}.png"), dtype=int)
                for folder in ("http", "local") for kind in ("heatmap", "mask")}
        assert all(m.shape == (SIZE, SIZE) for m in maps.values())
        assert np.abs(maps["http", "heatmap"] - maps["local", "heatmap"]).max() <= 1
        assert set(np.unique(maps["http", "mask"])) <= {0, 255}
        assert a["heatmap"] == str(tmp_path / "http" / f"{path.stem}.heatmap.png")
    assert not maps["http", "mask"].any() or remote[1]["is_defect"]  # no defect pixel without a defect verdict
    no_out = _cli("predict", images[0], "--model", "tiles", "--maps")
    assert no_out.exit_code != 0
    assert "--maps writes the heatmap and mask PNGs into a folder: give --out DIR" in no_out.output

    text = _cli("predict", images[0], "--model", "tiles")
    assert text.exit_code == 0 and "tiles:1" in text.stdout and "score" in text.stdout
    single = json.loads(_cli("predict", *images, "--model", "tiles", "--batch", 1, "--json").stdout)
    assert [a["score"] for a in single] == pytest.approx([a["score"] for a in remote], rel=1e-5)
    many = _cli("predict", *images, "--model", "nope")  # a batch for a model that is not there: one line
    assert many.exit_code == 1 and "no model 'nope'" in many.output and len(many.output.strip().splitlines()) == 1

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg")
    for extra in ([], ["--local"]):
        mixed = _cli("predict", junk, images[0], "--model", "tiles", *extra)
        assert mixed.exit_code == 1
        assert f"error: {junk}: " in mixed.output and "not an image" in mixed.output
        assert f"{junk.name}: {junk.name}" not in mixed.output  # the file named once
        assert str(images[0]) in mixed.stdout  # the good image is still scored
        unknown = _cli("predict", images[0], "--model", "nope", *extra)
        assert unknown.exit_code == 1 and "no model 'nope'" in unknown.output
        assert len(unknown.output.strip().splitlines()) == 1
    missing = _cli("predict", tmp_path / "absent.png", "--model", "tiles")
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "no such file" in missing.output
    for extra in ([], ["--batch", 1]):  # a missing file among good ones: they are still scored, in order
        gap = _cli("predict", images[0], tmp_path / "absent.png", images[1], "--model", "tiles", "--json", *extra)
        assert gap.exit_code == 1
        answers = json.loads(gap.stdout)
        assert [a["image"] for a in answers] == [str(images[0]), str(tmp_path / "absent.png"), str(images[1])]
        assert answers[1] == {"image": str(tmp_path / "absent.png"), "error": "no such file"}
        assert [a["score"] for a in (answers[0], answers[2])] == pytest.approx([a["score"] for a in remote], rel=1e-4)
    text_many = _cli("predict", *images, "--model", "tiles")
    assert text_many.stdout.count("for its request of 2 images") == 2
    dead, = free_ports(1)
    down = _cli("predict", images[0], "--model", "tiles", "--url", f"http://127.0.0.1:{dead}")
    assert down.exit_code == 1 and "no flawline server answers" in down.output
    assert len(down.output.strip().splitlines()) == 1


def test_grpc_answers_as_http_does_with_status_codes_for_errors(served):
    """The gRPC API (serve/flawline.proto) through Serve's gRPC proxy: the same verdicts, maps and
    regions as HTTP for the same image, a batch answered per image with each image's own status
    code, and errors as gRPC status codes with one-line details."""
    from flawline.serving.grpc_client import InspectionClient, InspectionError

    image = served["free"][20].read_bytes()
    blowhole = served["blowholes"][0].read_bytes()
    with InspectionClient(served["grpc"]) as client:
        http = _predict(served, data=image).json()
        verdict = client.predict("tiles", image, name="tile.jpg")
        assert verdict["model"] == "tiles" and verdict["model_version"] == http["model_version"] == 1
        assert verdict["score"] == pytest.approx(http["score"], rel=1e-6)
        assert verdict["score"] == pytest.approx(_expected(served["v1"], image), rel=1e-4)
        same = {"is_defect", "threshold", "threshold_method", "defect_class", "model", "model_version"}
        assert {k: verdict[k] for k in same} == {k: http[k] for k in same}
        assert set(verdict) == set(http) and verdict["latency_ms"] >= verdict["inference_ms"] > 0
        # maps and regions: the same post-processing, so the same PNGs and polygons
        maps = client.predict("tiles-regions", blowhole, heatmap=True, mask=True, regions=True)
        http_maps = _predict(served, model="tiles-regions", data=blowhole,
                             query="?heatmap=true&mask=true&regions=true").json()
        for key in ("heatmap_png", "mask_png", "regions", "heatmap_scale", "map_size", "image_size", "is_defect"):
            assert maps[key] == http_maps[key], key
        assert maps["regions"]
        served["store"].put_bytes("incoming/grpc.jpg", image)
        by_key = client.predict("tiles", uri=served["store"].uri("incoming/grpc.jpg"))
        assert by_key["score"] == pytest.approx(http["score"], rel=1e-6)
        assert client.predict("tiles:2", image)["model_version"] == 2

        refused = [(("tiles", b"not an image"), {"name": "junk.jpg"}, "INVALID_ARGUMENT", "junk.jpg: not an image"),
                   (("tiles", b""), {}, "INVALID_ARGUMENT", "empty body"),
                   (("tiles", _huge_png(9_000, 9_000)), {}, "INVALID_ARGUMENT", "exceeds the limit"),
                   (("nope", image), {}, "NOT_FOUND", "no model 'nope'"),
                   (("tiles:x", image), {}, "INVALID_ARGUMENT", "version must be a number"),
                   (("tiles",), {"uri": served["store"].uri("incoming/missing.jpg")}, "NOT_FOUND", "does not exist"),
                   (("tiles",), {"uri": "s3://elsewhere/k.jpg"}, "INVALID_ARGUMENT", "this server reads images from"),
                   (("broken", image), {}, "UNAVAILABLE", "broken:1 cannot be loaded")]
        for args, kwargs, code, message in refused:
            with pytest.raises(InspectionError) as err:
                client.predict(*args, **kwargs)
            assert err.value.code == code and message in str(err.value), (code, str(err.value))
            assert "\n" not in str(err.value) and "Traceback" not in str(err.value)

        good = [served["free"][i].read_bytes() for i in (25, 26)]
        batch = client.predict_many("tiles", [("a.jpg", good[0]), ("junk.jpg", b"not an image"), ("b.jpg", good[1]),
                                              served["store"].uri("incoming/missing.jpg")])
        assert (batch["model"], batch["model_version"], batch["images"], batch["errors"]) == ("tiles", 1, 4, 2)
        results = batch["results"]
        assert [r["image"] for r in results][:3] == ["a.jpg", "junk.jpg", "b.jpg"]
        assert [r["code"] for r in results] == ["OK", "INVALID_ARGUMENT", "OK", "NOT_FOUND"]
        assert results[1]["error"].startswith("junk.jpg: not an image") and "score" not in results[1]
        for r, data in zip((results[0], results[2]), good):
            assert r["score"] == pytest.approx(_expected(served["v1"], data), rel=1e-4) and r["batch_size"] == 2
        for model, code in (("nope", "NOT_FOUND"), ("tiles", "INVALID_ARGUMENT")):  # bad as a whole
            with pytest.raises(InspectionError) as err:
                client.predict_many(model, [] if model == "tiles" else [("a.jpg", good[0])])
            assert err.value.code == code
        assert "carries no image" in str(err.value)
        assert client.predict("tiles", image)["score"] == pytest.approx(http["score"], rel=1e-6)  # still serving


def test_flawline_predict_over_grpc(served, tmp_path):
    images = [served["free"][24], served["blowholes"][1]]
    http = json.loads(_cli("predict", *images, "--model", "tiles", "--json").stdout)
    answer = _cli("predict", *images, "--model", "tiles", "--grpc", "--json", "--out", tmp_path)
    assert answer.exit_code == 0, answer.output
    remote = json.loads(answer.stdout)
    assert [a["batch_size"] for a in remote] == [2, 2]  # one PredictMany, one forward pass
    assert [a["score"] for a in remote] == pytest.approx([a["score"] for a in http], rel=1e-5)
    for path in images:
        assert Image.open(tmp_path / f"{path.stem}.overlay.png").size == Image.open(path).size
    text = _cli("predict", images[0], "--model", "tiles", "--grpc")
    assert text.exit_code == 0 and "tiles:1" in text.stdout and "score" in text.stdout
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg")
    mixed = _cli("predict", junk, images[0], "--model", "tiles", "--grpc")
    assert mixed.exit_code == 1 and f"error: {junk}: not an image" in mixed.output and "(INVALID_ARGUMENT)" in mixed.output
    assert str(images[0]) in mixed.stdout
    unknown = _cli("predict", images[0], "--model", "nope", "--grpc")
    assert unknown.exit_code == 1 and "no model 'nope'" in unknown.output and "(NOT_FOUND)" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1
    dead, = free_ports(1)
    down = _cli("predict", images[0], "--model", "tiles", "--grpc", "--url", f"127.0.0.1:{dead}", "--timeout", 2)
    assert down.exit_code == 1 and "no flawline gRPC server answers" in down.output
    assert len(down.output.strip().splitlines()) == 1


def _pair_score(det, image: bytes, reference: bytes) -> float:
    """What the detector itself scores the decoded pair (the training and evaluation decode)."""
    from flawline.data.loading import decode_image, pair

    return float(det.predict(pair(decode_image(image, SIZE), decode_image(reference, SIZE))[None]).scores[0])


def test_a_reference_model_compares_each_image_with_the_requests_reference(served):
    """A model of the `reference` detector: a request names the product's golden image in the store
    (HTTP ?reference=, gRPC reference_uri) and each image is scored as the detector scores it paired
    with that reference. A missing, unwanted, absent or bad reference is one line; a batch's bad
    reference fails the batch (it is every image's), a bad image only itself."""
    from urllib.parse import urlencode

    from flawline.serving.grpc_client import InspectionClient, InspectionError

    pcb, store = served["pcb"], served["store"]
    golden, junk, missing = (store.uri(f"references/{n}.png") for n in ("board", "junk", "missing"))
    expected = [_pair_score(pcb["det"], shot, pcb["golden"]) for shot in pcb["shots"]]
    png = {"Content-Type": "image/png"}
    one = _predict(served, "pcb-ref", pcb["shots"][0], "?" + urlencode({"reference": golden, "heatmap": "true"}),
                   headers=png)
    assert one.status_code == 200, one.text
    assert one.json()["score"] == pytest.approx(expected[0], rel=1e-4) and one.json()["map_size"] == [SIZE, SIZE]
    assert one.json()["is_defect"] == (one.json()["score"] >= one.json()["threshold"])

    batch_url = f"{served['url']}/v1/models/pcb-ref/predict/batch"
    files = [("image", ("a.png", pcb["shots"][0])), ("image", ("junk.png", b"not an image")),
             ("image", ("b.png", pcb["shots"][1])), ("image", ("c.png", pcb["shots"][2]))]
    many = requests.post(batch_url, params={"reference": golden}, files=files, timeout=60)
    assert many.status_code == 200, many.text
    results = many.json()["results"]
    assert [r["status"] for r in results] == [200, 400, 200, 200] and results[1]["error"].startswith("junk.png: ")
    assert [results[i]["score"] for i in (0, 2, 3)] == pytest.approx(expected, rel=1e-4)
    assert results[0]["batch_size"] == 3

    needs = ("pcb-ref compares each image with its defect-free reference: pass ?reference=s3://... "
             "(gRPC: reference_uri; flawline predict --reference)")
    refused = [("pcb-ref", None, 400, needs),
               ("tiles", golden, 400, "tiles does not use a reference image (padim scores each image alone)"),
               ("pcb-ref", junk, 400, f"reference {junk}: not an image"),
               ("pcb-ref", missing, 404, f"reference {missing} does not exist"),
               ("pcb-ref", "s3://elsewhere/board.png", 400,
                "reference s3://elsewhere/board.png: this server reads images from s3://t-"),
               ("pcb-ref", "http://example.com/board.png", 400, "not an s3:// URI")]
    for model, reference, status, message in refused:
        params = {"reference": reference} if reference else {}
        for url, kwargs in ((f"{served['url']}/v1/models/{model}/predict", {"data": pcb["shots"][0], "headers": png}),
                            (f"{served['url']}/v1/models/{model}/predict/batch", {"files": files})):
            r = requests.post(url, params=params, timeout=60, **kwargs)  # a batch fails as a whole
            assert r.status_code == status, (url, reference, r.text)
            assert message in r.json()["error"] and "\n" not in r.json()["error"], r.json()

    with InspectionClient(served["grpc"]) as client:
        verdict = client.predict("pcb-ref", pcb["shots"][1], name="b.png", reference_uri=golden)
        assert verdict["score"] == pytest.approx(expected[1], rel=1e-4)
        answer = client.predict_many("pcb-ref", [("a.png", pcb["shots"][0]), ("junk.png", b"junk"),
                                                 ("c.png", pcb["shots"][2])], reference_uri=golden)
        assert [r["code"] for r in answer["results"]] == ["OK", "INVALID_ARGUMENT", "OK"]
        assert [answer["results"][i]["score"] for i in (0, 2)] == pytest.approx(expected[::2], rel=1e-4)
        shot = pcb["shots"][0]
        for call, code, message in (
                (lambda: client.predict("pcb-ref", shot), "INVALID_ARGUMENT", needs),
                (lambda: client.predict("tiles", shot, reference_uri=golden), "INVALID_ARGUMENT",
                 "tiles does not use a reference image"),
                (lambda: client.predict_many("pcb-ref", [("a.png", shot)], reference_uri=missing), "NOT_FOUND",
                 f"reference {missing} does not exist"),
                (lambda: client.predict_many("pcb-ref", [("a.png", shot)], reference_uri=junk), "INVALID_ARGUMENT",
                 f"reference {junk}: not an image")):
            with pytest.raises(InspectionError) as err:
                call()
            assert err.value.code == code and message in str(err.value), str(err.value)


def test_flawline_predict_with_a_reference(served, tmp_path):
    """`flawline predict --reference`: over HTTP and gRPC an s3:// URI, with --local also a file."""
    pcb = served["pcb"]
    golden = served["store"].uri("references/board.png")
    shots = []
    for i, data in enumerate(pcb["shots"][:2]):
        shots.append(tmp_path / f"shot{i}.png")
        shots[-1].write_bytes(data)
    (tmp_path / "golden.png").write_bytes(pcb["golden"])
    expected = [_pair_score(pcb["det"], data, pcb["golden"]) for data in pcb["shots"][:2]]
    for extra in ([], ["--grpc"], ["--local"]):
        reference = str(tmp_path / "golden.png") if extra == ["--local"] else golden
        answer = _cli("predict", *shots, "--model", "pcb-ref", "--reference", reference, "--json", *extra)
        assert answer.exit_code == 0, (extra, answer.output)
        assert [a["score"] for a in json.loads(answer.stdout)] == pytest.approx(expected, rel=1e-4)
    alone = _cli("predict", shots[0], "--model", "pcb-ref")
    assert alone.exit_code == 1 and "pcb-ref compares each image with its defect-free reference" in alone.output
    local_file = _cli("predict", shots[0], "--model", "pcb-ref", "--reference", tmp_path / "golden.png")
    assert local_file.exit_code == 1 and "give an s3://<bucket>/<key> URI (a local file works with --local)" \
        in local_file.output
    absent = _cli("predict", shots[0], "--model", "pcb-ref", "--local", "--reference", tmp_path / "absent.png")
    assert absent.exit_code == 1 and f"--reference {tmp_path / 'absent.png'}: no such file" in absent.output


def test_metrics_and_status(served):
    import ray

    for _ in range(3):
        assert _predict(served, data=served["free"][25].read_bytes()).status_code == 200
    status = _cli("serve", "status", "--json")
    assert status.exit_code == 0, status.output
    info = json.loads(status.stdout)
    assert info["address"] == served["url"] and info["grpc_port"] == served["grpc_port"]
    assert {d["deployment"] for d in info["deployments"]} == {"Gateway", "ModelServer"}
    assert all(d["status"] == "HEALTHY" and d["replicas_running"] >= 1 for d in info["deployments"])

    ray.init(address=served["cluster"].address, logging_level="ERROR", log_to_driver=False)
    try:
        ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    wanted = ("flawline_predictions", "flawline_predict_latency_ms", "flawline_score")
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10).read().decode()
                       for p in ports)
        if all(name in text for name in wanted) and 'model="tiles"' in text:
            break
        time.sleep(1)
    for name in wanted:
        assert name in text, f"{name} not exported"
    counts = [line for line in text.splitlines() if line.startswith("ray_flawline_predictions") and 'model="tiles"' in line]
    assert counts and sum(float(line.rsplit(" ", 1)[1]) for line in counts) >= 3


def test_the_single_deployment_layout_keeps_every_guarantee(served, tmp_path):
    """serve/config-single.yaml deployed in place of the split layout (same address): one
    deployment, Inspector, takes HTTP and holds the models; what the tests above prove holds again."""
    result = _cli("serve", "up", "--config", REPO / "serve" / "config-single.yaml", "--timeout", 240)
    assert result.exit_code == 0, result.output
    info = json.loads(_cli("serve", "status", "--json").stdout)
    assert {d["deployment"] for d in info["deployments"]} == {"Inspector"}
    assert all(d["status"] == "HEALTHY" for d in info["deployments"])
    _warm_up(served["url"], served["free"][0].read_bytes(), ["tiles", "tiles:2", "tiles-regions"])  # a new replica
    test_predict_raw_multipart_and_s3_key(served)
    test_heatmap_mask_and_region_polygons_on_request(served)
    health = requests.get(f"{served['url']}/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "catalog": "ok", "model_server": "ok"}
    models = {m["name"]: m for m in requests.get(f"{served['url']}/v1/models", timeout=30).json()["models"]}
    assert set(models) == {"tiles", "tiles-regions", "broken", "pcb-ref"} and models["tiles"]["serving"] == 1
    test_promotion_and_rollback_switch_predictions_without_redeploy(served)
    test_bad_input_gets_4xx_and_the_server_keeps_serving(served)
    test_batch_request_answers_each_image_in_order_with_its_own_status(served)
    test_a_broken_artifact_answers_503_for_that_model_only(served)
    test_grpc_answers_as_http_does_with_status_codes_for_errors(served)  # Inspector's gRPC methods
    test_a_reference_model_compares_each_image_with_the_requests_reference(served)
    # requests for two models at once share the replica's batches: each model's run with its own
    with ThreadPoolExecutor(8) as pool:
        image = served["free"][28].read_bytes()
        answers = list(pool.map(lambda m: _predict(served, model=m, data=image), ["tiles:1", "tiles:2"] * 8))
    assert [a.status_code for a in answers] == [200] * 16
    scores = {a.json()["model_version"]: a.json()["score"] for a in answers}
    assert scores[1] == pytest.approx(_expected(served["v1"], image), rel=1e-4)
    assert scores[2] == pytest.approx(_expected(served["v2"], image), rel=1e-4)


def test_bad_serve_config_is_one_line_and_down_stops_serving(served, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: 42\n")
    result = _cli("serve", "up", "--config", bad)
    assert result.exit_code == 1 and result.output.startswith(f"error: {bad}: ")
    assert len(result.output.strip().splitlines()) == 1
    missing = _cli("serve", "up", "--config", tmp_path / "absent.yaml")
    assert missing.exit_code == 1 and "no such Serve config file" in missing.output
    moved = _cli("serve", "up", "--port", free_ports(1)[0])
    assert moved.exit_code == 1 and "Serve already runs on this cluster" in moved.output
    regrpc = _cli("serve", "up", "--grpc-port", free_ports(1)[0])
    assert regrpc.exit_code == 1 and f"Serve already runs on this cluster with gRPC on port {served['grpc_port']}" \
        in regrpc.output

    down = _cli("serve", "down")
    assert down.exit_code == 0 and "shut down" in down.output
    assert _cli("serve", "status").exit_code == 1
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{served['url']}/healthz", timeout=5)


# -- the plain-Python parts, without Ray ---------------------------------------------------------------
def test_region_polygons_outline_known_shapes():
    from flawline.serving.response import build_response, defect_mask, regions

    amap = np.zeros((32, 32), dtype=np.float32)
    amap[4:12, 8:24] = 5.0  # a 16 x 8 rectangle
    yy, xx = np.mgrid[:32, :32]
    amap[(yy - 24) ** 2 + (xx - 10) ** 2 <= 16] = 9.0  # a disc of radius 4, the higher peak
    amap[30, 30] = 5.0  # a single pixel
    mask = defect_mask(amap, {"value": 1.0, "method": "quantile"})
    found = regions(amap, mask, (64, 128))  # the image is 2x wider and 4x taller than the map
    assert [r["peak_score"] for r in found] == [9.0, 5.0, 5.0]
    disc, rect = found[0], next(r for r in found[1:] if r["area_px"] > 8)
    assert rect["bbox"] == [16.0, 16.0, 48.0, 48.0] and rect["area_px"] == 16 * 8 * 8
    xs, ys = np.array(rect["polygon"]).T
    assert xs.min() == pytest.approx(16.0) and xs.max() == pytest.approx(48.0)  # pixel edges, scaled
    assert ys.min() == pytest.approx(16.0) and ys.max() == pytest.approx(48.0)
    assert len(rect["polygon"]) <= 8  # straight edges simplified away
    dx, dy = np.array(disc["polygon"]).T
    assert len(disc["polygon"]) >= 6 and (dx.min(), dx.max()) == pytest.approx((12.0, 30.0), abs=2)
    # max-area thresholds drop the regions smaller than the area they tolerate
    tolerant = defect_mask(amap, {"value": 1.0, "method": "max-area", "params": {"max_area": 4}})
    assert len(regions(amap, tolerant, (32, 32))) == 2

    from flawline.serving.models import ModelRef
    from flawline.serving.pipeline import Outcome

    ref = ModelRef("m", 1, "production", "padim", "s3://b/k", None)
    body = build_response(Outcome(score=9.0, is_defect=None, map=amap), ref, (64, 128), 1.0, heatmap=True,
                          mask=True, with_regions=True)
    assert body["is_defect"] is None and body["threshold"] is None and body["regions"] == []
    assert Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))).size == (32, 32)


def test_model_cache_keeps_the_most_recent_and_remembers_failures(settings_env, store, catalog):
    from flawline.errors import NotFound
    from flawline.models.artifacts import detector_to_bytes
    from flawline.serving.errors import ModelUnavailable
    from flawline.serving.models import ModelCache, ModelResolver, load_model

    normals = [p.read_bytes() for p in sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))[:4]]
    store.put_bytes("models/a.pt", detector_to_bytes(_fit(normals, seed=0)))
    store.put_bytes("models/bad.pt", b"\x00" * 16)
    with catalog.session() as s:
        for name in ("a", "b", "c"):
            register_version(s, name=name, artifact_uri=store.uri("models/a.pt"), method="padim", backbone=None,
                             threshold=None, metrics=None)
        register_version(s, name="bad", artifact_uri=store.uri("models/bad.pt"), method="padim", backbone=None,
                         threshold=None, metrics=None)
    loads = []

    def loader(model_id):
        loads.append(model_id)
        return load_model(catalog, store, model_id, device="cpu", warm_up=False)

    cache = ModelCache(loader, max_models=2)
    for model_id in ("a:1", "b:1", "a:1", "c:1"):
        cache.get(model_id)
    assert cache.loaded() == ["a:1", "c:1"] and loads == ["a:1", "b:1", "c:1"]  # b was least recently used
    with pytest.raises(ModelUnavailable, match="bad:1 cannot be loaded") as first:
        cache.get("bad:1")
    with pytest.raises(ModelUnavailable) as second:
        cache.get("bad:1")
    assert second.value is first.value and loads.count("bad:1") == 1  # remembered, not fetched again
    with pytest.raises(NotFound, match="no model 'zzz:1'"):
        cache.get("zzz:1")

    clock = [0.0]
    resolver = ModelResolver(catalog, ttl_s=1.0, clock=lambda: clock[0])
    assert resolver.resolve("a").model_id == "a:1"
    with catalog.session() as s:
        register_version(s, name="a", artifact_uri=store.uri("models/a.pt"), method="padim", backbone=None,
                         threshold=None, metrics=None)
    assert resolver.resolve("a").model_id == "a:1"  # cached
    clock[0] = 1.5
    assert resolver.resolve("a").model_id == "a:2"  # the newest: none is in production
    with catalog.session() as s:
        promote(s, "a:1")
    clock[0] = 3.0
    assert resolver.resolve("a").model_id == "a:1"  # production wins over newer candidates


def test_grpc_modules_match_the_proto_and_carry_the_json_answers():
    """The committed flawline_pb2*.py are what serve/flawline.proto generates now (with the pinned
    grpcio-tools), and a verdict survives the trip JSON answer → gRPC reply → JSON answer."""
    from flawline.serving.grpc_api import convert, generate
    from flawline.serving.models import ModelRef
    from flawline.serving.pipeline import Outcome
    from flawline.serving.response import build_response

    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) compares the generated modules")
    from importlib.metadata import version

    header = (generate.HERE / "flawline_pb2.py").read_text().splitlines()[0]
    if f"grpcio-tools {version('grpcio-tools')};" not in header:
        pytest.skip(f"grpcio-tools {version('grpcio-tools')} here; the modules were generated by {header}")
    assert generate.stale() == [], "run python -m flawline.serving.grpc_api.generate"

    amap = np.zeros((32, 32), dtype=np.float32)
    amap[4:12, 8:24] = 5.0
    ref = ModelRef("m", 3, "production", "padim", "s3://b/k", None)
    th_ = {"value": 1.0, "method": "quantile"}
    for outcome, flags in ((Outcome(score=9.0, is_defect=True, threshold=th_, map=amap, inference_ms=3.5), {}),
                           (Outcome(score=9.0, is_defect=True, threshold=th_, map=amap, defect_class="crack"),
                            {"heatmap": True, "mask": True, "with_regions": True}),
                           (Outcome(score=0.5, is_defect=None, map=amap), {"with_regions": True})):
        body = build_response(outcome, ref, (64, 128), 12.5, **flags)
        back = convert.response_from_reply(convert.reply_from_response(body), regions=flags.get("with_regions", False))
        assert back == body and list(back) == list(body)
    many = {"model": "m", "model_version": 3, "images": 2, "errors": 1, "latency_ms": 4.0,
            "results": [{"image": "a", "status": 200, **body}, {"image": "b", "status": 413, "error": "b: too big"}]}
    back = convert.response_from_many_reply(convert.many_reply_from_response(many), regions=True)
    assert back["results"] == [{"image": "a", "code": "OK", **body},
                               {"image": "b", "code": "INVALID_ARGUMENT", "error": "b: too big"}]


def test_decoding_and_the_forward_pass_are_separate_stages_on_separate_threads():
    """The model server decodes on worker threads (uint8 pixels, no torch) and runs the model on its
    torch thread: the two stages called apart give exactly what ``predict_items`` gives, an image
    that does not decode keeps its own 400 outcome, and the decode path is the training one."""
    import threading

    from flawline.data.loading import decode_image, decode_pixels, stack_rgb, to_tensor
    from flawline.serving.models import LoadedModel, ModelRef
    from flawline.serving.pipeline import Item, decode_items, forward_items, predict_items

    files = sorted((MAGNETIC_TILE / "MT_Free" / "Imgs").glob("*.jpg"))
    normals = [p.read_bytes() for p in files[:4]]
    det = _fit(normals, seed=0)
    model = LoadedModel(ModelRef("m", 1, "production", "padim", "s3://b/m.pt", None), det, 0.0)
    tested = [p.read_bytes() for p in files[4:7]]
    items = [Item(tested[0], "a.jpg"), Item(b"junk", "junk.png"), Item(tested[1], "b.jpg", want_map=True),
             Item(tested[2], "c.jpg")]

    seen = {}

    def decode() -> object:
        seen["thread"] = threading.current_thread().name
        return decode_items(model, items)

    with ThreadPoolExecutor(1, thread_name_prefix="decoder") as pool:
        decoded = pool.submit(decode).result()
    assert seen["thread"].startswith("decoder") and decoded.index == [0, 2, 3]
    assert all(p.dtype == np.uint8 and p.shape == (SIZE, SIZE) and r is None for p, r in decoded.pixels)
    junk = decoded.failed[1]
    assert junk.status == 400 and junk.error.startswith("junk.png: cannot decode image")

    staged, together = forward_items(model, items, decoded), predict_items(model, items)
    expected = det.predict(stack_rgb([decode_image(b, SIZE) for b in tested])).scores
    assert [o.score for o in staged] == [o.score for o in together]
    scores = [o.score for o in staged if o.score is not None]
    assert scores == pytest.approx([float(s) for s in expected], rel=1e-5)
    assert staged[1].status == 400 and staged[1].score is None
    assert staged[2].map is not None and staged[2].map.shape == (SIZE, SIZE) and staged[0].map is None
    assert all(o.batch_size == 4 and o.inference_ms > 0 for o in staged)
    assert torch_equal(decode_image(tested[0], SIZE), to_tensor(decode_pixels(tested[0], SIZE)))


def torch_equal(a, b) -> bool:  # noqa: ANN001 — torch tensors (torch imported lazily)
    return a.shape == b.shape and bool((a == b).all())


def test_the_predict_routes_declare_their_query_parameters_in_openapi():
    """``/docs`` shows what a predict request may ask (the flags and the reference) with their
    meaning, the bodies it takes and the errors it answers: the routes declare them."""
    from flawline.serving.deployments import _routes

    paths = _routes().openapi()["paths"]
    for route in ("/v1/models/{model}/predict", "/v1/models/{model}/predict/batch"):
        params = {p["name"]: p for p in paths[route]["post"]["parameters"]}
        assert set(params) == {"model", "heatmap", "mask", "regions", "reference"}
        assert params["model"]["in"] == "path" and "name:version" in params["model"]["description"]
        flags = [params[n] for n in ("heatmap", "mask", "regions")]
        assert all(p["in"] == "query" and not p["required"] for p in flags)
        assert "s3://" in params["reference"]["description"]
        assert "true or false" in params["mask"]["description"]
        operation = paths[route]["post"]
        assert {"multipart/form-data", "application/json"} <= set(operation["requestBody"]["content"])
        assert sorted(operation["responses"]) == ["200", "400", "404", "413", "415", "503"]  # never FastAPI's 422
    single = paths["/v1/models/{model}/predict"]["post"]["requestBody"]["content"]
    assert "image/*" in single and single["application/json"]["schema"]["required"] == ["uri"]


@pytest.mark.parametrize("config", ["config.yaml", "config-single.yaml"])
def test_serve_up_adds_its_settings_to_the_environment_a_config_sets(settings_env, config, tmp_path):
    """``flawline serve up`` adds the catalog and S3 settings and the app folder to the
    application's environment and keeps what the config sets itself (e.g. OMP_WAIT_POLICY, which
    the serve benchmark measures as a variant)."""
    import yaml

    from flawline.cli.serve import load_config

    shipped = yaml.safe_load((REPO / "serve" / config).read_text())
    assert shipped["applications"][0]["deployments"][-1]["user_config"]["decode_threads"] == 1
    shipped["applications"][0]["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    (tmp_path / config).write_text(yaml.safe_dump(shipped))
    app = load_config(tmp_path / config, get_settings(), REPO)["applications"][0]
    env = app["runtime_env"]["env_vars"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["FLAWLINE_CATALOG_URL"] == get_settings().catalog_url
    assert env["PYTHONPATH"].startswith(str(REPO.resolve()) + ":")
