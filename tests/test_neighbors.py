"""Greedy k-center and nearest-neighbour search against brute force."""

from __future__ import annotations

import torch

from flawline.models.neighbors import nearest_distances, select_k_center


def brute_greedy(x: torch.Tensor, k: int, first: int) -> list[int]:
    chosen = [first]
    for _ in range(k - 1):
        d = torch.cdist(x, x[chosen]).min(1).values
        d[chosen] = -1
        chosen.append(int(d.argmax()))
    return chosen


def test_single_chunk_equals_exact_greedy():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    idx = select_k_center(x, 12, projection_dim=None, chunk_size=10_000, seed=3)
    first = int(idx[0])
    assert idx.tolist() == brute_greedy(x, 12, first)


def test_k_center_covers_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    x = torch.cat([c + 0.1 * torch.randn(500, 2, generator=g) for c in centres])
    idx = select_k_center(x, 4, projection_dim=None, chunk_size=10_000)
    assert len({int(i) // 500 for i in idx}) == 4  # one pick per cluster, never two in one


def test_chunked_selection_is_bounded_and_distinct():
    x = torch.randn(5000, 16, generator=torch.Generator().manual_seed(2))
    idx = select_k_center(x, 100, projection_dim=8, chunk_size=700)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert select_k_center(x[:10], 50).tolist() == list(range(10))


def test_nearest_distances_match_cdist():
    g = torch.Generator().manual_seed(4)
    q, bank = torch.randn(1000, 32, generator=g), torch.randn(333, 32, generator=g)
    ref = torch.cdist(q, bank)
    got = nearest_distances(q, bank, k=1, chunk_size=128)
    torch.testing.assert_close(got[:, 0], ref.min(1).values, rtol=1e-4, atol=1e-4)
    got3 = nearest_distances(q, bank, k=3, chunk_size=77)
    torch.testing.assert_close(got3, ref.topk(3, largest=False).values, rtol=1e-4, atol=1e-4)
