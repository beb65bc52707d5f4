"""Seeded, stratified train/val/test splits recorded in the catalog."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from flawline.catalog import Image
from flawline.catalog.queries import get_dataset, image_labels
from flawline.data.ingest import import_dataset
from flawline.data.split import SplitSpec, assign_splits, split_keys
from flawline.errors import InvalidInput

from conftest import image_bytes, write


@pytest.fixture
def twenty(catalog, store, tmp_path):
    src = tmp_path / "s"
    for i in range(14):
        write(src / "normal" / f"n{i}.png", image_bytes(300 + i))
    for i in range(6):
        write(src / "defect" / "crack" / f"d{i}.png", image_bytes(400 + i))
    import_dataset(catalog, store, src, dataset="s")
    return "s"


def _splits(catalog, name):
    with catalog.session() as s:
        ds = get_dataset(s, name)
        return dict(s.execute(select(Image.id, Image.split).where(Image.dataset_id == ds.id)).all())


def test_same_seed_same_split(catalog, twenty):
    assign_splits(catalog, twenty, SplitSpec(0.5, 0.25, 0.25, seed=3))
    first = _splits(catalog, twenty)
    assign_splits(catalog, twenty, SplitSpec(0.5, 0.25, 0.25, seed=4))
    assert _splits(catalog, twenty) != first
    assign_splits(catalog, twenty, SplitSpec(0.5, 0.25, 0.25, seed=3))
    assert _splits(catalog, twenty) == first


def test_stratified_and_recorded(catalog, twenty):
    counts = assign_splits(catalog, twenty, SplitSpec(0.5, 0.0, 0.5, seed=0))
    assert counts == {"train": 10, "val": 0, "test": 10}
    with catalog.session() as s:
        ds = get_dataset(s, twenty)
        labels = image_labels(s, ds.id)
        assert ds.split_info["seed"] == 0 and ds.split_info["counts"] == counts
    splits = _splits(catalog, twenty)
    defects_in_train = sum(1 for i, sp in splits.items() if sp.value == "train" and labels[i][0].value == "defect")
    assert defects_in_train == 3  # half of each stratum


def test_normal_only_train(catalog, twenty):
    assign_splits(catalog, twenty, SplitSpec(0.8, 0.0, 0.2, seed=1, normal_only_train=True))
    with catalog.session() as s:
        labels = image_labels(s, get_dataset(s, twenty).id)
    splits = _splits(catalog, twenty)
    assert all(labels[i][0].value == "normal" for i, sp in splits.items() if sp.value == "train")
    assert sum(sp.value == "train" for sp in splits.values()) == round(14 * 0.8)
    assert len(split_keys(catalog, twenty, splits[next(iter(splits))])) > 0


def test_bad_fractions(catalog, twenty):
    with pytest.raises(InvalidInput, match="must be non-negative and sum to 1"):
        assign_splits(catalog, twenty, SplitSpec(0.5, 0.5, 0.5))


def test_split_follows_content_not_import_order(catalog, store, tmp_path, catalog_url):
    """Image ids follow upload order (parallel imports finish in any order); the same seed must
    still split the same images the same way."""
    from flawline.catalog import Catalog, upgrade
    from flawline.catalog.db import make_engine

    src = tmp_path / "o"
    for i in range(12):
        write(src / "normal" / f"n{i:02d}.png", image_bytes(500 + i))
    for i in range(6):
        write(src / "defect" / "crack" / f"d{i}.png", image_bytes(600 + i))
    import_dataset(catalog, store, src, dataset="o", workers=1)
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(make_engine(other_url))
    other = Catalog(other_url)
    half = tmp_path / "half"  # the second catalog sees the last six normals first: other ids, same images
    for i in range(6, 12):
        write(half / "normal" / f"n{i:02d}.png", image_bytes(500 + i))
    import_dataset(other, store, half, dataset="o", workers=1)
    import_dataset(other, store, src, dataset="o", workers=1)

    def by_content(cat):
        assign_splits(cat, "o", SplitSpec(0.5, 0.25, 0.25, seed=7))
        with cat.session() as s:
            return dict(s.execute(select(Image.content_hash, Image.split)).all())

    assert by_content(catalog) == by_content(other)
    other.dispose()


# -- groups, references, presets ------------------------------------------------------------------
def _manifest_set(root, rows):
    """Images for ``rows`` (dicts with file and optional label/class/group/reference/split) and their
    manifest.csv."""
    import csv

    for n, row in enumerate(rows):
        write(root / row["file"], image_bytes(1000 + n))
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "class", "group", "reference", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture
def boards(catalog, store, tmp_path):
    """12 boards (group b0..b11), each a reference + 3 tested images; boards 0-4 hold a defect
    (class short or open). Plus 6 reference pairs with no group value."""
    rows = []
    for b in range(12):
        rows.append({"file": f"b{b}/ref.png", "label": "normal", "group": f"b{b}"})
        for t in range(3):
            defect = b < 5 and t == 0
            rows.append({"file": f"b{b}/t{t}.png", "label": "defect" if defect else "normal",
                         "class": ("short" if b % 2 else "open") if defect else "", "group": f"b{b}",
                         "reference": f"b{b}/ref.png"})
    for p in range(6):
        rows.append({"file": f"pairs/r{p}.png", "label": "normal"})
        rows.append({"file": f"pairs/t{p}.png", "label": "defect" if p < 2 else "normal",
                     "reference": f"pairs/r{p}.png"})
    import_dataset(catalog, store, _manifest_set(tmp_path / "boards", rows), dataset="boards")
    return "boards"


def _by_origin(catalog, name):
    """file below the source → (split, group attr, reference hash, content hash, label)."""
    with catalog.session() as s:
        ds = get_dataset(s, name)
        labels = image_labels(s, ds.id)
        rows = s.execute(select(Image.id, Image.origin, Image.split, Image.attrs, Image.content_hash)
                         .where(Image.dataset_id == ds.id)).all()
    return {o.split(f"/{name}/", 1)[1]: (sp.value if sp else None, (a or {}).get("group"), (a or {}).get("reference"),
                                        h, labels[i][0].value if labels[i][0] else None)
            for i, o, sp, a, h in rows}


def _groups_whole(images):
    by_group = {}
    for split, group, *_ in images.values():
        if group:
            by_group.setdefault(group, set()).add(split)
    assert len(by_group) == 12
    for group, splits in by_group.items():
        assert len(splits) == 1, f"group {group} is in {splits}"


def _pairs_together(images):
    split_of = {h: sp for sp, _g, _r, h, _l in images.values()}
    pairs = [(sp, ref) for sp, _g, ref, _h, _l in images.values() if ref]
    assert len(pairs) == 36 + 6
    for split, ref in pairs:
        assert split_of[ref] == split


def test_group_by_keeps_every_group_and_pair_in_one_split(catalog, boards):
    for seed in range(3):
        counts = assign_splits(catalog, boards, SplitSpec(0.5, 0.25, 0.25, seed=seed, group_by="group"))
        images = _by_origin(catalog, boards)
        _groups_whole(images)
        _pairs_together(images)
        assert sum(counts.values()) == 60 and counts["train"] > 0 and counts["test"] > 0
    with catalog.session() as s:
        info = get_dataset(s, boards).split_info
    assert info["group_by"] == "group" and info["keep_preset"] is False
    assert sum(info["group_counts"].values()) == 12 + 6  # boards, and each ungrouped pair as one group


def test_references_stay_with_their_image_without_group_by(catalog, boards):
    assign_splits(catalog, boards, SplitSpec(0.5, 0.25, 0.25, seed=5))
    _pairs_together(_by_origin(catalog, boards))  # a board's reference joins its tested images anyway


def test_group_by_normal_only_train(catalog, boards):
    assign_splits(catalog, boards, SplitSpec(0.6, 0.2, 0.2, seed=2, group_by="group", normal_only_train=True))
    images = _by_origin(catalog, boards)
    _groups_whole(images)
    defect_groups = {g for _sp, g, _r, _h, label in images.values() if label == "defect" and g}
    assert defect_groups == {f"b{b}" for b in range(5)}
    for split, group, *_rest, label in images.values():
        if split == "train":
            assert label == "normal" and group not in defect_groups
    assert any(sp == "train" for sp, *_ in images.values())


def test_group_by_same_seed_same_split(catalog, boards):
    spec = SplitSpec(0.5, 0.25, 0.25, seed=11, group_by="group")
    assign_splits(catalog, boards, spec)
    first = _by_origin(catalog, boards)
    assign_splits(catalog, boards, SplitSpec(0.5, 0.25, 0.25, seed=12, group_by="group"))
    assert _by_origin(catalog, boards) != first
    assign_splits(catalog, boards, spec)
    assert _by_origin(catalog, boards) == first


def test_group_by_unknown_attribute(catalog, twenty):
    with pytest.raises(InvalidInput, match="no image has the attribute 'board' to group by"):
        assign_splits(catalog, twenty, SplitSpec(group_by="board"))


def test_keep_preset(catalog, store, tmp_path):
    rows = [{"file": f"p{i}.png", "label": "normal", "split": ("train", "val", "test")[i % 3]} for i in range(9)]
    rows += [{"file": f"f{i}.png", "label": "defect" if i < 4 else "normal"} for i in range(12)]
    import_dataset(catalog, store, _manifest_set(tmp_path / "pre", rows), dataset="pre")
    presets = {r["file"]: r["split"] for r in rows if "split" in r}
    assign_splits(catalog, "pre", SplitSpec(0.0, 0.0, 1.0))  # a re-split moves them all to test
    assert all(sp == "test" for sp, *_ in _by_origin(catalog, "pre").values())
    counts = assign_splits(catalog, "pre", SplitSpec(0.5, 0.0, 0.5, seed=1, normal_only_train=True, keep_preset=True))
    images = _by_origin(catalog, "pre")
    assert {f: images[f][0] for f in presets} == presets
    rest = {f: v for f, v in images.items() if f not in presets}
    assert all(sp in ("train", "test") for sp, *_ in rest.values())
    assert all(label == "normal" for sp, *_r, label in rest.values() if sp == "train")  # the other options hold
    assert sum(sp == "train" for sp, *_ in rest.values()) == 4  # half of the 8 normals
    assert counts == {"train": 3 + 4, "val": 3, "test": 3 + 8}
    with catalog.session() as s:
        info = get_dataset(s, "pre").split_info
    assert info["keep_preset"] is True and info["preset_kept"] == 9


def test_keep_preset_mvtec_and_none_to_keep(catalog, store, mvtec_tree, twenty):
    import_dataset(catalog, store, mvtec_tree, dataset="w")
    assign_splits(catalog, "w", SplitSpec(0.0, 1.0, 0.0))
    assign_splits(catalog, "w", SplitSpec(keep_preset=True))
    with catalog.session() as s:
        rows = s.execute(select(Image.origin, Image.split)).all()
    assert {(o.split("/widget/", 1)[1].split("/", 1)[0], sp.value) for o, sp in rows if "/widget/" in o} == {
        ("train", "train"), ("test", "test")}
    with pytest.raises(InvalidInput, match="no image has a preset split"):
        assign_splits(catalog, twenty, SplitSpec(keep_preset=True))


def test_split_cli_group_by(settings_env, catalog, boards):
    from typer.testing import CliRunner

    from flawline.cli.main import app

    result = CliRunner().invoke(app, ["data", "split", boards, "--group-by", "group", "--seed", "4",
                                      "--train", "0.5", "--val", "0.25", "--test", "0.25"])
    assert result.exit_code == 0, result.output
    assert "groups: train " in result.stdout
    _groups_whole(_by_origin(catalog, boards))
    with catalog.session() as s:
        info = get_dataset(s, boards).split_info
    assert info["group_by"] == "group" and info["seed"] == 4
    assert f"groups: train {info['group_counts']['train']}, val {info['group_counts']['val']}" in result.stdout
    help_text = CliRunner().invoke(app, ["data", "split", "--help"]).stdout
    assert "--group-by" in help_text and "--keep-preset" in help_text
