"""Shared fixtures: a real SeaweedFS S3 server (one per test session), fresh buckets and catalogs
per test, a throw-away PostgreSQL database, and small image trees made on the fly."""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flawline.catalog import Catalog, upgrade
from flawline.catalog.db import make_engine
from flawline.config import Settings, get_settings, load_settings
from flawline.labelstudio.client import LabelStudioClient
from flawline.labelstudio.server import LocalLabelStudio
from flawline.storage import ObjectStore
from flawline.storage.local_s3 import LocalS3Server

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MAGNETIC_TILE = SHARED / "datasets" / "magnetic-tile"
PG_ADMIN_URL = os.environ.get("FLAWLINE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    server = LocalS3Server.on_free_ports(tmp_path_factory.mktemp("s3"))
    server.start(timeout=90)
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: LocalS3Server) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    _drop_bucket(s3_server, name)


def _drop_bucket(s3_server: LocalS3Server, name: str) -> None:
    """Empty and delete a test's bucket: SeaweedFS gives every bucket a volume of its own, and its
    volume slots are bounded by free disk, so a long suite that kept its buckets runs out of them."""
    client = ObjectStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, name).client
    if not s3_server.is_running() or not client.bucket_exists(name):
        return
    from minio.deleteobjects import DeleteObject

    doomed = (DeleteObject(o.object_name) for o in client.list_objects(name, recursive=True))
    for failure in client.remove_objects(name, doomed):
        raise RuntimeError(f"could not empty test bucket {name}: {failure}")
    client.remove_bucket(name)


@pytest.fixture
def store(s3_server: LocalS3Server, bucket: str) -> ObjectStore:
    store = ObjectStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
    store.ensure_bucket()
    return store


