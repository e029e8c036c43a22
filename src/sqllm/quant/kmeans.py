"""Batched 1-D weighted k-means: one lookup table per row of a matrix (SqueezeLLM §3.2, Eq. 4).

Per row ``x: [n]`` with weights ``w: [n] >= 0`` we minimise ``sum_i w_i (x_i - c_{a(i)})^2`` over ``k``
centroids ``c`` and assignments ``a``. In 1-D every cluster of a nearest-centroid assignment is a
contiguous run of the sorted row, so after sorting each row once, a partition is just ``k + 1`` boundary
indices and every cluster statistic (weight, ``sum w x``, ``sum w x^2``) is a difference of prefix sums.
All search steps therefore cost ``O(k log n)`` per row; only the sort, the prefix sums and the final
code assignment touch every element.

Search, for all rows and several starts at once as batched tensor ops (``c: [rows, starts, k]``):

1. starts: equal shares of weight mass (weighted quantiles), equal widths over the row's range, and
   seeded random mass shares;
2. Lloyd: boundaries = midpoints of the sorted centroids (``searchsorted``), centroids = weighted
   segment means, until no boundary moves;
3. refinement rounds that leave Lloyd's local optima, each followed by Lloyd again: the best
   *split-merge* move (cut one cluster in two, merge the cheapest adjacent pair elsewhere) and a
   *pair re-split* (re-cut every adjacent pair at its best candidate point), applied only where they
   lower the objective, so the search cannot cycle;
4. the best start per row wins, and an exact DP over boundary windows (:func:`_window_dp`) lets
   neighbouring boundaries shift together, which none of the moves above does.

Rows leave the batch as soon as they settle, so the long tail of slow rows costs what those rows cost.

:func:`exact_weighted_kmeans_1d` solves the same problem exactly by dynamic programming (``O(k n^2)``)
and is the ground truth of the tests.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_RANDOM_STARTS = 2  # seeded random partitions beside the equal-mass and equal-width starts
_CUT_SHARES = 8  # a segment's candidate cuts split its index range into this many equal parts
_REFINE_ROUNDS = 32  # default cap on split-merge / re-split rounds (each relocates one centroid)
_KEEP_STARTS = 2  # starts per row that go on refining after the first round
_SPLIT_CANDIDATES = 4  # clusters of largest SSE searched for a split in each split-merge round
_INNER_ITERS = 10  # cap on the Lloyd runs before the last one; later runs finish their convergence
_WINDOW = 4  # places each boundary may move in _window_dp
_PAD = 3  # see _SortedRows.xp and _moved_boundaries
_EPS = 1e-12  # relative objective decrease a move must achieve (guards float64 round-off)


@dataclass(frozen=True)
class _SortedRows:
    """Rows sorted once, with float64 prefix sums in sorted order.

    xp: [rows, n + 6] float64 sorted values padded with 3 x -inf in front and 3 x +inf behind
        (``xs[i] = xp[i + 3]``), so windows around any boundary stay in range.
    p:  [rows, 3, n + 1] prefix sums (leading zero) of ``(w, w*x, w*x^2)``, stacked so one gather
        fetches all three statistics of a boundary.
    """

    xp: Tensor
    p: Tensor

    @property
    def n(self) -> int:
        return self.xp.shape[1] - 2 * _PAD

    def take(self, rows: Tensor) -> _SortedRows:
        """The rows selected by a bool mask or an index tensor."""
        return _SortedRows(self.xp[rows], self.p[rows])

    def x_at(self, idx: Tensor) -> Tensor:
        """Sorted values ``xs[r, idx[r, ...]]`` for ``idx: [rows, ...]`` in ``[-_PAD, n + _PAD)``."""
        return self.xp.gather(1, (idx + _PAD).flatten(1)).view(idx.shape)


def _effective_weight(x: Tensor, weight: Tensor | None) -> Tensor:
    """Weights ``[rows, n]`` (dtype of ``weight``); ``None`` or an all-zero row means unweighted (ones)."""
    if weight is None:
        return torch.ones_like(x)
    if weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("k-means weights must be finite and >= 0")
    # A row with no weight at all expresses no preference: plain k-means is the natural fallback.
    return torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))


def _sort_rows(x: Tensor, weight: Tensor | None) -> tuple[_SortedRows, Tensor]:
    """Sort every row of ``x: [rows, n]``. Returns the sorted rows and ``order: [rows, n]``
    (``xs = x.gather(1, order)``)."""
    w = _effective_weight(x, weight)
    x32 = x.float()  # fp32 sorts faster than fp64 and holds fp32/fp16/bf16 values exactly
    # numpy's row-wise argsort (SIMD quicksort) is ~4x faster than torch.sort here.
    order = torch.from_numpy(np.argsort(x32.numpy(), axis=1))
    rows, n = x.shape
    f64 = dict(dtype=torch.float64)
    # Written into preallocated buffers: these are the only passes over whole matrices.
    xp = torch.empty(rows, n + 2 * _PAD, **f64)
    xp[:, :_PAD], xp[:, n + _PAD :] = -float("inf"), float("inf")
    xs = xp[:, _PAD : n + _PAD]
    xs.copy_(x32.gather(1, order))
    ws = w.gather(1, order).to(torch.float64)
    p = torch.empty(rows, 3, n + 1, **f64)
    p[:, :, 0] = 0
    torch.cumsum(ws, 1, out=p[:, 0, 1:])
    wx = ws.mul_(xs)
    torch.cumsum(wx, 1, out=p[:, 1, 1:])
    torch.cumsum(wx.mul_(xs), 1, out=p[:, 2, 1:])
    return _SortedRows(xp, p), order


def _at(r: _SortedRows, idx: Tensor) -> Tensor:
    """Prefix statistics at boundary indices: ``idx: [rows, *shape] -> [rows, 3, *shape]``."""
    flat = idx.reshape(idx.shape[0], 1, -1).expand(-1, 3, -1)
    return r.p.gather(2, flat).view(idx.shape[0], 3, *idx.shape[1:])


def _sse(stats: Tensor) -> Tensor:
    """Weighted SSE around the weighted mean from segment statistics ``[rows, 3, ...]`` (0 if weightless)."""
    w, s, q = stats.unbind(1)
    # A weightless segment has s = q = 0 exactly (its prefix sums add only zeros), so 0 / tiny = 0.
    return (q - s * s / w.clamp_min(torch.finfo(w.dtype).tiny)).clamp_min(0)  # >= 0 despite cancellation


def _boundaries(r: _SortedRows, c: Tensor) -> Tensor:
    """Segment boundaries ``[rows, S, k + 1]`` of nearest-centroid assignment to sorted ``c: [rows, S, k]``.

    Cluster ``j`` is ``xs[b_j : b_{j+1}]``; values below the midpoint of ``c_j, c_{j+1}`` go to ``j``.
    """
    rows, starts, k = c.shape
    mid = (c[..., :-1] + c[..., 1:]) / 2
    inner = torch.searchsorted(r.xp, mid.reshape(rows, -1)).view(rows, starts, k - 1) - _PAD
    return _with_ends(inner, r.n)


def _with_ends(inner: Tensor, n: int) -> Tensor:
    """``[..., k - 1]`` inner boundaries -> ``[..., k + 1]`` with 0 in front and ``n`` behind."""
    return F.pad(F.pad(inner, (1, 0), value=0), (0, 1), value=n)


def _moved_boundaries(r: _SortedRows, c: Tensor, b: Tensor) -> Tensor:
    """:func:`_boundaries` of ``c``, knowing ``b``, the boundaries of nearby centroids.

    Lloyd steps mostly move a boundary by a place or two, so counting the values below each midpoint
    in a window of ``2 * _PAD`` around its old place is exact and much cheaper than a binary search;
    only the few boundaries that reach their window's edge are searched for.
    """
    mid = (c[..., :-1] + c[..., 1:]) / 2
    inner = b[..., 1:-1]
    # The window on dim 1 keeps the elementwise work on long contiguous [S, k - 1] blocks.
    window = inner.unsqueeze(1) + torch.arange(-_PAD, _PAD).view(1, -1, 1, 1)
    below = (r.x_at(window) < mid.unsqueeze(1)).sum(1)
    inner = inner - _PAD + below
    far = ((below == 0) | (below == 2 * _PAD)).nonzero(as_tuple=True)
    if far[0].numel() * 8 > inner.numel():  # early steps move many boundaries far: search them all
        return _boundaries(r, c)
    if far[0].numel():
        inner[far] = _search(r, far[0], mid[far])
    return _with_ends(inner, r.n)


def _search(r: _SortedRows, rows: Tensor, values: Tensor) -> Tensor:
    """Number of sorted values of row ``rows[i]`` below ``values[i]``: a binary search on a 1-D list of
    (row, value) queries, vectorised over the queries."""
    width = r.xp.shape[1]
    flat = r.xp.flatten()
    base = rows * width + _PAD
    lo = torch.zeros_like(rows)
    hi = torch.full_like(rows, r.n)
    for _ in range(r.n.bit_length()):
        mid = (lo + hi) // 2
        right = flat[base + mid] < values
        lo = torch.where(right, mid + 1, lo)
        hi = torch.where(right, hi, mid)
    return lo


def _segment_means(r: _SortedRows, b: Tensor, fallback: Tensor | None = None) -> Tensor:
    """Weighted means ``[rows, S, k]`` of the segments of ``b: [rows, S, k + 1]``, sorted.

    A weightless segment keeps ``fallback`` (its previous centroid) or, without one, takes the sorted
    value at its start; either lies between its neighbours' means.
    """
    w, s, _ = torch.diff(_at(r, b), dim=-1).unbind(1)
    if fallback is None:
        fallback = r.x_at(b[..., :-1].clamp(max=r.n - 1))
    c = torch.where(w > 0, s / w.clamp_min(torch.finfo(w.dtype).tiny), fallback)
    return c.cummax(-1).values  # exact sortedness: a mean may pass the next start by round-off


def _objective(r: _SortedRows, c: Tensor) -> Tensor:
    """Weighted SSE ``[rows, S]`` of sorted centroids ``c: [rows, S, k]`` with nearest assignment."""
    w, s, q = torch.diff(_at(r, _boundaries(r, c)), dim=-1).unbind(1)
    return (q - 2 * c * s + c * c * w).sum(-1).clamp_min(0)


def _lloyd(r: _SortedRows, c: Tensor, iters: int) -> Tensor:
    """Up to ``iters`` Lloyd steps on sorted ``c: [rows, S, k]``; a row stops at its fixed point (no
    boundary of any start moves).

    Most rows settle within ~10 steps while a few creep on for dozens, so settled rows leave the batch
    whenever they are at least half of it: later steps cost what the moving rows cost.
    """
    out = c.clone()
    rows = torch.arange(c.shape[0])
    b = _boundaries(r, c)
    for _ in range(iters):
        c = _segment_means(r, b, c)
        nb = _moved_boundaries(r, c, b)
        moving = (nb != b).flatten(1).any(1)
        b = nb
        n_moving = int(moving.sum())
        if n_moving == 0:
            break
        if 2 * n_moving <= rows.numel():
            out[rows] = c
            rows, r, c, b = rows[moving], r.take(moving), c[moving], b[moving]
    out[rows] = c
    return out


def _starts(r: _SortedRows, k: int, seed: int) -> Tensor:
    """Initial sorted centroids ``[rows, 2 + _RANDOM_STARTS, k]``, deterministic for ``seed``.

    Equal weight mass per cluster (weighted quantiles) suits smooth rows, equal widths rows whose few
    extreme values deserve clusters of their own; random mass shares add diversity. Different starts
    end in different local optima; keeping the best per row is cheap since search is O(k log n).
    """
    rows = r.xp.shape[0]
    even = (torch.arange(1, k, dtype=torch.float64) / k).expand(rows, 1, k - 1)
    gen = torch.Generator().manual_seed(seed)
    random = torch.rand(rows, _RANDOM_STARTS, k - 1, generator=gen, dtype=torch.float64).sort(-1).values
    shares = torch.cat([even, random], dim=1)
    mass = r.p[:, 0].contiguous()
    inner = torch.searchsorted(mass, (mass[:, -1, None, None] * shares).flatten(1)).view(shares.shape)
    by_mass = _segment_means(r, _with_ends(inner, r.n))
    lo, hi = r.xp[:, _PAD : _PAD + 1], r.xp[:, -_PAD - 1 : -_PAD]
    by_width = (lo + (hi - lo) * (torch.arange(k, dtype=torch.float64) + 0.5) / k).unsqueeze(1)
    return torch.cat([by_mass[:, :1], by_width, by_mass[:, 1:]], dim=1)


def _best_cuts(r: _SortedRows, lo: Tensor, hi: Tensor, at_lo: Tensor, at_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Best candidate cut of each segment ``[lo, hi)`` into two: (SSE of the two parts, cut index).

    lo, hi: [rows, S, K] boundaries; at_lo, at_hi: their prefix statistics ``_at(r, lo)``, ``_at(r, hi)``.
    The ``_CUT_SHARES - 1`` candidates split the segment's index range into equal parts; Lloyd
    afterwards polishes the cut, so a coarse grid suffices.
    """
    t = (torch.arange(1, _CUT_SHARES, dtype=torch.float64) / _CUT_SHARES).view(1, -1, 1, 1)
    # Candidates on dim 1, so the elementwise work below runs over long contiguous [S, K] rows.
    cut = lo.unsqueeze(1) + ((hi - lo).unsqueeze(1) * t).long()  # [rows, candidates, S, K]
    at_cut = _at(r, cut)
    sse = _sse(at_cut - at_lo.unsqueeze(2)) + _sse(at_hi.unsqueeze(2) - at_cut)
    best, arg = sse.min(1)
    return best, cut.gather(1, arg.unsqueeze(1)).squeeze(1)


