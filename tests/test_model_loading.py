"""One loader for a registered model version (``catalog.model_versions.load_version``): a threshold
set by hand after training reaches every caller: Serve, local pre-annotations and active-learning
scores, and the Ray actors that score and pre-annotate on the cluster."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from conftest import SIZE, crack_tiles
from flawline.active.scoring import ScoreRows, pre_annotations
from flawline.catalog import ModelVersion
from flawline.catalog.model_versions import load_version, set_threshold, version_threshold
from flawline.data.ingest import import_dataset
from flawline.data.records import image_records
from flawline.data.split import SplitSpec, assign_splits
from flawline.evaluate import thresholds as th
from flawline.serving.models import load_model
from flawline.train import TrainSpec
from flawline.train.runner import finish_run, plan_run, train_local


def test_a_threshold_set_by_hand_reaches_every_caller(settings_env, catalog, store, tmp_path):

    import_dataset(catalog, store, crack_tiles(tmp_path / "t", normal=60, defect=8, unlabelled=0), dataset="t",
                   workers=4)
    assign_splits(catalog, "t", SplitSpec(train=0.4, val=0.3, test=0.3, seed=0, normal_only_train=True))
    plan = plan_run(catalog, TrainSpec(datasets=["t"], setting="unsupervised", method="padim", image_size=SIZE,
                                       batch_size=8))
    detector, history = train_local(store, plan)
    ref = finish_run(catalog, store, plan, detector, history=history)["model"]
    rows = [r for r in image_records(catalog, "t") if r.split == "test"]
    trained = pre_annotations(load_version(catalog, store, ref), store, rows, ref)
    assert any(p.is_defect for p in trained.values())  # the cracked test tiles
    # what annotators read: the share of held-out normals each image scores above
    shown = {r.image_id: trained[r.image_id].readable for r in rows}
    assert all(0.0 <= v <= 1.0 for v in shown.values())
    defects = [shown[r.image_id] for r in rows if r.defect]
    normals = [shown[r.image_id] for r in rows if not r.defect]
    assert min(defects) > 0.9 and np.median(normals) < 0.9

    with catalog.session() as s:  # a threshold set by hand, above every score
        set_threshold(s, s.scalar(select(ModelVersion)), th.manual(1e9, "by hand").as_dict())
        row = s.scalar(select(ModelVersion))
        s.expunge(row)
    assert load_version(catalog, store, ref).threshold.value == 1e9
    assert not any(p.is_defect for p in pre_annotations(load_version(catalog, store, ref), store, rows, ref).values())
    assert load_model(catalog, store, ref).detector.threshold.value == 1e9  # what Serve loads
    actor = ScoreRows(row.artifact_uri, SIZE, 1, with_masks=True, threshold=version_threshold(row))
    out = actor({"record": np.array([r.to_json() for r in rows])})
    assert not out["verdict"].any()  # the cluster's pre-annotations too
    plain = ScoreRows(row.artifact_uri, SIZE, 1, with_masks=True)  # the artifact alone still says otherwise
    assert plain({"record": np.array([r.to_json() for r in rows])})["verdict"].any()