@pytest.fixture
def catalog_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    upgrade(make_engine(url))
    return url


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    cat = Catalog(catalog_url)
    yield cat
    cat.dispose()


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_server: LocalS3Server, bucket: str,
                 catalog_url: str) -> Settings:
    """FLAWLINE_* variables pointing the CLI at the test's S3 bucket and catalog."""
    env = {
        "FLAWLINE_DATA_DIR": str(tmp_path / "data"),
        "FLAWLINE_CATALOG_URL": catalog_url,
        "FLAWLINE_S3_ENDPOINT": s3_server.endpoint,
        "FLAWLINE_S3_ACCESS_KEY": s3_server.access_key,
        "FLAWLINE_S3_SECRET_KEY": s3_server.secret_key,
        "FLAWLINE_S3_BUCKET": bucket,
        "FLAWLINE_UPLOAD_WORKERS": "4",
        "FLAWLINE_LABELSTUDIO_URL": "http://127.0.0.1:9",  # nothing listens on the discard port
        "FLAWLINE_RAY_DASHBOARD_URL": "http://127.0.0.1:9",
    }
    monkeypatch.delenv("FLAWLINE_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield load_settings()
    get_settings.cache_clear()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"flawline_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # in CI this must run: fail loudly rather than skip
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not usable: {err}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# -- image makers -------------------------------------------------------------------------------
SIZE = 64  # crack tiles are SIZE x SIZE gray


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def smooth_textures(n: int, seed: int, size: int = SIZE):  # -> torch.Tensor (torch imported lazily)
    """[n, 1, size, size] smooth gray textures in [0.35, 0.65] (noise at a quarter of the side,
    bilinearly enlarged): the 'normal' parts of the in-memory detector tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return 0.35 + 0.3 * torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _texture(rng: np.random.Generator) -> np.ndarray:
    small = rng.uniform(90, 160, (8, 8))
    return np.kron(small, np.ones((8, 8))).astype(np.uint8)  # 64 x 64 gray tiles


def crack_tiles(root: Path, normal: int, defect: int, unlabelled: int, seed: int = 0) -> Path:
    """normal/, defect/crack/ (a dark bar, with its mask), unlabeled/ (every other one cracked)."""
    rng = np.random.default_rng(seed)

    def cracked() -> tuple[np.ndarray, np.ndarray]:
        img, mask = _texture(rng), np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(8, 40, 2)
        img[y:y + 16, x:x + 5] = 15
        mask[y:y + 16, x:x + 5] = 255
        return img, mask

    for i in range(normal):
        (root / "normal").mkdir(parents=True, exist_ok=True)
        (root / "normal" / f"n{i}.png").write_bytes(png_bytes(_texture(rng)))
    for i in range(defect):
        img, mask = cracked()
        for sub, data in (("defect/crack", img), ("masks/defect/crack", mask)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"d{i}.png").write_bytes(png_bytes(data))
    for i in range(unlabelled):
        (root / "unlabeled").mkdir(parents=True, exist_ok=True)
        (root / "unlabeled" / f"u{i}.png").write_bytes(png_bytes(cracked()[0] if i % 2 else _texture(rng)))
    return root


def image_bytes(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A small image whose bytes differ per seed."""
    img = Image.new(mode, size, color=(seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)[: len(mode)]
                    if mode != "L" else seed * 37 % 256)
    img.putpixel((seed % size[0], (seed // size[0]) % size[1]), (255,) * len(mode) if mode != "L" else 255)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def mask_bytes(size: tuple[int, int] = (64, 48), box: tuple[int, int, int, int] | None = (4, 4, 12, 12)) -> bytes:
    img = Image.new("L", size, 0)
    if box:
        img.paste(255, box)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    """normal/ (3), defect/scratch (2, with masks), defect/dent (1), unlabeled/ (2)."""
    root = tmp_path / "folder-src"
    for i in range(3):
        write(root / "normal" / f"n{i}.png", image_bytes(i))
    for i in range(2):
        write(root / "defect" / "scratch" / f"s{i}.png", image_bytes(10 + i))
        write(root / "masks" / "defect" / "scratch" / f"s{i}.png", mask_bytes())
    write(root / "defect" / "dent" / "d0.jpg", image_bytes(20, fmt="JPEG"))
    for i in range(2):
        write(root / "unlabeled" / f"u{i}.png", image_bytes(30 + i))
    return root


@pytest.fixture
def mvtec_tree(tmp_path: Path) -> Path:
    """A miniature MVTec AD category 'widget'."""
    root = tmp_path / "mvtec" / "widget"
    for i in range(3):
        write(root / "train" / "good" / f"{i:03d}.png", image_bytes(100 + i))
    write(root / "test" / "good" / "000.png", image_bytes(110))
    for i in range(2):
        write(root / "test" / "crack" / f"{i:03d}.png", image_bytes(120 + i))
        write(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask_bytes())
    write(root / "license.txt", b"not part of the layout")
    return root.parent


@pytest.fixture
def magnetic_tile_slice(tmp_path: Path) -> Path:
    """Real Magnetic Tile images: 3 defect-free, 2 blowholes, 2 cracks, with their masks."""
    root = tmp_path / "mt"
    picks = {"MT_Free": 3, "MT_Blowhole": 2, "MT_Crack": 2}
    for folder, n in picks.items():
        images = sorted((MAGNETIC_TILE / folder / "Imgs").glob("*.jpg"))[:n]
        assert images, f"Magnetic Tile set missing at {MAGNETIC_TILE}"
        for jpg in images:
            for src in (jpg, jpg.with_suffix(".png")):
                write(root / folder / "Imgs" / src.name, src.read_bytes())
    return root


@pytest.fixture
def elpv_slice(tmp_path: Path) -> Path:
    """The first 6 rows of the elpv-dataset package's labels.csv and their images."""
    from flawline.data.importers.elpv import packaged_elpv_dir

    src = packaged_elpv_dir()
    lines = (src / "labels.csv").read_text().splitlines()[:6]
    root = tmp_path / "elpv"
    for line in lines:
        rel = line.split()[0]
        write(root / rel, (src / rel).read_bytes())
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def copy_tree():
    def _copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst
    return _copy


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLabelStudio]:
    """A real Label Studio server (its own virtual environment, .venv-labelstudio) on a free port."""
    from flawline.storage.local_s3 import _free_ports

    server = LocalLabelStudio(root=tmp_path_factory.mktemp("labelstudio"), port=_free_ports(1)[0])
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture
def ls_client(labelstudio: LocalLabelStudio) -> LabelStudioClient:
    return LabelStudioClient(labelstudio.url, labelstudio.token)


# The two longest files first (the two-node Ray cluster's runs; quickstart's whole main job): with
# two test processes taking whole files (pyproject: -n 2 --dist loadfile), each starts on one of
# them and the short files fill in around them, instead of one long file starting last.
FIRST = ("test_ray_jobs.py", "test_cli.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))