def _split_merge(r: _SortedRows, c: Tensor) -> tuple[Tensor, Tensor]:
    """One split-merge move per row and start where it lowers the objective.

    Split cluster ``s`` at its best cut (gain ``G_s``), merge an adjacent pair ``(m, m + 1)`` not
    containing ``s`` (cost ``M_m``); apply the pair maximising ``G_s - M_m`` if positive. This moves a
    centroid from where it is least useful to where it is most needed, which Lloyd never does.
    Returns the new centroids ``[rows, S, k]`` and which rows moved ``[rows]`` bool.
    """
    k = c.shape[-1]
    b = _boundaries(r, c)
    at_b = _at(r, b)
    sse = _sse(torch.diff(at_b, dim=-1))
    merge = _sse(at_b[..., 2:] - at_b[..., :-2]) - sse[..., :-1] - sse[..., 1:]
    # A split gains at most the cluster's SSE, so only the _SPLIT_CANDIDATES costliest clusters are
    # worth searching for cuts; the others keep split_sse = sse (gain 0).
    top = sse.topk(min(_SPLIT_CANDIDATES, k), dim=-1).indices  # [rows, S, m]
    top3 = top.unsqueeze(1).expand(-1, 3, -1, -1)
    best_sse, best_cut = _best_cuts(
        r, b[..., :-1].gather(-1, top), b[..., 1:].gather(-1, top),
        at_b[..., :-1].gather(-1, top3), at_b[..., 1:].gather(-1, top3),
    )
    split_sse = sse.scatter(-1, top, best_sse)
    cut = b[..., :-1].scatter(-1, top, best_cut)
    gain = (sse - split_sse)[..., :, None] - merge[..., None, :]  # [rows, S, split s, merge m]
    s_idx = torch.arange(k).view(k, 1)
    m_idx = torch.arange(k - 1).view(1, k - 1)
    gain = gain.masked_fill((m_idx == s_idx) | (m_idx == s_idx - 1), -float("inf"))
    best, arg = gain.flatten(-2).max(-1)
    s, m = arg // (k - 1), arg % (k - 1)
    move = best > _EPS * sse.sum(-1)
    # Remove inner boundary m + 1 (the merge) and insert the cut (the split), keeping boundaries sorted.
    inner = b[..., 1:-1].scatter(-1, m[..., None], cut.gather(-1, s[..., None])).sort(-1).values
    nb = torch.cat([b[..., :1], inner, b[..., -1:]], dim=-1)
    return torch.where(move[..., None], _segment_means(r, nb), c), move.any(1)


