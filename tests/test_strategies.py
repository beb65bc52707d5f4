"""Active-learning query strategies on small synthetic pools: counts, orderings, k-center coverage,
chunking, the hybrid's prefilter, seeding, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flawline.active import (
    PoolScores,
    Selection,
    k_center_greedy,
    list_strategies,
    make_strategy,
    select,
    select_k_center,
    strategy_names,
)
from flawline.errors import InvalidInput

ALL = ["entropy", "hybrid", "k_center", "margin", "near_threshold", "random", "top_score"]
N_BLOBS, PER_BLOB, DIM = 5, 40, 16


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5 well-separated Gaussian blobs (centres 50 apart, spread 0.5): embeddings and blob labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(N_BLOBS, DIM) * 50.0
    labels = np.repeat(np.arange(N_BLOBS), PER_BLOB)
    emb = centres[labels] + 0.5 * rng.standard_normal((N_BLOBS * PER_BLOB, DIM))
    return emb.astype(np.float32), labels


def make_pool(seed: int = 0, *, probs: bool = True, embeddings: bool = True,
              threshold: float | None = 0.3) -> PoolScores:
    rng = np.random.default_rng(seed)
    emb, _ = blobs(seed)
    n = emb.shape[0]
    scores = rng.random(n)
    p = None
    if probs:
        logits = 3.0 * rng.standard_normal((n, 3))
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return PoolScores(image_ids=1000 + 7 * np.arange(n), scores=scores, probs=p,
                      embeddings=emb if embeddings else None, threshold=threshold)


def positions(pool: PoolScores, sel: Selection) -> np.ndarray:
    lookup = {int(i): k for k, i in enumerate(pool.image_ids)}
    return np.array([lookup[int(i)] for i in sel.image_ids])


# ----------------------------------------------------------------------------------------- basics


def test_registry_lists_every_strategy_with_a_description():
    assert strategy_names() == ALL
    listed = dict(list_strategies())
    assert sorted(listed) == ALL
    assert all(desc and "\n" not in desc for desc in listed.values())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [1, 7, 30])
def test_each_strategy_returns_budget_unique_ids_from_the_pool(name, budget):
    pool = make_pool()
    sel = select(pool, name, budget, seed=1)
    assert isinstance(sel, Selection) and sel.strategy == name
    assert len(sel) == budget == len(sel.priority)
    assert len(set(sel.image_ids.tolist())) == budget
    assert set(sel.image_ids.tolist()) <= set(pool.image_ids.tolist())
    assert np.isfinite(sel.priority).all()
    if name in ("k_center", "hybrid"):  # farthest-first: distances only shrink (after the seed pick)
        assert (np.diff(sel.priority[1:]) <= 1e-6).all()
    elif name != "random":  # most valuable first
        assert (np.diff(sel.priority) <= 0).all()


@pytest.mark.parametrize("name", ALL)
def test_budget_covering_the_pool_returns_everything_ranked(name):
    pool = make_pool()
    sel = select(pool, name, len(pool) + 50)
    assert sorted(sel.image_ids.tolist()) == sorted(pool.image_ids.tolist())


# --------------------------------------------------------------------------------------- orderings


def test_top_score_picks_the_highest_scores_in_order():
    pool = make_pool()
    sel = select(pool, "top_score", 10)
    expected = np.argsort(-pool.scores)[:10]
    assert positions(pool, sel).tolist() == expected.tolist()
    np.testing.assert_allclose(sel.priority, pool.scores[expected])


def test_near_threshold_picks_the_closest_scores():
    pool = make_pool(threshold=0.3)
    sel = select(pool, "near_threshold", 10)
    dist = np.abs(pool.scores - 0.3)
    assert positions(pool, sel).tolist() == np.argsort(dist)[:10].tolist()
    assert dist[positions(pool, sel)].max() <= np.sort(dist)[10]


def test_near_threshold_without_a_threshold_uses_the_median():
    pool = make_pool(threshold=None)
    sel = select(pool, "near_threshold", 5)
    dist = np.abs(pool.scores - np.median(pool.scores))
    assert positions(pool, sel).tolist() == np.argsort(dist, kind="stable")[:5].tolist()


def test_margin_and_entropy_pick_the_most_uncertain_probs():
    pool = make_pool()
    probs = pool.probs
    entropy = -(probs * np.log(np.clip(probs, 1e-6, 1))).sum(1)
    top2 = np.sort(probs, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    assert positions(pool, select(pool, "entropy", 8)).tolist() == np.argsort(-entropy)[:8].tolist()
    assert positions(pool, select(pool, "margin", 8)).tolist() == np.argsort(margin)[:8].tolist()


def test_binary_uncertainty_from_probability_scores():
    scores = np.array([0.01, 0.97, 0.52, 0.3, 0.45, 0.9, 0.0, 1.0])
    pool = PoolScores(np.arange(8), scores)
    for name in ("entropy", "margin"):
        sel = select(pool, name, 3)
        assert sel.image_ids.tolist() == [2, 4, 3], name  # nearest p = 0.5 first
    np.testing.assert_allclose(select(pool, "margin", 1).priority, [1 - abs(2 * 0.52 - 1)])


def test_binary_uncertainty_refuses_raw_anomaly_scores():
    pool = PoolScores(np.arange(4), np.array([0.5, 3.2, 12.0, 0.1]))
    with pytest.raises(InvalidInput, match="needs probs, or scores that are probabilities"):
        select(pool, "entropy", 2)


# ---------------------------------------------------------------------------------------- k-center


def test_k_center_picks_one_point_per_blob():
    emb, labels = blobs()
    pool = PoolScores(np.arange(len(emb)), np.zeros(len(emb)), embeddings=emb)
    sel = select(pool, "k_center", N_BLOBS)
    assert sorted(labels[sel.image_ids].tolist()) == list(range(N_BLOBS))
    assert (sel.priority[1:] > 40).all()  # each later pick is a blob away from the others


def test_k_center_with_labelled_centres_goes_to_the_uncovered_blobs_first():
    emb, labels = blobs()
    labelled, _ = blobs(seed=9)
    labelled = labelled[np.isin(np.repeat(np.arange(N_BLOBS), PER_BLOB), [0, 1, 2])][::10]
    pool = PoolScores(np.arange(len(emb)), np.zeros(len(emb)), embeddings=emb)
    sel = select(pool, "k_center", 4, labelled_embeddings=labelled)
    assert sorted(labels[sel.image_ids[:2]].tolist()) == [3, 4]
    assert (sel.priority[:2] > 40).all() and (sel.priority[2:] < 10).all()


def reference_k_center(x: torch.Tensor, k: int, centers: torch.Tensor | None) -> tuple[list[int], list[float]]:
    """Unchunked textbook greedy: full distance matrices, exact differences."""
    x = x.double()
    chosen: list[int] = []
    prio: list[float] = []
    if centers is not None:
        d = torch.cdist(x, centers.double()).min(1).values
    else:
        d0 = (x - x.mean(0)).norm(dim=1)
        first = int(d0.argmax())
        chosen, prio = [first], [float(d0[first])]
        d = (x - x[first]).norm(dim=1)
        d[first] = -1
    while len(chosen) < k:
        nxt = int(d.argmax())
        chosen.append(nxt)
        prio.append(float(d[nxt]))
        d = torch.minimum(d, (x - x[nxt]).norm(dim=1))
        d[chosen] = -1
    return chosen, prio


@pytest.mark.parametrize("with_centers", [False, True])
@pytest.mark.parametrize("chunk_size", [5, 64, 10_000])
def test_k_center_chunked_matches_unchunked_reference(with_centers, chunk_size):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g)
    centers = torch.randn(23, 8, generator=g) if with_centers else None
    ref_idx, ref_prio = reference_k_center(x, 25, centers)
    idx, prio = k_center_greedy(x, 25, centers, chunk_size=chunk_size)
    assert idx.tolist() == ref_idx
    np.testing.assert_allclose(prio.numpy(), ref_prio, rtol=1e-4, atol=1e-4)
    assert select_k_center(x, 25, centers, chunk_size=chunk_size).tolist() == ref_idx


def test_k_center_strategy_chunk_size_does_not_change_the_picks():
    pool = make_pool()
    a = make_strategy("k_center", chunk_size=3).select(pool, 12)
    b = make_strategy("k_center").select(pool, 12)
    assert a.image_ids.tolist() == b.image_ids.tolist()


# ------------------------------------------------------------------------------------------ hybrid


def test_hybrid_picks_within_the_uncertain_set_and_covers_distinct_blobs():
    emb, labels = blobs()
    rng = np.random.default_rng(5)
    n = len(emb)
    scores = np.where(rng.random(n) < 0.5, 0.05, 0.95) + 0.02 * rng.random(n)  # far from 0.5 ...
    near = np.concatenate([np.flatnonzero(labels == b)[:4] for b in range(N_BLOBS)])
    scores[near] = 0.5 + rng.uniform(-0.01, 0.01, len(near))  # ... except 4 per blob
    # blob 0's uncertain images are the very closest: pure near_threshold would spend the budget there
    scores[near[:4]] = 0.5 + np.array([1e-5, -2e-5, 3e-5, -4e-5])
    pool = PoolScores(np.arange(n), scores, embeddings=emb, threshold=0.5)

    sel = select(pool, "hybrid", N_BLOBS, prefilter=4)
    assert set(sel.image_ids.tolist()) <= set(near.tolist())
    assert sorted(labels[sel.image_ids].tolist()) == list(range(N_BLOBS))
    assert len(set(labels[select(pool, "near_threshold", N_BLOBS).image_ids].tolist())) < N_BLOBS

    with_probs = PoolScores(np.arange(n), scores, embeddings=emb,
                            probs=np.stack([1 - scores, scores], 1))  # uses margin: same candidates
    sel = select(with_probs, "hybrid", N_BLOBS)
    assert set(sel.image_ids.tolist()) <= set(near.tolist())
    assert sorted(labels[sel.image_ids].tolist()) == list(range(N_BLOBS))


def test_hybrid_prefilter_one_keeps_the_most_uncertain():
    pool = make_pool()
    sel = select(pool, "hybrid", 6, prefilter=1)
    assert set(sel.image_ids.tolist()) == set(select(pool, "margin", 6).image_ids.tolist())


# ------------------------------------------------------------------------------------------ random


def test_random_is_reproducible_per_seed_and_differs_across_seeds():
    pool = make_pool()
    a = select(pool, "random", 20, seed=1)
    b = select(pool, "random", 20, seed=1)
    c = select(pool, "random", 20, seed=2)
    assert a.image_ids.tolist() == b.image_ids.tolist()
    assert a.image_ids.tolist() != c.image_ids.tolist()


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_bad_budget(budget):
    with pytest.raises(InvalidInput, match="budget"):
        select(make_pool(), "top_score", budget)


@pytest.mark.parametrize("name", ["k_center", "hybrid"])
def test_missing_embeddings(name):
    pool = make_pool(embeddings=False)
    with pytest.raises(InvalidInput) as err:
        select(pool, name, 3)
    assert str(err.value) == f"strategy {name!r} needs embeddings of the pool; score it with embeddings"


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=np.zeros(9)), r"scores have shape \(9,\) but there are 10 image_ids"),
    (dict(probs=np.full((9, 2), 0.5)), r"probs have shape \(9, 2\) but there are 10 image_ids"),
    (dict(probs=np.ones((10, 1))), r"expected \(10, C\) with C >= 2"),
    (dict(probs=np.full((10, 2), 3.0)), "pass softmax outputs, not logits"),
    (dict(embeddings=np.zeros((11, 4))), r"embeddings have shape \(11, 4\) but there are 10 image_ids"),
    (dict(embeddings=np.zeros(10)), r"embeddings have shape \(10,\)"),
    (dict(image_ids=np.arange(10).reshape(2, 5)), "image_ids must be one-dimensional"),
    (dict(image_ids=np.array([1, 2, 2, 3, 4, 5, 6, 7, 8, 9])), r"image_ids repeat: \[2\]"),
    (dict(image_ids=np.array([], dtype=int), scores=np.array([])), "the pool is empty"),
    (dict(scores=np.array([0.1] * 9 + [np.nan])), "scores hold 1 NaN"),
    (dict(threshold=float("inf")), "threshold must be finite"),
])
def test_bad_pool_shapes(kwargs, match):
    fields = dict(image_ids=np.arange(10), scores=np.linspace(0, 1, 10))
    fields.update(kwargs)
    with pytest.raises(InvalidInput, match=match) as err:
        PoolScores(**fields)
    assert "\n" not in str(err.value)


def test_labelled_embeddings_must_match_the_pool_dimension():
    with pytest.raises(InvalidInput, match=r"labelled_embeddings have shape \(3, 5\).*16 dimensions"):
        select(make_pool(), "k_center", 3, labelled_embeddings=np.zeros((3, 5)))


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(InvalidInput) as err:
        make_strategy("coreset")
    msg = str(err.value)
    assert "unknown query strategy 'coreset'" in msg
    assert all(name in msg for name in ALL)


def test_unknown_or_bad_options():
    with pytest.raises(InvalidInput, match="unknown option.*prefiltr.*takes: .*prefilter"):
        make_strategy("hybrid", prefiltr=2)
    with pytest.raises(InvalidInput, match="'top_score' got unknown option.*takes: no options"):
        make_strategy("top_score", budget=3)
    with pytest.raises(InvalidInput, match="prefilter must be a number >= 1"):
        make_strategy("hybrid", prefilter=0.5)
    with pytest.raises(InvalidInput, match="uncertainty 'foo' is not one of"):
        make_strategy("hybrid", uncertainty="foo")
