"""Memory-bank building blocks in bounded chunks, CPU or GPU: greedy k-center selection
(PatchCore's coreset; active learning's diversity sampling) and nearest-neighbour distances."""

from __future__ import annotations

import math

import torch


def _greedy_k_center(x: torch.Tensor, k: int, first: int, min_dist: torch.Tensor | None = None) -> torch.Tensor:
    """Exact greedy k-center on ``x`` [n, d]: each step takes the point farthest from the chosen."""
    n = x.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    sq = (x * x).sum(1)
    dist = torch.full((n,), float("inf"), device=x.device) if min_dist is None else min_dist.clone()
    nxt = first
    for i in range(k):
        chosen[i] = nxt
        centre = x[nxt]
        # ||x - c||^2 as ||x||^2 - 2 x.c + ||c||^2: one mat-vec per step.
        d = sq - 2.0 * (x @ centre) + sq[nxt]
        torch.minimum(dist, d, out=dist)
        dist[nxt] = -1.0
        nxt = int(torch.argmax(dist))
    return chosen


def select_k_center(
    features: torch.Tensor,
    k: int,
    *,
    projection_dim: int | None = 128,
    chunk_size: int = 65_536,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` [n, d] chosen by greedy k-center (farthest-first).

    Distances are taken in a random Gaussian projection to ``projection_dim`` dimensions (the
    Johnson–Lindenstrauss trick PatchCore uses). Rows are processed in random chunks of at most
    ``chunk_size``, each getting its share of ``k``: memory stays bounded and each step costs
    O(chunk · d) instead of O(n · d) — greedy within a chunk, not across all rows.
    """
    n = features.shape[0]
    if k <= 0 or n == 0:
        raise ValueError("select_k_center needs k > 0 and at least one row")
    if k >= n:
        return torch.arange(n, device=features.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    order = torch.randperm(n, generator=gen).to(x.device)
    n_chunks = max(1, math.ceil(n / chunk_size))
    bounds = [round(i * n / n_chunks) for i in range(n_chunks + 1)]
    shares = [round(k * bounds[i + 1] / n) - round(k * bounds[i] / n) for i in range(n_chunks)]
    picked = []
    for i in range(n_chunks):
        rows = order[bounds[i]:bounds[i + 1]]
        if shares[i] <= 0:
            continue
        first = int(torch.randint(len(rows), (1,), generator=gen))
        picked.append(rows[_greedy_k_center(x[rows], min(shares[i], len(rows)), first)])
    return torch.cat(picked)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk_size: int = 1024
                      ) -> torch.Tensor:
    """Euclidean distances [q, k] from each query row to its ``k`` nearest ``bank`` rows,
    computed ``chunk_size`` queries at a time (bounded memory: chunk_size × len(bank) floats).

    ||q - b||^2 = ||q||^2 + (||b||^2 - 2 q.b): the bracket is one fused GEMM (addmm) per chunk,
    and ||q||^2 is added after the minimum, so each block is read once."""
    out = []
    bank_sq = (bank * bank).sum(1)
    bank_t = bank.T
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size]
        partial = torch.addmm(bank_sq, q, bank_t, alpha=-2.0)
        vals = torch.topk(partial, k, dim=1, largest=False).values if k > 1 else partial.min(1, keepdim=True).values
        out.append((vals + (q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
    return torch.cat(out)