def _pair_resplit(r: _SortedRows, c: Tensor) -> tuple[Tensor, Tensor]:
    """Re-cut every adjacent cluster pair at its best candidate point where that lowers the objective.

    Even pairs (0,1), (2,3), ... then odd pairs: pairs of one parity share no boundary, so all of them
    move at once. This is block-coordinate descent on pairs, and escapes the fixed points Lloyd has
    on a pair of clusters. Returns the new centroids ``[rows, S, k]`` and which rows moved ``[rows]``.
    """
    k = c.shape[-1]
    b = _boundaries(r, c)
    moved = torch.zeros(c.shape[0], dtype=torch.bool)
    for parity in (0, 1):
        j = torch.arange(parity, k - 1, 2)
        if j.numel() == 0:  # k = 2 has a single pair
            continue
        lo, mid, hi = b[..., j], b[..., j + 1], b[..., j + 2]
        at_lo, at_mid, at_hi = _at(r, lo), _at(r, mid), _at(r, hi)
        now = _sse(at_mid - at_lo) + _sse(at_hi - at_mid)
        best, cut = _best_cuts(r, lo, hi, at_lo, at_hi)
        better = best < now * (1 - _EPS)
        moved |= better.flatten(1).any(1)
        b[..., j + 1] = torch.where(better, cut, mid)
    return torch.where(moved[:, None, None], _segment_means(r, b), c), moved


