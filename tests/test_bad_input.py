"""Every bad input the issue lists: a one-line error naming the file or cause, and the catalog and
bucket left as they were (no row ever points at a missing object)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flawline.catalog import Catalog, Image, downgrade
from flawline.catalog.db import make_engine
from flawline.cli.main import app
from flawline.data.ingest import import_dataset
from flawline.errors import (
    ImportConflict,
    InvalidInput,
    SchemaOutOfDate,
    StorageAuthError,
    StorageUnavailable,
)
from flawline.storage import ObjectStore

from conftest import image_bytes, mask_bytes, write


def _rows(catalog) -> int:
    with catalog.session() as s:
        return s.scalar(select(func.count(Image.id)))


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


@pytest.fixture
def seeded(catalog, store, folder_tree):
    """A dataset that is already stored, so we can prove failures do not harm it."""
    import_dataset(catalog, store, folder_tree, dataset="d")
    return _rows(catalog), sorted(store.list_keys())


def _assert_unharmed(catalog, store, seeded):
    rows, keys = seeded
    assert _rows(catalog) == rows
    assert set(keys) <= set(store.list_keys())
    with catalog.session() as s:
        for key in s.scalars(select(Image.object_key)):
            assert store.exists(key)


@pytest.mark.parametrize("name,data,expect", [
    ("notes.png", b"this is text, not pixels", "not an image file"),
    ("empty.png", b"", "file is empty (0 bytes)"),
    ("cut.jpg", image_bytes(7, fmt="JPEG")[:-200], "truncated"),
    ("cut.png", image_bytes(7, size=(400, 300))[:-40], "unreadable image"),
    ("tiny.png", image_bytes(7, size=(4, 4)), "smaller than"),
])
def test_unreadable_files(catalog, store, tmp_path, seeded, name, data, expect):
    src = tmp_path / "bad"
    write(src / "normal" / "ok.png", image_bytes(50))
    bad = write(src / "normal" / name, data)
    with pytest.raises(InvalidInput) as info:
        import_dataset(catalog, store, src, dataset="d")
    message = _one_line(info.value)
    assert str(bad) in message and expect.lower() in message.lower()
    assert message.endswith("(no image was added; --skip-invalid imports the others and lists the bad files)")
    _assert_unharmed(catalog, store, seeded)


def test_skip_invalid_imports_the_rest(catalog, store, tmp_path):
    src = tmp_path / "bad"
    write(src / "normal" / "ok.png", image_bytes(50))
    write(src / "normal" / "empty.png", b"")
    write(src / "normal" / "notes.txt", b"hello")
    report = import_dataset(catalog, store, src, dataset="d", skip_invalid=True)
    assert report.new_images == 1 and len(report.skipped) == 1
    assert any("empty.png" in s for s in report.skipped)
    # A file that is no image file type is no bad image: listed as unused, with or without --skip-invalid.
    assert report.unused == [f"{src / 'normal' / 'notes.txt'}: not an image file type"]


def test_notes_beside_the_images_do_not_stop_an_import(catalog, store, tmp_path):
    src = tmp_path / "notes"
    write(src / "normal" / "ok.png", image_bytes(51))
    write(src / "normal" / "README.txt", b"line 3, night shift")
    report = import_dataset(catalog, store, src, dataset="d3")
    assert report.new_images == 1 and report.unused == [f"{src / 'normal' / 'README.txt'}: not an image file type"]


def test_mask_size_mismatch(catalog, store, tmp_path, seeded):
    src = tmp_path / "bad"
    write(src / "defect" / "scratch" / "a.png", image_bytes(60, size=(64, 48)))
    write(src / "masks" / "defect" / "scratch" / "a.png", mask_bytes(size=(32, 32)))
    with pytest.raises(InvalidInput, match=r"masks/defect/scratch/a.png: mask is 32x32 but its image .*64x48"):
        import_dataset(catalog, store, src, dataset="d")
    _assert_unharmed(catalog, store, seeded)


def test_normal_image_with_defect_mask(catalog, store, tmp_path):
    src = tmp_path / "bad"
    write(src / "normal" / "a.png", image_bytes(61))
    write(src / "masks" / "normal" / "a.png", mask_bytes())
    with pytest.raises(ImportConflict, match="mask marks defect pixels but its image is labelled normal"):
        import_dataset(catalog, store, src, dataset="d2")
    assert _rows(catalog) == 0


def test_conflicting_labels_within_one_import(catalog, store, tmp_path, seeded):
    src = tmp_path / "bad"
    data = image_bytes(62)
    write(src / "normal" / "a.png", data)
    write(src / "defect" / "crack" / "b.png", data)
    with pytest.raises(ImportConflict) as info:
        import_dataset(catalog, store, src, dataset="d")
    message = _one_line(info.value)
    assert "a.png" in message and "b.png" in message and "conflicting labels" in message
    _assert_unharmed(catalog, store, seeded)


def test_conflicting_label_against_the_catalog(catalog, store, tmp_path, folder_tree, seeded):
    src = tmp_path / "relabel"
    write(src / "defect" / "crack" / "n0-again.png", (folder_tree / "normal" / "n0.png").read_bytes())
    with pytest.raises(ImportConflict, match=r"already in dataset 'd' .* labelled normal, not defect/crack"):
        import_dataset(catalog, store, src, dataset="d")
    _assert_unharmed(catalog, store, seeded)


def test_s3_server_down(catalog, folder_tree, s3_server, bucket):
    dead = ObjectStore("127.0.0.1:9", s3_server.access_key, s3_server.secret_key, bucket, retries=0)
    with pytest.raises(StorageUnavailable, match=r"S3 server 127.0.0.1:9 is not reachable") as info:
        import_dataset(catalog, dead, folder_tree)
    _one_line(info.value)
    assert _rows(catalog) == 0


def test_s3_refuses_the_keys(catalog, folder_tree, s3_server, bucket):
    wrong = ObjectStore(s3_server.endpoint, s3_server.access_key, "not-the-secret", bucket)
    with pytest.raises(StorageAuthError, match="refused the access keys"):
        import_dataset(catalog, wrong, folder_tree)
    assert _rows(catalog) == 0


def test_s3_dies_midway_leaves_no_dangling_rows(catalog, store, folder_tree, seeded, tmp_path):
    """An upload that fails partway writes no rows; re-running completes the import."""
    src = tmp_path / "more"
    for i in range(6):
        write(src / "normal" / f"m{i}.png", image_bytes(200 + i))
    calls = {"n": 0}
    real_put = store.put_bytes

    def flaky_put(key, data, content_type="application/octet-stream"):
        calls["n"] += 1
        if calls["n"] == 4:
            raise StorageUnavailable("S3 server went away (simulated in the test)")
        real_put(key, data, content_type)

    store.put_bytes = flaky_put
    with pytest.raises(StorageUnavailable):
        import_dataset(catalog, store, src, dataset="d", workers=1)
    _assert_unharmed(catalog, store, seeded)
    store.put_bytes = real_put
    report = import_dataset(catalog, store, src, dataset="d")
    assert report.new_images == 6
    _assert_unharmed(catalog, store, (seeded[0] + 6, seeded[1]))


def test_catalog_on_an_older_schema(catalog_url):
    downgrade(make_engine(catalog_url), "0001")
    with pytest.raises(SchemaOutOfDate, match="run `flawline db upgrade`"):
        Catalog(catalog_url)


def test_unknown_layout_and_missing_path(catalog, store, tmp_path):
    with pytest.raises(InvalidInput, match="unknown layout 'pascal'"):
        import_dataset(catalog, store, tmp_path, layout="pascal")
    with pytest.raises(InvalidInput, match="no such file or directory"):
        import_dataset(catalog, store, tmp_path / "nope")
    (tmp_path / "random").mkdir()
    with pytest.raises(InvalidInput, match="layout not recognised"):
        import_dataset(catalog, store, tmp_path / "random")
    (tmp_path / "emptyfolder" / "normal").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="no images found"):
        import_dataset(catalog, store, tmp_path / "emptyfolder")


# -- the same through the CLI: one line on stderr, exit code 1 -------------------------------------
def _cli(args):
    return CliRunner().invoke(app, args)


def test_cli_bad_file_is_one_line(settings_env, tmp_path):
    src = tmp_path / "bad"
    write(src / "normal" / "empty.png", b"")
    result = _cli(["data", "import", str(src)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "empty.png: image file is empty" in lines[0]


def test_cli_s3_down(settings_env, folder_tree, monkeypatch):
    from flawline.config import get_settings

    monkeypatch.setenv("FLAWLINE_S3_ENDPOINT", "127.0.0.1:9")
    get_settings.cache_clear()
    result = _cli(["data", "import", str(folder_tree)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: S3 server 127.0.0.1:9 is not reachable")
    assert result.stderr.count("\n") == 1


def test_cli_old_schema(settings_env, folder_tree):
    downgrade(make_engine(settings_env.catalog_url), "0001")
    result = _cli(["data", "list"])
    assert result.exit_code == 1
    assert "schema 0001" in result.stderr and "flawline db upgrade" in result.stderr


def test_cli_unknown_dataset(settings_env):
    result = _cli(["data", "show", "nope"])
    assert result.exit_code == 1
    assert "no dataset named 'nope'" in result.stderr
