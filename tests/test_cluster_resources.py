"""The resource check behind submission, `runs show` and `status` (flawline.cluster.resources):
verdicts from given node totals, free amounts and holders; no Ray."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flawline.cluster.resources import ClusterResources, NodeResources, Pending, Request, check, fits
from flawline.train.spec import TrainSpec


def _cluster(*nodes: tuple[dict, dict | None], held: dict | None = None) -> ClusterResources:
    return ClusterResources([NodeResources(f"node{i}", "10.0.0.1", i == 0, {"memory": 1e9, **total}, free)
                             for i, (total, free) in enumerate(nodes)], held=held)


# The cluster: one 2-CPU node, Serve holding 1.5 CPUs.
SERVED = _cluster(({"CPU": 2.0}, {"CPU": 0.5}), held={"Serve replicas": {"CPU": 1.5}})
TWO = _cluster(({"CPU": 2.0, "slot": 1.0}, {"CPU": 2.0, "slot": 1.0}), ({"CPU": 2.0, "second_node": 2.0}, {"CPU": 2.0}))


def test_a_run_that_fits_but_not_now_waits_and_says_for_what():
    verdict = check(SERVED, Request({"CPU": 1.0}))
    assert verdict.ever and verdict.now is False and verdict.waits
    assert verdict.message == "waiting for 1 CPU (free: 0.5 of 2 CPU; held by: Serve replicas 1.5 CPU)"
    assert check(SERVED, Request({"CPU": 0.5})).now is True


@pytest.mark.parametrize("request_, words", [
    (Request({"CPU": 1.0, "nosuch": 1.0}), ["nosuch=1", "no node offers nosuch", "offer CPU, second_node, slot"]),
    (Request({"CPU": 3.0}), ["each worker asks for 3 CPU", "largest node has 2 CPU", "4 CPU on 2 node(s)"]),
    (Request({"CPU": 1.0, "GPU": 1.0}), ["1 GPU", "no node offers GPU"]),
    (Request({"CPU": 1.0, "slot": 1.0, "second_node": 1.0}), ["no node has all of it"]),
    (Request({"CPU": 1.5}, 3), ["3 workers × 1.5 CPU do not fit", "at most 2 at once"]),
    (Request({"CPU": 1.0, "slot": 1.0}, 2), ["at most 1 at once"]),
    (Request({"CPU": 1.0}, driver={"CPU": 4.0}), ["the job's driver asks for 4 CPU"]),
])
def test_a_request_no_node_set_can_ever_hold_is_refused_naming_the_resource(request_, words):
    verdict = check(TWO, request_)
    assert not verdict.ever and not verdict.waits
    assert "\n" not in verdict.message and all(w in verdict.message for w in words), verdict.message
    # An autoscaling cluster may add such a node: the job waits for it instead.
    scaled = check(TWO, request_, autoscaling=True)
    assert scaled.ever and scaled.waits and scaled.message.startswith("waiting for a node the autoscaler may add")


def test_bundles_pack_per_node_and_the_elastic_minimum_is_what_must_fit():
    # 2 × 1.5 CPU: 3 CPUs free in all, but only one node has 1.5 of them.
    busy = _cluster(({"CPU": 2.0}, {"CPU": 2.0}), ({"CPU": 2.0}, {"CPU": 1.0}))
    verdict = check(busy, Request({"CPU": 1.5}, 2))
    assert verdict.now is False
    assert verdict.message == ("waiting for room on the nodes for 2 workers × 1.5 CPU (room now for 1 of 2; free "
                               "per node: 2 CPU; 1 CPU)")
    # The job's driver (pinned to the head) counts too: named, with the head's free share.
    pinned = _cluster(({"CPU": 2.0, "node:__internal_head__": 1.0}, {"CPU": 0.5, "node:__internal_head__": 1.0}),
                      ({"CPU": 2.0}, {"CPU": 2.0}))
    verdict = check(pinned, Request({"CPU": 1.0}, 1, driver={"node:__internal_head__": 0.001, "CPU": 1.0}))
    assert verdict.now is False and verdict.message == (
        "waiting for room on the nodes for 1 worker × 1 CPU and the job's driver node:__internal_head__=0.001 + "
        "1 CPU (room now for 0 of 1; free per node: 0.5 CPU + node:__internal_head__=1; 2 CPU)"), verdict.message
    assert check(busy, Request({"CPU": 1.5}, 2, min_count=1)).now is True  # elastic: starts with one
    assert fits([{"CPU": 2.0}, {"CPU": 2.0}], Request({"CPU": 1.0}, 4), 4)
    assert not fits([{"CPU": 2.0}, {"CPU": 2.0}], Request({"CPU": 1.0}, 4, driver={"CPU": 1.0}), 4)
    assert fits([{"CPU": 3.0}, {"CPU": 2.0}], Request({"CPU": 1.0}, 4, driver={"CPU": 1.0}), 4)


def test_unknown_free_is_not_a_wait_and_the_summary_reports_free_and_pending():
    unknown = _cluster(({"CPU": 2.0}, None))
    assert check(unknown, Request({"CPU": 1.0})).now is None
    assert not check(unknown, Request({"CPU": 4.0})).ever  # the totals still refuse
    assert unknown.free("CPU") is None and unknown.summary()["cpus_free"] is None
    waiting = replace(SERVED, pending=[Pending("job flawline-run-3-abc", "placement group", [{"CPU": 1.0}] * 2)])
    summary = waiting.summary()
    assert (summary["cpus"], summary["cpus_free"], summary["gpus"], summary["gpus_free"]) == (2.0, 0.5, 0.0, 0.0)
    assert summary["held_by"] == {"Serve replicas": {"CPU": 1.5}}
    assert summary["pending"] == [{"holder": "job flawline-run-3-abc", "kind": "placement group",
                                   "bundles": [{"CPU": 1.0}, {"CPU": 1.0}], "cpus": 2.0, "gpus": 0.0}]
    assert waiting.pending[0].describe() == "2 × 1 CPU"


def test_a_runs_request_is_its_workers_bundle():
    spec = TrainSpec(datasets=["d"], setting="supervised", workers=3, min_workers=2, cpus_per_worker=1.5,
                     gpus_per_worker=0.5, worker_resources={"gpu_node": 1.0})
    from flawline.train.submit import run_request

    request = run_request(spec)
    assert request.bundle == {"CPU": 1.5, "GPU": 0.5, "gpu_node": 1.0}
    assert (request.count, request.start_count, request.driver) == (3, 2, {})
    assert TrainSpec(datasets=["d"], setting="supervised").worker_bundle() == {"CPU": 1.0}


def test_what_is_pending_but_fits_now_is_not_a_wait_and_placement_constraints_are_not_shown():
    """A job's supervisor actor is pending for a moment at every start, pinned to the head node by a
    ``node:__internal_head__`` share: that is scheduling, not waiting (a trial printed "waiting for
    room … for 1 actor × node:__internal_head__=0.001 (room now for 0 of 1; free per node:
    node:__internal_head__=0.999)"). What does not fit is still a wait, named without the pin."""
    from flawline.cluster.resources import JOB_PREFIX, pending_line

    head = {"CPU": 2.0, "node:__internal_head__": 1.0}
    supervisor = Pending(JOB_PREFIX + "s1", "actor", [{"node:__internal_head__": 0.001}])
    starting = ClusterResources([NodeResources("node0", "10.0.0.1", True, head, {**head, "CPU": 0.5})],
                                pending=[supervisor])
    assert pending_line(starting, "s1") is None
    model_actor = Pending(JOB_PREFIX + "s1", "actor", [{"CPU": 1.0, "node:__internal_head__": 0.001}])
    busy = replace(starting, pending=[model_actor])
    line = pending_line(busy, "s1")
    assert line is not None and line.startswith("waiting for 1 CPU (free: 0.5 of 2 CPU")
    assert "node:" not in line
    fits_now = replace(starting, pending=[Pending(JOB_PREFIX + "s1", "actor", [{"CPU": 0.5}])])
    assert pending_line(fits_now, "s1") is None and pending_line(busy, "other") is None