def _keep_best(r: _SortedRows, c: Tensor, keep: int) -> Tensor:
    """The ``keep`` starts of least objective per row: ``[rows, S, k] -> [rows, keep, k]``."""
    best = _objective(r, c).topk(keep, dim=1, largest=False).indices
    return c.gather(1, best.unsqueeze(-1).expand(-1, -1, c.shape[-1]))


def _refine(r: _SortedRows, c: Tensor, rounds: int, iters: int) -> Tensor:
    """Up to ``rounds`` of (split-merge, pair re-split, Lloyd of ``iters``) on ``c: [rows, S, k]``.

    Returns ``[rows, min(S, _KEEP_STARTS), k]`` (all S if ``rounds <= 1``). A row where neither move
    helps is final (Lloyd left it at a fixed point), so it leaves the batch.
    """
    r_all = r
    out = c.clone()
    rows = torch.arange(c.shape[0])
    for rnd in range(rounds):
        if rnd == 1:  # by now the worse starts rarely win: only the best _KEEP_STARTS go on
            out[rows] = c
            out = _keep_best(r_all, out, min(_KEEP_STARTS, out.shape[1]))
            c = out[rows]
        c, split = _split_merge(r, c)
        c, resplit = _pair_resplit(r, c)
        moved = split | resplit
        out[rows] = c
        if not bool(moved.any()):
            return out
        rows, r, c = rows[moved], r.take(moved), c[moved]
        c = _lloyd(r, c, iters)
    out[rows] = c
    return out


