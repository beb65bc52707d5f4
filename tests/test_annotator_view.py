"""What annotators see in pre-annotations: a score they can read (the share of held-out normal
images the image scores above, for every model) and a region only where the model localises."""

from __future__ import annotations

import numpy as np
import pytest

from flawline.evaluate.regions import MAX_REGION_SHARE, defect_mask
from flawline.evaluate.thresholds import normal_percentile, normal_quantiles


def test_readable_scores_are_the_share_of_normal_images_below():
    normals = np.arange(1.0, 101.0)  # 100 held-out normal scores, in whatever units
    q = normal_quantiles(normals)
    got = normal_percentile(q, np.array([0.0, 50.5, 100.0, 1e6]))
    assert got == pytest.approx([0.0, 0.5, 1.0, 1.0], abs=0.01)
    assert normal_percentile(None, np.array([3.0])) is None  # no record: nothing shown, not a raw score
    # the same meaning whatever the units: an affine change of the scores changes nothing
    assert normal_percentile(normal_quantiles(normals * 1e4 - 7), np.array([50.5 * 1e4 - 7])) == pytest.approx([0.5],
                                                                                                           abs=0.01)


def test_a_region_only_where_the_model_localises():
    amap = np.zeros((32, 32), np.float32)
    amap[10:14, 20:24] = 4.0  # a small peak, in map units below the image threshold (another scale)
    th = {"value": 10.0, "method": "youden"}
    assert not defect_mask(amap, th, False).any()  # judged normal: no region
    peak = defect_mask(amap, th, True)  # judged defective: the peak's region
    assert peak.sum() == 16 and peak[10:14, 20:24].all()
    assert not defect_mask(amap, th).any()  # no verdict given: the threshold's pixels only
    broad = np.ones((32, 32), np.float32) * 20.0  # everything above the threshold: locates nothing
    broad[0, 0] = 0.0
    assert not defect_mask(broad, th, True).any()
    half = np.zeros((32, 32), np.float32)
    half[:, :12] = 20.0  # 37 % of the image
    assert 12 / 32 > MAX_REGION_SHARE and not defect_mask(half, th, True).any()


def test_a_threshold_change_is_a_new_prediction_version():
    """Verdicts depend on the threshold: a threshold set by hand gives pre-annotations a new
    version, so the next push updates open tasks and the queue never mixes old and new verdicts."""
    from flawline.evaluate import thresholds as th
    from flawline.labelstudio.convert import prediction_version

    assert prediction_version("tiles-padim:1", None) == "tiles-padim:1"
    trained = prediction_version("tiles-padim:1", th.quantile(np.arange(100.0), 0.99))
    by_hand = prediction_version("tiles-padim:1", th.manual(450.0).as_dict())
    assert by_hand == "tiles-padim:1 (threshold 450)" and trained != by_hand
