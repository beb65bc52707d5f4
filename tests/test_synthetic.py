"""The synthetic-defect generator: deterministic, marks exactly what it changed, never empty."""

from __future__ import annotations

import torch

from flawline.data.synthetic import SyntheticDefects, cutpaste, perlin_mask, perlin_noise


def test_perlin_noise_is_smooth_and_seeded():
    a = perlin_noise(64, 64, (4, 4), torch.Generator().manual_seed(1))
    b = perlin_noise(64, 64, (4, 4), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.abs().max() <= 1.5
    assert (a[:, 1:] - a[:, :-1]).abs().max() < 0.3  # neighbouring pixels differ little


def test_masks_never_empty_and_bounded():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = perlin_mask(64, g)
        assert 0 < m.float().mean() <= 0.25


def test_cutpaste_marks_what_changed():
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    out, mask = cutpaste(img, torch.Generator().manual_seed(4))
    changed = (out - img).abs().amax(0) > 0.02
    assert torch.equal(changed, mask)


def test_batch_generator_is_reproducible_and_outside_untouched():
    x = torch.rand(8, 3, 48, 48, generator=torch.Generator().manual_seed(5)) * 0.2 + 0.4
    y1, m1 = SyntheticDefects(cutpaste_prob=0.0)(x, torch.Generator().manual_seed(6))
    y2, m2 = SyntheticDefects(cutpaste_prob=0.0)(x, torch.Generator().manual_seed(6))
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    assert all(m.any() for m in m1)
    assert torch.equal(y1.permute(1, 0, 2, 3)[:, ~m1], x.permute(1, 0, 2, 3)[:, ~m1])