def _window_dp(r: _SortedRows, c: Tensor) -> Tensor:
    """Jointly best boundaries within ``_WINDOW`` places of those of ``c: [rows, S, k]``, by exact DP.

    Lloyd, split-merge and pair re-splits move one or two boundaries at a time; optima that need
    several neighbouring boundaries to shift together are found by a DP over the ``k - 1`` inner
    boundaries, each restricted to ``2 * _WINDOW + 1`` candidate places:
    ``D_j(t) = min_u D_{j-1}(u) + SSE(cand_{j-1,u}, cand_{j,t})``, ``O(k * _WINDOW^2)`` per row.
    Returns the means of the best segmentation (never worse than ``c``'s own, which is a candidate).
    """
    rows, starts, k = c.shape
    b = _boundaries(r, c)
    offsets = torch.arange(-_WINDOW, _WINDOW + 1)
    cand = (b[..., 1:-1, None] + offsets).clamp(0, r.n)  # [rows, S, k - 1, C]
    ends = torch.zeros_like(cand[..., :1, :]), torch.full_like(cand[..., :1, :], r.n)
    cand = torch.cat([ends[0], cand, ends[1]], dim=-2)  # [rows, S, k + 1, C]; ends repeat one place
    at = _at(r, cand)  # [rows, 3, S, k + 1, C]
    # step[j][u, t]: SSE of the segment from candidate u of boundary j to candidate t of boundary j+1.
    step = _sse(at[..., 1:, None, :] - at[..., :-1, :, None])  # [rows, S, k, C, C]
    step = step.masked_fill(cand[..., :-1, :, None] > cand[..., 1:, None, :], float("inf"))
    cost = step[..., 0, 0, :]  # [rows, S, C]: from the single start place
    choices = []
    for j in range(1, k):
        cost, arg = (cost[..., :, None] + step[..., j, :, :]).min(dim=-2)
        choices.append(arg)
    # Every candidate of the end boundary is n, so candidate 0 is as good as any: walk back from it.
    t = torch.zeros(rows, starts, dtype=torch.long)
    picked = [t]
    for arg in reversed(choices):
        t = arg.gather(-1, t[..., None]).squeeze(-1)
        picked.append(t)
    picked.append(torch.zeros_like(t))  # the start boundary: all its candidates are 0
    idx = torch.stack(picked[::-1], dim=-1)  # [rows, S, k + 1]
    nb = cand.gather(-1, idx[..., None]).squeeze(-1)
    return _segment_means(r, nb)


