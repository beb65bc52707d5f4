"""The Label Studio bridge against a real Label Studio server, the local S3 server and a SQLite
catalog: tokens, projects, push with pre-annotations, pull (polling and webhooks), the simulated
annotator, and the faults: Label Studio down mid-push, malformed annotations, deleted images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import delete, select

from flawline.catalog import Annotation, AnnotationSource, Image, Label, LabelTask, LabelTaskStatus
from flawline.data.ingest import import_dataset
from flawline.errors import InvalidInput, LabelStudioAuthError, LabelStudioUnavailable
from flawline.labelstudio import (
    LabelStudioClient,
    Prediction,
    ensure_project,
    label_config,
    pull_annotations,
    push_tasks,
    read_annotation,
)
from flawline.labelstudio.annotator import SimulatedAnnotator, truth_from_catalog
from flawline.labelstudio.convert import prediction_result
from flawline.labelstudio.webhook import make_app, task_ids_of


@pytest.fixture
def tiles(catalog, store, magnetic_tile_slice):
    import_dataset(catalog, store, magnetic_tile_slice, layout="magnetic-tile", dataset="tiles", workers=4)
    with catalog.session() as s:
        return list(s.scalars(select(Image.id).order_by(Image.id)))


def _human(catalog, image_id=None):
    with catalog.session() as s:
        q = select(Annotation).where(Annotation.source == AnnotationSource.human)
        if image_id is not None:
            q = q.where(Annotation.image_id == image_id)
        rows = s.scalars(q).all()
        for r in rows:
            s.expunge(r)
        return rows


def _mask(store, key):
    with PILImage.open(io.BytesIO(store.get_bytes(key))) as img:
        return np.asarray(img.convert("L")) > 0


# -- tokens and errors ---------------------------------------------------------------------------
def test_legacy_and_personal_access_tokens(labelstudio, ls_client):
    # One test for the token's whole life: Label Studio lets a user hold one valid personal
    # access token at a time (HTTP 409 on a second), so creating it in two tests would depend
    # on their order.
    assert ls_client.whoami() == labelstudio.username
    pat = ls_client.call("create a personal access token", lambda: ls_client.sdk.tokens.create()).token
    assert pat.count(".") == 2  # a JWT refresh token, not a legacy token
    assert LabelStudioClient(labelstudio.url, pat).whoami() == labelstudio.username
    ls_client.call("revoke the token", lambda: ls_client.sdk.tokens.blacklist(refresh=pat))
    with pytest.raises(LabelStudioAuthError, match="refused the token"):
        LabelStudioClient(labelstudio.url, pat).whoami()


def test_bad_token_and_unreachable_server_are_one_line_errors(labelstudio):
    with pytest.raises(LabelStudioAuthError, match="refused the token .* FLAWLINE_LABELSTUDIO_TOKEN"):
        LabelStudioClient(labelstudio.url, "0" * 40).whoami()
    with pytest.raises(LabelStudioUnavailable, match=r"127\.0\.0\.1:9 is not reachable .*flawline up"):
        LabelStudioClient("http://127.0.0.1:9", "0" * 40, max_retries=0).whoami()
    with pytest.raises(LabelStudioAuthError, match="no Label Studio token"):
        LabelStudioClient(labelstudio.url, "")


# -- configs and conversions (no server) ----------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "segmentation", "polygons", "boxes"])
def test_label_configs_are_accepted_by_label_studio(ls_client, task):
    config = label_config(task, ["blowhole", "crack"])
    ls_client.call("validate", lambda: ls_client.sdk.projects.validate_label_config(
        id=ls_client.call("p", lambda: ls_client.sdk.projects.create(title=f"cfg {task}", label_config=config)).id,
        label_config=config))


@pytest.mark.parametrize("task", ["segmentation", "polygons", "boxes"])
def test_prediction_regions_read_back(task):
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 5:25] = True
    result = prediction_result(task, Prediction("m:1", 0.9, True, "crack", mask), 60, 40)
    human = read_annotation(result, 60, 40)
    assert (human.label, human.defect_class) == ("defect", "crack")
    if task == "boxes":
        (box,) = human.boxes
        assert abs(box["x"] - 5) <= 1 and abs(box["w"] - 20) <= 1.5 and box["label"] == "crack"
    else:
        iou = (human.mask.astype(bool) & mask).sum() / (human.mask.astype(bool) | mask).sum()
        assert iou > (0.99 if task == "segmentation" else 0.8)


def test_malformed_and_contradictory_annotations_are_refused():
    with pytest.raises(InvalidInput, match="malformed brush RLE"):
        read_annotation([{"type": "brushlabels", "value": {"rle": [1, 2, 3], "brushlabels": ["x"]},
                          "original_width": 10, "original_height": 10}], 10, 10)
    with pytest.raises(InvalidInput, match="not a list"):
        read_annotation({"oops": 1}, 10, 10)
    with pytest.raises(InvalidInput, match="contradictory"):
        read_annotation([{"type": "choices", "value": {"choices": ["normal"]}},
                         {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5,
                                                                "rectanglelabels": ["crack"]}}], 10, 10)
    with pytest.raises(InvalidInput, match="empty answer"):  # submitted with nothing chosen: no answer
        read_annotation([], 10, 10)
    with pytest.raises(InvalidInput, match="empty answer"):
        read_annotation([{"type": "choices", "value": {"choices": []}}], 10, 10)
    assert read_annotation([{"type": "choices", "value": {"choices": ["normal"]}}], 10, 10).label == "normal"
    assert 'required="true"' in label_config("segmentation", ["crack"])  # the verdict must be chosen


def _rle(mask: np.ndarray) -> list[int]:
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(mask.astype(np.uint8) * 255)


def test_a_rotated_rectangle_is_the_polygon_it_covers():
    """A 90-degree box drawn over a vertical scratch: Label Studio keeps x, y, width, height of the
    unturned box and turns it clockwise about its top-left corner."""
    box = {"type": "rectanglelabels", "value": {"x": 50, "y": 10, "width": 60, "height": 10, "rotation": 90,
                                                 "rectanglelabels": ["crack"]}}  # percent of a 100 x 100 image
    human = read_annotation([box], 100, 100)
    assert human.label == "defect" and human.boxes == []  # exact in the mask, not an axis-aligned box
    ys, xs = np.nonzero(human.mask)
    assert (xs.min(), xs.max()) == pytest.approx((40, 50), abs=1)  # turned: 10 wide, left of x = 50
    assert (ys.min(), ys.max()) == pytest.approx((10, 70), abs=1)  # and 60 high, downwards
    upright = read_annotation([{**box, "value": {**box["value"], "rotation": 0}}], 100, 100)
    assert upright.mask is None and upright.boxes[0]["w"] == 60


def test_a_brush_mask_of_another_size_is_refused_unless_the_orientation_explains_it():
    stored = np.zeros((10, 20), bool)  # 20 wide, 10 high: the image's stored frame
    stored[:, :3] = True
    brush = {"type": "brushlabels", "original_width": 20, "original_height": 10,
             "value": {"format": "rle", "rle": _rle(stored), "brushlabels": ["crack"]}}
    with pytest.raises(InvalidInput, match="brush mask: it is 20x10 but the image is 30x10"):
        read_annotation([brush], 30, 10)
    # an image shown turned (EXIF orientation 6: 90 degrees clockwise) is 10 wide, 20 high
    human = read_annotation([brush], 10, 20, orientation=6)
    assert human.mask.shape == (20, 10) and human.mask[:3].all() and not human.mask[3:].any()


# -- push, annotate, pull --------------------------------------------------------------------------
def test_push_annotate_pull_round_trip(catalog, store, ls_client, tiles):
    project = ensure_project(catalog, ls_client, "tiles", "segmentation")
    assert ensure_project(catalog, ls_client, "tiles", "segmentation").ls_project_id == project.ls_project_id
    assert sorted(project.classes) == ["blowhole", "crack"]
    preds = {tiles[0]: Prediction("tiles-padim:1", 0.7, True, None, None)}
    report = push_tasks(catalog, store, ls_client, project, tiles, preds, chunk=3)
    assert (report.created, report.already_there) == (len(tiles), 0)
    again = push_tasks(catalog, store, ls_client, project, tiles)
    assert (again.created, again.already_there) == (0, len(tiles))  # no duplicates
    ls_tasks = list(ls_client.iter_tasks(project.ls_project_id))
    assert len(ls_tasks) == len(tiles)
    first = next(t for t in ls_tasks if t.data["flawline_image_id"] == tiles[0])
    assert first.total_predictions == 1

    truth = truth_from_catalog(catalog, "tiles")
    skip = {tiles[1]}
    assert SimulatedAnnotator(ls_client, store, truth, skip=skip).answer(project) == len(tiles)
    pulled = pull_annotations(catalog, store, ls_client, project)
    assert (pulled.labelled, pulled.skipped, pulled.errors) == (len(tiles) - 1, 1, [])
    for image_id in tiles:
        rows = _human(catalog, image_id)
        if image_id in skip:
            assert rows == []
            continue
        (row,) = rows
        assert row.label is (Label.defect if truth[image_id].is_defect else Label.normal)
        assert row.defect_class == truth[image_id].defect_class
        if truth[image_id].is_defect:  # brush RLE decoded back to the ground-truth mask
            assert (_mask(store, row.mask_key) == _mask(store, truth[image_id].mask_key)).mean() > 0.999
        else:
            assert row.mask_key is None
    with catalog.session() as s:
        assert s.scalar(select(LabelTask.status).where(LabelTask.image_id == tiles[1])) is LabelTaskStatus.skipped
    assert pull_annotations(catalog, store, ls_client, project).labelled == 0  # idempotent
    assert pull_annotations(catalog, store, ls_client, project, full=True).labelled == 0

    # an update in Label Studio replaces the catalog's label; a deletion removes it
    defect = next(i for i in tiles if truth[i].is_defect and i not in skip)
    task_id = push_tasks(catalog, store, ls_client, project, [defect]).task_ids[defect]
    (ann,) = [a for a in ls_client.sdk.tasks.get(id=task_id).annotations]
    ls_client.sdk.annotations.update(id=ann["id"], result=[{"from_name": "verdict", "to_name": "image",
                                                            "type": "choices", "value": {"choices": ["normal"]}}])
    assert pull_annotations(catalog, store, ls_client, project).labelled == 1
    (row,) = _human(catalog, defect)
    assert (row.label, row.mask_key) == (Label.normal, None)
    ls_client.sdk.annotations.delete(id=ann["id"])
    assert pull_annotations(catalog, store, ls_client, project).removed == 1
    assert _human(catalog, defect) == []


def test_label_studio_down_mid_push_loses_and_duplicates_nothing(catalog, store, ls_client, tiles):
    project = ensure_project(catalog, ls_client, "tiles", "classification")
    real_call, calls = ls_client.call, {"n": 0}

    def flaky(action, fn):
        if action == "import tasks":
            calls["n"] += 1
            if calls["n"] == 2:  # the second chunk: Label Studio applied it, then the answer was lost
                fn()
                raise LabelStudioUnavailable("Label Studio went away (test)")
        return real_call(action, fn)

    ls_client.call = flaky
    with pytest.raises(LabelStudioUnavailable):
        push_tasks(catalog, store, ls_client, project, tiles, chunk=2)
    ls_client.call = real_call
    report = push_tasks(catalog, store, ls_client, project, tiles, chunk=2)
    assert report.reconciled == 2 and report.created == len(tiles) - 4
    ids = [t.data["flawline_image_id"] for t in ls_client.iter_tasks(project.ls_project_id)]
    assert sorted(ids) == sorted(tiles)
    with catalog.session() as s:
        assert sorted(s.scalars(select(LabelTask.image_id).where(LabelTask.project_id == project.id))) == sorted(tiles)


def test_malformed_annotation_and_deleted_image(catalog, store, ls_client, tiles):
    project = ensure_project(catalog, ls_client, "tiles", "segmentation")
    ids = push_tasks(catalog, store, ls_client, project, tiles[:2]).task_ids
    ls_client.sdk.annotations.create(id=ids[tiles[0]], result=[
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["normal"]}},
        {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 10,
         "original_height": 10, "value": {"format": "rle", "rle": [0, 1, 2], "brushlabels": ["crack"]}}])
    with catalog.session() as s:
        s.execute(delete(Image).where(Image.id == tiles[1]))
    ls_client.sdk.annotations.create(id=ids[tiles[1]], result=[
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["normal"]}}])
    report = pull_annotations(catalog, store, ls_client, project)
    assert report.orphaned == 1 and len(report.errors) == 1
    assert f"task {ids[tiles[0]]}: malformed brush RLE" in report.errors[0]
    assert _human(catalog) == []  # nothing half-written
    with catalog.session() as s:
        assert s.scalar(select(LabelTask.status).where(LabelTask.ls_task_id == ids[tiles[1]])) \
            is LabelTaskStatus.orphaned


def test_webhook_applies_the_tasks_it_names(catalog, store, ls_client, tiles):
    from fastapi.testclient import TestClient

    project = ensure_project(catalog, ls_client, "tiles", "classification")
    ids = push_tasks(catalog, store, ls_client, project, tiles[:1]).task_ids
    ann = ls_client.sdk.annotations.create(id=ids[tiles[0]], result=[
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["crack"]}}])
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": project.ls_project_id},
               "task": {"id": ids[tiles[0]]}, "annotation": {"id": ann.id, "task": ids[tiles[0]]}}
    assert task_ids_of(payload) == [ids[tiles[0]]]
    http = TestClient(make_app(catalog, store, ls_client, secret="s3cret"))
    assert http.post("/labelstudio/webhook", json=payload).status_code == 403
    answer = http.post("/labelstudio/webhook", json=payload, headers={"X-Flawline-Webhook-Secret": "s3cret"})
    assert answer.status_code == 200 and answer.json()["labelled"] == 1
    (row,) = _human(catalog, tiles[0])
    assert (row.label, row.defect_class) == (Label.defect, "crack")
    bad = http.post("/labelstudio/webhook", content=b"{not json", headers={"X-Flawline-Webhook-Secret": "s3cret"})
    assert bad.status_code == 400 and "not JSON" in bad.json()["detail"]


def test_label_studio_delivers_webhooks_to_the_listener(catalog, store, ls_client, tiles):
    """A real delivery: Label Studio calls the webhook app (uvicorn on loopback) when an annotation
    is created, and the catalog gets the label without a pull."""
    import threading
    import time

    import uvicorn

    from flawline.cluster.process import port_in_use
    from flawline.labelstudio.webhook import register_webhook
    from flawline.storage.local_s3 import _free_ports

    project = ensure_project(catalog, ls_client, "tiles", "classification")
    ids = push_tasks(catalog, store, ls_client, project, tiles[:1]).task_ids
    port = _free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(make_app(catalog, store, ls_client, secret="hook"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        register_webhook(catalog, ls_client, project, f"http://127.0.0.1:{port}/labelstudio/webhook", secret="hook")
        ls_client.sdk.annotations.create(id=ids[tiles[0]], result=[
            {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["blowhole"]}}])
        deadline = time.monotonic() + 30
        while not _human(catalog, tiles[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        (row,) = _human(catalog, tiles[0])
        assert (row.label, row.defect_class) == (Label.defect, "blowhole")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_label_studio_down_mid_pull_leaves_the_watermark_and_loses_nothing(catalog, store, ls_client, tiles):
    project = ensure_project(catalog, ls_client, "tiles", "classification")
    ids = push_tasks(catalog, store, ls_client, project, tiles[:3]).task_ids
    for image_id in tiles[:3]:
        ls_client.sdk.annotations.create(id=ids[image_id], result=[
            {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["normal"]}}])
    real = ls_client.iter_tasks

    def dies_after_one(*args, **kwargs):
        for n, task in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise LabelStudioUnavailable("Label Studio went away (test)")
            yield task

    ls_client.iter_tasks = dies_after_one
    with pytest.raises(LabelStudioUnavailable):
        pull_annotations(catalog, store, ls_client, project)
    ls_client.iter_tasks = real
    with catalog.session() as s:
        from flawline.catalog import LabelProject

        assert s.get(LabelProject, project.id).watermark is None  # nothing claimed as pulled
    report = pull_annotations(catalog, store, ls_client, project)
    assert report.labelled == 3 and len(_human(catalog)) == 3


def test_empty_answers_are_listed_and_change_nothing(catalog, store, ls_client, tiles):
    project = ensure_project(catalog, ls_client, "tiles", "classification")
    ids = push_tasks(catalog, store, ls_client, project, tiles[:1]).task_ids
    with catalog.session() as s:
        before = s.execute(select(Annotation.label, Annotation.source).where(Annotation.image_id == tiles[0])).all()
    ls_client.sdk.annotations.create(id=ids[tiles[0]], result=[], was_cancelled=False)
    report = pull_annotations(catalog, store, ls_client, project)
    assert report.labelled == 0 and len(report.errors) == 1 and "empty answer" in report.errors[0]
    with catalog.session() as s:
        assert s.execute(select(Annotation.label, Annotation.source)
                         .where(Annotation.image_id == tiles[0])).all() == before  # the imported label stands


def test_tasks_deleted_in_label_studio_leave_the_ledger(catalog, store, ls_client, tiles):
    """Pull and push both reconcile: a never-labelled image goes back to the pool and can be pushed
    again; a label whose task is gone stays in the catalog, marked; the webhook hears deletions."""
    from fastapi.testclient import TestClient

    from flawline.labelstudio.webhook import ACTIONS

    project = ensure_project(catalog, ls_client, "tiles", "classification")
    ids = push_tasks(catalog, store, ls_client, project, tiles[:3]).task_ids
    ls_client.sdk.annotations.create(id=ids[tiles[0]], result=[
        {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["crack"]}}])
    assert pull_annotations(catalog, store, ls_client, project).labelled == 1
    ls_client.sdk.tasks.delete(id=ids[tiles[0]])
    ls_client.sdk.tasks.delete(id=ids[tiles[1]])
    report = pull_annotations(catalog, store, ls_client, project)
    assert report.tasks_gone == 2
    with catalog.session() as s:
        assert set(s.scalars(select(LabelTask.image_id))) == {tiles[2]}
    (kept,) = _human(catalog, tiles[0])
    assert (kept.label, kept.defect_class, kept.attrs["ls_task_deleted"]) == (Label.defect, "crack", True)
    again = push_tasks(catalog, store, ls_client, project, tiles[1:3])
    assert (again.created, again.already_there) == (1, 1)  # the never-labelled image is pushed again

    assert "TASKS_DELETED" in ACTIONS
    ls_client.sdk.tasks.delete(id=ids[tiles[2]])
    http = TestClient(make_app(catalog, store, ls_client))
    answer = http.post("/labelstudio/webhook", json={"action": "TASKS_DELETED", "project": {"id": project.ls_project_id},
                                                     "tasks": [{"id": ids[tiles[2]]}]})
    assert answer.status_code == 200 and answer.json()["tasks_gone"] == 1
    with catalog.session() as s:
        assert set(s.scalars(select(LabelTask.image_id))) == {tiles[1]}


@pytest.mark.parametrize("task", ["classification", "segmentation", "polygons", "boxes"])
@pytest.mark.parametrize("classes", [[], ["blowhole", "crack"]])
def test_every_prediction_value_exists_in_the_labelling_config(task, classes):
    """One source of names: a model with no classes, with the project's classes, with a class the
    project lacks, and a normal verdict all predict values the config offers."""
    import xml.etree.ElementTree as ET

    from flawline.labelstudio.configs import label_config

    root = ET.fromstring(label_config(task, classes))
    offered = {c.get("value") for c in root.iter("Choice")} | {c.get("value") for c in root.iter("Label")}
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 5:25] = True
    for cls, is_defect in ((None, True), ("crack", True), ("scratch", True), (None, False)):
        result = prediction_result(task, Prediction("m:1", 0.9, is_defect, cls, mask), 60, 40, classes)
        used = {v for r in result for key in ("choices", "brushlabels", "polygonlabels", "rectanglelabels")
                for v in r["value"].get(key, [])}
        assert used and used <= offered, (cls, used, offered)
    choices = next(root.iter("Choices"))
    assert choices.get("required") == "true"


def test_push_keeps_the_projects_model_version_with_its_predictions(catalog, store, ls_client, tiles):
    """Label Studio's queue shows only the project's model version: each push with predictions sets
    it, and a newer model's push gives the open tasks its pre-annotation without new tasks."""
    project = ensure_project(catalog, ls_client, "tiles", "classification")
    first = push_tasks(catalog, store, ls_client, project, tiles[:3],
                       {i: Prediction("tiles-mixed-padim:1", 0.9, True) for i in tiles[:3]})
    assert first.model_version == "tiles-mixed-padim:1"
    assert ls_client.sdk.projects.get(id=project.ls_project_id).model_version == "tiles-mixed-padim:1"
    again = push_tasks(catalog, store, ls_client, project, tiles[:3],
                       {i: Prediction("tiles-mixed-padim:2", 0.2, False) for i in tiles[:3]})
    assert (again.created, again.already_there, again.predictions_updated) == (0, 3, 3)
    assert ls_client.sdk.projects.get(id=project.ls_project_id).model_version == "tiles-mixed-padim:2"
    tasks = list(ls_client.iter_tasks(project.ls_project_id))
    assert len(tasks) == 3 and {t.total_predictions for t in tasks} == {2}
    with catalog.session() as s:
        assert set(s.scalars(select(LabelTask.model_version))) == {"tiles-mixed-padim:2"}
