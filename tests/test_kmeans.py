"""Exact weighted 1-D k-means against a brute-force dynamic program, and its output contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sqllm.codes import fp16_grid
from sqllm.quant import kmeans
from sqllm.quant.kmeans import value_faults, weighted_kmeans, weighted_kmeans_objective

KINDS = ["normal-uniform", "laplace-gamma", "t3-squared", "tiny-weights", "repeated-values", "some-zero-weights",
         "adjacent-floats"]


def _rows(kind: str, rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random rows shaped like LLM weights with Fisher-like weights, and the hard cases."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen)
    u = torch.rand(rows, n, generator=gen)
    if kind == "normal-uniform":
        return x, u
    if kind == "laplace-gamma":  # spiky weights: most near 0, a few dominate
        lap = torch.distributions.Laplace(0.0, 1.0).sample((rows, n))
        return lap, torch.distributions.Gamma(0.5, 1.0).sample((rows, n))
    if kind == "t3-squared":  # heavy tails, weights ~ x^2 as squared gradients grow with |w|
        t = torch.distributions.StudentT(3.0).sample((rows, n))
        return t, t**2 * u + 1e-3
    if kind == "tiny-weights":  # weights spanning 30 decades: prefix sums lose the smallest
        return x, u**12
    if kind == "repeated-values":  # a block grid, as weights dequantized from Q4 or stored in bf16
        return torch.round(x * 3) / 3, u
    if kind == "adjacent-floats":  # values a few ulps apart, shuffled: the sort's radix alone misorders them
        ulps = torch.randint(0, 600, (rows, n), generator=gen).float()
        signs = torch.where(u > 0.5, 1.0, -1.0)
        return signs * (1 + ulps * 2.0**-23) + (x > 1.5) * 2.0**-20, u
    if kind == "some-zero-weights":
        return x, u * (u > 0.3)  # extracted outliers carry weight 0
    raise ValueError(kind)


def _interval_costs(xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``[rows, n + 1, n + 1]`` weighted SSE of the sorted values ``[j, i)`` around their mean, each summed
    directly (two passes, no prefix sums); ``inf`` where ``j > i``."""
    n = xs.shape[1]
    j = torch.arange(n + 1).view(-1, 1, 1)
    i = torch.arange(n + 1).view(1, -1, 1)
    member = ((torch.arange(n) >= j) & (torch.arange(n) < i)).double()  # [j, i, t]
    wm = ws[:, None, None, :] * member
    mean = (wm * xs[:, None, None, :]).sum(-1) / wm.sum(-1).clamp_min(1e-300)
    sse = (wm * (xs[:, None, None, :] - mean[..., None]) ** 2).sum(-1)
    return sse.masked_fill((j > i).squeeze(-1), float("inf"))


def brute_force_dp(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows]`` least weighted SSE over all partitions of each sorted row into at most ``k`` runs, by
    the ``O(k n^2)`` DP over every pair of places (``D_m(i) = min_j D_{m-1}(j) + SSE(j, i)``)."""
    xs, order = x.double().sort(1)
    ws = w.double().gather(1, order)
    cost = _interval_costs(xs, ws)
    best = cost[:, 0, :]
    for _ in range(k - 1):
        best = torch.minimum(best, (best[:, :, None] + cost).min(1).values)
    return best[:, -1]


def prefix_dp(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows]`` least weighted SSE of each row in at most ``k`` runs of its sorted distinct values (weights
    summed, weightless values dropped): the ``O(k N^2)`` DP over every pair of places, with float64 prefix
    sums for the costs, which keeps rows of hundreds of values cheap (``brute_force_dp`` is ``O(n^3)``)."""
    best_rows = []
    for xr, wr in zip(x.double(), w.double()):
        keep = wr > 0
        xs, inv = torch.unique(xr[keep], return_inverse=True)
        ws = torch.zeros_like(xs).index_add_(0, inv, wr[keep])
        zero = torch.zeros(1, dtype=torch.float64)
        big_w, big_s, big_q = (torch.cat([zero, t.cumsum(0)]) for t in (ws, ws * xs, ws * xs * xs))
        d_s = big_s[None, :] - big_s[:, None]  # [j, i]: the run [j, i)
        cost = (big_q[None, :] - big_q[:, None]) - d_s * d_s / (big_w[None, :] - big_w[:, None])
        n = len(xs) + 1
        cost = cost.masked_fill(~torch.ones(n, n, dtype=torch.bool).triu(1), float("inf"))
        best = cost[0]
        for _ in range(k - 1):
            best = torch.minimum(best, (best[:, None] + cost).min(0).values)
        best_rows.append(best[-1])
    return torch.stack(best_rows)