def _codes_from_boundaries(order: Tensor, b: Tensor) -> Tensor:
    """uint8 codes ``[rows, n]`` in the original column order.

    order: [rows, n] the sorting permutation (``xs = x.gather(1, order)``); b: [rows, k + 1]
    boundaries in sorted order. The code of sorted position ``i`` is the number of inner boundaries
    ``<= i``, a cumulative sum of boundary marks.
    """
    rows, n = order.shape
    inner = b[:, 1:-1]
    marks = torch.zeros(rows, n + 1, dtype=torch.int16)
    marks.scatter_add_(1, inner, torch.ones_like(inner, dtype=torch.int16))
    sorted_codes = marks[:, :n].cumsum(1, dtype=torch.int16).to(torch.uint8)
    return torch.empty_like(sorted_codes).scatter_(1, order, sorted_codes)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run the search on one intra-op thread, restoring the caller's setting afterwards.

    The search is thousands of ops on tensors of a few thousand to a few hundred thousand elements;
    splitting those across threads gains little, and when other processes load the cores, every op's
    thread barrier waits for a descheduled thread: measured 0.3 s with 1 thread against 10 s with 2 for
    one 576 x 576 matrix on a loaded 2-core machine. The sort and prefix sums keep the caller's threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_k(x: Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be [rows, n] with n >= 1, got shape {tuple(x.shape)}")
    if not 2 <= k <= 256:
        raise ValueError(f"k={k} is outside [2, 256] (codes are uint8)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x has NaN or infinite values")


