"""Repairing a dataset from the CLI: `flawline data remove` and `flawline data relabel` against the
real S3 server and catalog; every change recorded (who, when, why), nothing half-done."""

from __future__ import annotations

import json

from sqlalchemy import select
from typer.testing import CliRunner

from conftest import image_bytes, write
from flawline.catalog import Annotation, DataChange, Dataset, Image
from flawline.catalog.model_versions import register_version
from flawline.cli.main import app
from flawline.config import get_settings
from flawline.context import open_catalog, open_store
from flawline.data.records import image_records


def _run(*args):
    return CliRunner().invoke(app, list(args))


def _import(folder, name):
    result = _run("data", "import", str(folder), "--dataset", name, "--json")
    assert result.exit_code == 0, result.output


def _keys(name):
    with open_catalog(get_settings()).session() as s:
        rows = s.execute(select(Image.origin, Image.object_key).join(Dataset).where(Dataset.name == name)).all()
    return {o.rsplit("/", 1)[-1]: k for o, k in rows}


def test_remove_takes_rows_and_unshared_objects_and_records_why(settings_env, folder_tree, tmp_path):
    _import(folder_tree, "parts")
    other = write(tmp_path / "other" / "normal" / "same.png", image_bytes(0))  # the bytes of parts' n0.png
    _import(other.parent.parent, "other")
    keys = _keys("parts")
    store = open_store(get_settings())
    mask_key = next(k for o, k in _mask_keys("parts").items() if o == "s0.png")

    result = _run("data", "remove", "parts", "n0.png", "s0.png", "--reason", "blurred shots", "--by", "ana", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(i.rsplit("/", 1)[-1] for i in report["images"]) == ["n0.png", "s0.png"]
    # n0's bytes are still an image of "other", s0's mask the same bytes as s1's: only s0's image goes
    assert report["objects_deleted"] == 1 and report["objects_kept"] == 2
    assert set(_keys("parts")) == set(keys) - {"n0.png", "s0.png"}
    assert store.exists(keys["n0.png"]) and not store.exists(keys["s0.png"]) and store.exists(mask_key)
    changes = json.loads(_run("data", "changes", "parts", "--json").stdout)
    assert [(c["action"], c["image"].rsplit("/", 1)[-1], c["actor"], c["reason"]) for c in changes] == [
        ("remove", "n0.png", "ana", "blurred shots"), ("remove", "s0.png", "ana", "blurred shots")]
    assert changes[1]["label"] == "defect/scratch"


def _mask_keys(name):
    with open_catalog(get_settings()).session() as s:
        rows = s.execute(select(Image.origin, Annotation.mask_key).join(Annotation).join(Dataset)
                         .where(Dataset.name == name, Annotation.mask_key.is_not(None))).all()
    return {o.rsplit("/", 1)[-1]: k for o, k in rows}


def test_unknown_or_ambiguous_names_change_nothing(settings_env, folder_tree):
    write(folder_tree / "unlabeled" / "n1.png", image_bytes(77))  # a second n1.png, other bytes
    _import(folder_tree, "parts")
    before = _keys("parts")
    for args, words in ((["nothere.png"], "nothere.png': no image"), (["n1.png"], "names 2 images"),
                        (["n0.png", "nothere.png"], "no image")):
        result = _run("data", "remove", "parts", *args, "--reason", "x")
        assert result.exit_code != 0 and words in result.output and "nothing changed" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    missing = _run("data", "remove", "parts", "n0.png")  # --reason is required: one line too
    assert missing.exit_code == 1 and "--reason" in missing.output and len(missing.output.strip().splitlines()) == 1
    assert _keys("parts") == before
    with open_catalog(get_settings()).session() as s:
        assert s.scalars(select(DataChange)).all() == []


def test_images_a_model_version_used_need_force(settings_env, folder_tree, tmp_path):
    _import(folder_tree, "parts")
    assert _run("data", "split", "parts", "--seed", "0").exit_code == 0
    catalog = open_catalog(get_settings())
    with catalog.session() as s:
        ds = s.scalar(select(Dataset).where(Dataset.name == "parts"))
        register_version(s, name="parts-padim", artifact_uri="s3://b/models/parts-padim/1/model.pt", method="padim",
                         backbone=None, threshold=None, metrics=None, dataset_id=ds.id)
    refused = _run("data", "remove", "parts", "n2.png", "--reason", "duplicate shot")
    assert refused.exit_code != 0 and "parts-padim:1" in refused.output and "--force" in refused.output
    assert "n2.png" in _keys("parts")
    forced = _run("data", "remove", "parts", "n2.png", "--reason", "duplicate shot", "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["forced"] == ["parts-padim:1"]
    (change,) = json.loads(_run("data", "changes", "parts", "--json").stdout)
    assert change["forced_over"] == ["parts-padim:1"]


def test_relabel_decides_from_now_on_and_keeps_what_it_overrides(settings_env, folder_tree, tmp_path):
    _import(folder_tree, "parts")
    names = write(tmp_path / "list.txt", b"# wrong verdicts\nn1.png\n\n")
    result = _run("data", "relabel", "parts", "--from-file", str(names), "--label", "defect", "--class", "dent",
                  "--reason", "dent seen at 10x", "--by", "ben")
    assert result.exit_code == 0, result.output
    result = _run("data", "relabel", "parts", "s1.png", "--label", "normal", "--reason", "dust, not a scratch")
    assert result.exit_code == 0, result.output
    rows = {r.origin.rsplit("/", 1)[-1]: r for r in image_records(open_catalog(get_settings()), "parts")}
    assert (rows["n1.png"].defect, rows["n1.png"].defect_class) == (True, "dent")
    assert rows["s1.png"].defect is False and rows["s1.png"].mask_key is None  # its old mask no longer holds
    with open_catalog(get_settings()).session() as s:  # nothing lost: the imported annotations stay, superseded
        old = s.scalars(select(Annotation).join(Image).where(Image.origin.like("%n1.png"),
                                                             Annotation.source == "imported")).one()
        assert old.attrs["superseded"] is True and old.label.value == "normal"
    changes = json.loads(_run("data", "changes", "parts", "--json").stdout)
    assert [(c["from"], c["to"], c["actor"]) for c in changes][0] == ("normal", "defect/dent", "ben")
    assert changes[1]["from"] == "defect/scratch" and changes[1]["to"] == "normal"
    bad = _run("data", "relabel", "parts", "n0.png", "--label", "broken", "--reason", "x")
    assert bad.exit_code != 0 and "choose normal or defect" in bad.output


def test_a_removed_image_stays_out_of_later_imports_until_readded(settings_env, folder_tree):
    _import(folder_tree, "parts")
    assert _run("data", "remove", "parts", "u0.png", "--reason", "blank frame", "--by", "ana").exit_code == 0
    again = _run("data", "remove", "parts", "u0.png", "--reason", "again")
    assert again.exit_code == 1 and "was removed from this dataset already" in again.output and "blank frame" in again.output
    report = json.loads(_run("data", "import", str(folder_tree), "--dataset", "parts", "--json").stdout)
    assert report["new_images"] == 0 and len(report["removed"]) == 1 and "blank frame" in report["removed"][0]
    assert "u0.png" not in _keys("parts")
    back = json.loads(_run("data", "import", str(folder_tree), "--dataset", "parts", "--readd-removed", "--json").stdout)
    assert back["new_images"] == 1 and "u0.png" in _keys("parts")
    actions = [c["action"] for c in json.loads(_run("data", "changes", "parts", "--json").stdout)]
    assert actions == ["remove", "readd"]


def test_relabelling_to_the_label_it_has_changes_nothing(settings_env, folder_tree):
    _import(folder_tree, "parts")
    result = _run("data", "relabel", "parts", "n0.png", "--label", "normal", "--reason", "check", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["unchanged"] and not json.loads(result.stdout)["images"]
    assert json.loads(_run("data", "changes", "parts", "--json").stdout) == []
