"""Batched weighted 1-D k-means against its exact dynamic-programming optimum and its own invariants."""

from __future__ import annotations

import itertools

import pytest
import torch

from sqllm.codes import fp16_grid
from sqllm.quant.kmeans import (
    _dp,
    _sort_rows,
    exact_weighted_kmeans_1d,
    weighted_kmeans,
    weighted_kmeans_objective,
)


def _rows(kind: str, rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random rows shaped like LLM weights (Gaussian / heavy-tailed) with Fisher-like weights."""
    torch.manual_seed(seed)
    if kind == "normal-uniform":
        return torch.randn(rows, n), torch.rand(rows, n)
    if kind == "laplace-gamma":  # spiky weights: most near 0, a few dominate
        x = torch.distributions.Laplace(0.0, 1.0).sample((rows, n))
        return x, torch.distributions.Gamma(0.5, 1.0).sample((rows, n))
    # Student-t(3) values, weights ~ x^2 (squared gradients grow with |w|): heavy points in the tails.
    x = torch.distributions.StudentT(3.0).sample((rows, n))
    return x, x**2 * torch.rand(rows, n) + 1e-3


def _brute_force(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Least weighted SSE of one short row over all partitions of its sorted values into k runs."""
    xs, order = x.double().sort()
    ws = w.double()[order]
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(xs)), k - 1):
        total = 0.0
        for lo, hi in zip((0, *cuts), (*cuts, len(xs))):
            seg, sw = xs[lo:hi], ws[lo:hi]
            total += float((sw * (seg - (sw * seg).sum() / sw.sum()) ** 2).sum())
        best = min(best, total)
    return best


def test_exact_dp_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 9, generator=gen), torch.rand(4, 9, generator=gen) + 0.1
    c, codes = exact_weighted_kmeans_1d(x, w, 3)
    got = weighted_kmeans_objective(x, w, c, codes)
    want = torch.tensor([_brute_force(x[i], w[i], 3) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("k", [4, 8, 16])
@pytest.mark.parametrize("kind", ["normal-uniform", "laplace-gamma", "t3-squared"])
def test_close_to_exact_optimum(kind, k):
    x, w = _rows(kind, 40, 64, seed=0)
    ours = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, k))
    exact = weighted_kmeans_objective(x, w, *exact_weighted_kmeans_1d(x, w, k))
    assert bool((ours >= exact * (1 - 1e-9)).all())  # the DP really is a lower bound
    ratio = ours / exact
    assert ratio.mean() <= 1.005, f"mean objective ratio {ratio.mean():.5f} to the exact optimum"
    assert ratio.max() <= 1.25, f"worst row {ratio.max():.4f} of the exact optimum"


@pytest.mark.parametrize("k", [2, 3, 5])
def test_dp_over_every_place_is_exact(k):
    # The polishing DP restricted to candidate places is exact when every place is a candidate.
    x, w = _rows("laplace-gamma", 6, 12, seed=8)
    r, order = _sort_rows(x, w)
    cand = torch.arange(13).expand(6, 1, k - 1, 13)
    b = _dp(r, cand).squeeze(1)
    w_seg, s_seg, q_seg = torch.diff(r.p.gather(2, b.unsqueeze(1).expand(-1, 3, -1)), dim=-1).unbind(1)
    ours = (q_seg - s_seg**2 / w_seg.clamp_min(1e-300)).sum(1)
    exact = weighted_kmeans_objective(x, w, *exact_weighted_kmeans_1d(x, w, k))
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-12)


def test_split_merge_rounds_help():
    x, w = _rows("laplace-gamma", 40, 64, seed=2)
    plain = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, 8, refine_rounds=0))
    refined = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, 8))
    # Per row either may win (the final DPs start from different points); in total the rounds win.
    assert refined.sum() < 0.99 * plain.sum()


def test_fisher_weighting_lowers_weighted_error():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 256, generator=gen)
    fisher = torch.rand(16, 256, generator=gen) ** 8  # a few sensitive values dominate
    weighted = weighted_kmeans_objective(x, fisher, *weighted_kmeans(x, fisher, 8))
    unweighted = weighted_kmeans_objective(x, fisher, *weighted_kmeans(x, None, 8))
    assert bool((weighted < unweighted).all())
    assert weighted.sum() < 0.7 * unweighted.sum()


@pytest.mark.parametrize("k", [4, 8, 16])
def test_outputs_sorted_nearest_and_deterministic(k):
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(32, 100, generator=gen), torch.rand(32, 100, generator=gen)
    c, codes = weighted_kmeans(x, w, k, seed=7)
    assert c.shape == (32, k) and c.dtype == torch.float32
    assert codes.shape == (32, 100) and codes.dtype == torch.uint8
    assert bool((c.diff(dim=1) >= 0).all())
    dist = (x[:, :, None] - c[:, None, :]).abs()
    chosen = dist.gather(2, codes.long()[:, :, None]).squeeze(2)
    assert torch.equal(chosen, dist.min(dim=2).values)  # every code is a nearest centroid
    c2, codes2 = weighted_kmeans(x, w, k, seed=7)
    assert torch.equal(c, c2) and torch.equal(codes, codes2)


def test_runs_on_one_thread_and_restores_the_callers_setting():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x, w = _rows("normal-uniform", 8, 32, seed=9)
        weighted_kmeans(x, w, 4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_seed_changes_random_starts_only():
    x, w = _rows("laplace-gamma", 64, 64, seed=5)
    a = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, 8, seed=0))
    b = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, 8, seed=1))
    assert not torch.equal(a, b)
    torch.testing.assert_close(a.sum(), b.sum(), rtol=0.02, atol=0)


def test_zero_weight_rows_fall_back_to_unweighted():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 80, generator=gen)
    w = torch.rand(6, 80, generator=gen)
    w[2] = 0.0
    c, codes = weighted_kmeans(x, w, 4)
    c_plain, codes_plain = weighted_kmeans(x[2:3], None, 4)
    assert torch.equal(c[2:3], c_plain) and torch.equal(codes[2:3], codes_plain)
    assert bool(torch.isfinite(c).all())


def test_zero_weight_values_and_few_distinct_values():
    # Zero-weight values (extracted outliers) must not pull centroids; k above the number of
    # distinct values leaves clusters without weight, which still get finite, sorted centroids.
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 100.0, 2.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    c, codes = weighted_kmeans(x, w, 4)
    assert weighted_kmeans_objective(x, w, c, codes).item() == 0.0
    assert bool((c.diff(dim=1) >= 0).all()) and bool(torch.isfinite(c).all())


def test_snap_rounds_centroids_before_assignment():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 64, generator=gen) * 1e-2
    c, codes = weighted_kmeans(x, None, 8, snap=fp16_grid)
    assert torch.equal(c, fp16_grid(c))
    dist = (x[:, :, None] - c[:, None, :]).abs()
    assert torch.equal(dist.gather(2, codes.long()[:, :, None]).squeeze(2), dist.min(dim=2).values)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4), 2), "weight shape"),
        ((torch.zeros(2, 3), -torch.ones(2, 3), 2), ">= 0"),
        ((torch.zeros(2, 3), None, 1), "k=1"),
        ((torch.zeros(3), None, 2), "rows, n"),
        ((torch.tensor([[0.0, float("nan")]]), None, 2), "NaN"),
    ],
)
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        weighted_kmeans(*args)


def test_no_rows_gives_empty_tables():
    c, codes = weighted_kmeans(torch.zeros(0, 12), torch.zeros(0, 12), 4)
    assert c.shape == (0, 4) and codes.shape == (0, 12) and codes.dtype == torch.uint8