def weighted_kmeans(
    x: Tensor,
    weight: Tensor | None,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    refine_rounds: int = _REFINE_ROUNDS,
    snap: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted 1-D k-means of every row of ``x: [rows, n]`` with weights ``weight: [rows, n] >= 0``.

    Minimises ``sum_i weight_i (x_i - c(x_i))^2`` per row (SqueezeLLM Eq. 4); ``weight=None`` or an
    all-zero row means unweighted. ``iters`` bounds the last Lloyd run (the earlier ones stop after
    ``min(iters, 10)`` steps, as later runs finish their convergence); a row's run also stops at its
    fixed point (no boundary moves). ``refine_rounds`` bounds the split-merge / re-split rounds (0:
    multi-start Lloyd and the final window DP only), which stop when no move lowers the objective. ``snap`` (e.g.
    :func:`sqllm.codes.fp16_grid`, any monotone rounding) is applied to the centroids before codes are
    assigned, so codes are nearest for the centroids returned. Deterministic for a given ``seed``.

    Returns ``centroids: [rows, k]`` (dtype of ``x``, sorted ascending; a cluster without weight keeps
    a value inside the row's range) and ``codes: [rows, n]`` uint8, the index of the nearest centroid.
    """
    _check_k(x, k)
    device = x.device  # the search is many small ops: it runs on CPU whatever the inputs' device
    x = x.detach().cpu()
    r, order = _sort_rows(x, None if weight is None else weight.detach().cpu())
    with _single_threaded():
        c = _lloyd(r, _starts(r, k, seed), min(iters, _INNER_ITERS))
        c = _refine(r, c, refine_rounds, min(iters, _INNER_ITERS))
        c = _lloyd(r, _window_dp(r, _keep_best(r, c, 1)), iters)
    c = c.squeeze(1).to(x.dtype)
    if snap is not None:
        c = snap(c)
    b = _boundaries(r, c.to(torch.float64).unsqueeze(1)).squeeze(1)
    return c.to(device), _codes_from_boundaries(order, b).to(device)


def nearest_codes(x: Tensor, centroids: Tensor) -> Tensor:
    """uint8 index of the nearest of the sorted ``centroids: [rows, k]`` for every value of ``x: [rows, n]``."""
    mid = (centroids[:, :-1] + centroids[:, 1:]) / 2
    return torch.searchsorted(mid.contiguous(), x.to(mid.dtype).contiguous()).to(torch.uint8)


def weighted_kmeans_objective(x: Tensor, weight: Tensor | None, centroids: Tensor, codes: Tensor) -> Tensor:
    """``[rows]`` float64 ``sum_i weight_i (x_i - centroids[codes_i])^2`` (``weight=None``: all ones)."""
    err = (x.to(torch.float64) - centroids.to(torch.float64).gather(1, codes.long())) ** 2
    return err.sum(1) if weight is None else (weight.to(torch.float64) * err).sum(1)


def exact_weighted_kmeans_1d(x: Tensor, weight: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Exact optimum of the same problem by dynamic programming over sorted prefixes, ``O(k n^2)``.

    ``D_m(i)`` = least cost of the first ``i`` sorted values in ``m`` clusters
    ``= min_{j <= i} D_{m-1}(j) + SSE(j, i)``; batched over rows with ``[rows, n + 1, n + 1]`` memory,
    so meant for small ``n`` (tests). All-zero-weight rows fall back to unweighted, as in
    :func:`weighted_kmeans`. Returns ``(centroids [rows, k], codes [rows, n] uint8)`` like it.
    """
    _check_k(x, k)
    r, order = _sort_rows(x, weight)
    rows, n = r.xp.shape[0], r.n
    idx = torch.arange(n + 1)
    at = _at(r, idx.expand(rows, n + 1))
    cost = _sse(at[:, :, None, :] - at[:, :, :, None])  # cost[r, j, i] = SSE of sorted values [j, i)
    cost = cost.masked_fill(idx[:, None] > idx[None, :], float("inf"))
    best = cost[:, 0, :]  # D_1(i)
    choices = []
    for _ in range(k - 1):
        best, arg = (best[:, :, None] + cost).min(dim=1)
        choices.append(arg)
    # Walk back from i = n: each layer's argmin is where the last of its clusters starts.
    b = [torch.full((rows,), n, dtype=torch.long)]
    for arg in reversed(choices):
        b.append(arg.gather(1, b[-1][:, None]).squeeze(1))
    b.append(torch.zeros(rows, dtype=torch.long))
    bounds = torch.stack(b[::-1], dim=1)  # [rows, k + 1]
    c = _segment_means(r, bounds.unsqueeze(1)).squeeze(1)
    return c.to(x.dtype), _codes_from_boundaries(order, bounds)