def _grid_rows(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows as the benchmark sees them: values on a 4-bit grid per block of 32 (scale and offset per
    block, as dequantized from Q4_1), so about half of them repeat; weights ``x**2 * Gamma(0.5, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, n // 32, 32), generator=gen).float()
    scale = 0.002 + 0.01 * torch.rand(rows, n // 32, 1, generator=gen)
    offset = -8 * scale + 0.001 * torch.randn(rows, n // 32, 1, generator=gen)
    x = (offset + scale * q).view(rows, n)
    return x, x**2 * torch.randn(rows, n, generator=gen) ** 2 / 2


def test_prefix_dp_is_brute_force_dp():
    for kind in ("laplace-gamma", "repeated-values"):
        x, w = _rows(kind, 8, 30, seed=2)
        got, want = prefix_dp(x, w, 4), brute_force_dp(x, w, 4)
        assert bool(((got - want).abs() <= 1e-9 * want + 1e-12 * (w.double() * x.double() ** 2).sum(1)).all())


@pytest.mark.parametrize("k", [8, 16])
@pytest.mark.parametrize("n", [576, 1536])
def test_objective_is_optimal_on_grid_rows_of_real_size(n, k):
    # Rows of the benchmark's sizes take every path of the solver (divide and conquer and Knuth
    # layers, the bound that prunes them, repeated values merged), which rows of 40 values do not.
    x, w = _grid_rows(4, n, seed=n + k)
    ours = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, k))
    exact = prefix_dp(x, w, k)
    floor = 1e-12 * (w.double() * x.double() ** 2).sum(1)
    assert bool(((ours - exact).abs() <= 1e-9 * exact + floor).all()), float(((ours - exact) / exact).abs().max())


def _exhaustive(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Least weighted SSE of one short row over every choice of k - 1 cuts of its sorted values."""
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


def test_brute_force_dp_is_exhaustive_search():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 9, generator=gen), torch.rand(4, 9, generator=gen) + 0.1
    want = torch.tensor([_exhaustive(x[i], w[i], 3) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(brute_force_dp(x, w, 3), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_objective_equals_brute_force_dp(kind, k):
    x, w = _rows(kind, 48, 40, seed=k)
    ours = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, k))
    exact = brute_force_dp(x, w, k)
    # Round-off floor: prefix sums carry sum(w x^2), so costs are exact to ~1e-16 of it; a weight
    # below 1e-16 of its row's total is dropped (tiny-weights), changing the cost on that scale.
    floor = 1e-12 * (w.double() * x.double() ** 2).sum(1)
    assert bool(((ours - exact).abs() <= 1e-9 * exact + floor).all()), float(((ours - exact) / exact).abs().max())


def test_scalar_build_matches_the_simd_build_bit_for_bit():
    if not kmeans._simd():
        pytest.skip("no AVX2 here: only the scalar build exists")
    x, w = _rows("t3-squared", 64, 300, seed=3)
    x[:, :5] = torch.tensor([7e4, -7e4, 1e-7, 65519.0, 3e-5])  # fp16 overflow, subnormals, a tie
    got = []
    for simd in (True, False):
        c, codes = torch.empty(64, 16), torch.empty(64, 300, dtype=torch.uint8)
        kmeans._native(simd).kmeans_rows(x.data_ptr(), w.data_ptr(), 64, 300, 16, 1, 1, c.data_ptr(), codes.data_ptr())
        got.append((c, codes))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


@pytest.mark.parametrize("k", [4, 8, 16])
def test_outputs_sorted_nearest_deterministic_and_thread_independent(k):
    x, w = _rows("normal-uniform", 40, 100, seed=4)
    c, codes = weighted_kmeans(x, w, k)
    assert c.shape == (40, k) and c.dtype == torch.float32
    assert codes.shape == (40, 100) and codes.dtype == torch.uint8
    assert bool((c.diff(dim=1) > 0).all())
    dist = (x[:, :, None] - c[:, None, :]).abs()
    chosen = dist.gather(2, codes.long()[:, :, None]).squeeze(2)
    assert torch.equal(chosen, dist.min(dim=2).values)  # every code is a nearest centroid
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c1, codes1 = weighted_kmeans(x, w, k)
        torch.set_num_threads(2)
        c2, codes2 = weighted_kmeans(x, w, k)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(c, c1) and torch.equal(c1, c2) and torch.equal(codes1, codes2)


def test_fp16_rounds_centroids_like_torch_then_assigns_nearest():
    x, w = _rows("laplace-gamma", 16, 64, seed=7)
    x = x * 1e-2
    c, _ = weighted_kmeans(x, w, 8)
    c16, codes = weighted_kmeans(x, w, 8, fp16=True)
    assert torch.equal(c16, fp16_grid(c))
    dist = (x[:, :, None] - c16[:, None, :]).abs()
    assert torch.equal(dist.gather(2, codes.long()[:, :, None]).squeeze(2), dist.min(dim=2).values)


def test_fisher_weighting_lowers_weighted_error():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 256, generator=gen)
    fisher = torch.rand(16, 256, generator=gen) ** 8  # a few sensitive values dominate
    weighted = weighted_kmeans_objective(x, fisher, *weighted_kmeans(x, fisher, 8))
    unweighted = weighted_kmeans_objective(x, fisher, *weighted_kmeans(x, None, 8))
    assert bool((weighted <= unweighted).all())
    assert weighted.sum() < 0.7 * unweighted.sum()


def test_zero_weight_rows_are_unweighted():
    x, w = _rows("normal-uniform", 6, 80, seed=6)
    w[2] = 0.0
    c, codes = weighted_kmeans(x, w, 4)
    c_plain, codes_plain = weighted_kmeans(x[2:3], None, 4)
    assert torch.equal(c[2:3], c_plain) and torch.equal(codes[2:3], codes_plain)


def test_zero_weight_values_and_few_distinct_values():
    # Zero-weight values (extracted outliers) must not pull centroids; with fewer distinct weighted
    # values than k, every one is a centroid and the spares repeat the largest.
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 100.0, 2.0]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    c, codes = weighted_kmeans(x, w, 4)
    assert c.tolist() == [[0.0, 1.0, 2.0, 2.0]]
    assert c.gather(1, codes.long()).tolist() == [[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]]


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4), 2), "weight shape"),
        ((torch.zeros(2, 3), -torch.ones(2, 3), 2), ">= 0"),
        ((torch.zeros(2, 3), torch.full((2, 3), float("inf")), 2), ">= 0"),
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


def _float64_objective(x, w, c, codes):
    """The objective on torch's float64 path (float64 inputs never take the library's)."""
    return weighted_kmeans_objective(x.double(), None if w is None else w.double(), c.double(), codes)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_objective_in_the_library_equals_the_float64_reference(weighted, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 301, generator=g).to(dtype)
    w = torch.rand(70, 301, generator=g) if weighted else None
    c, codes = weighted_kmeans(x, w, 8, fp16=True)
    want = _float64_objective(x, w, c, codes)
    got = weighted_kmeans_objective(x, w, c, codes)
    assert got.dtype == torch.float64 and got.shape == (70,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(weighted_kmeans_objective(x, w, c, codes), got)  # row sums do not depend on threads
    finally:
        torch.set_num_threads(threads)


def test_objective_refuses_codes_and_tables_that_do_not_fit():
    x = torch.randn(4, 10)
    c, codes = weighted_kmeans(x, None, 4)
    with pytest.raises(ValueError, match="some codes are 4 or more"):
        weighted_kmeans_objective(x, None, c, codes.clone().fill_(4))
    with pytest.raises(ValueError, match="centroids"):
        weighted_kmeans_objective(x, None, c[:3], codes)
    with pytest.raises(ValueError, match="weight shape"):
        weighted_kmeans_objective(x, torch.ones(4, 9), c, codes)


def test_value_faults_in_the_library_equal_torch():
    bad_values = [float("nan"), float("inf"), -float("inf"), -1e-30, -0.0, 0.0, 3.0]
    for a, b in itertools.product(bad_values, repeat=2):
        x = torch.ones(3, 5)
        w = torch.ones(3, 5)
        x[1, 2], w[2, 4] = a, b
        native = value_faults(x, w)
        on_torch = value_faults(x.t().contiguous().t(), w.double())  # not contiguous / not float32: torch
        assert native == on_torch, (a, b)
        assert native == (not math.isfinite(a), not (math.isfinite(b) and b >= 0))
