"""Batched 1-D weighted k-means: one lookup table per row of a matrix (SqueezeLLM §3.2, Eq. 4).

Per row ``x: [n]`` with weights ``w: [n] >= 0`` we minimise ``sum_i w_i (x_i - c_{a(i)})^2`` over ``k``
centroids ``c`` and assignments ``a``. In 1-D every cluster of a nearest-centroid assignment is a
contiguous run of the sorted row, so after sorting each row once, a partition is just ``k + 1`` boundary
indices and every cluster statistic (weight, ``sum w x``, ``sum w x^2``) is a difference of prefix sums.
The search works on boundaries ``b: [rows, starts, k + 1]`` and never touches whole rows again; only
the sort, the prefix sums and the final code assignment do.

Search, for all rows and several starts at once as batched tensor ops:

1. starts: partitions into equal weight mass (weighted quantiles), equal widths over the row's range,
   and seeded random mass shares; after two Lloyd steps each (means, then nearest-centroid
   boundaries) the best two per row go on;
2. split-merge rounds: the best move that cuts one cluster in two and merges an adjacent pair
   elsewhere, applied only where it lowers the objective (so the search cannot cycle); a row leaves
   the batch when no move helps;
3. the best start per row is polished by two exact DPs over a few candidate places per boundary
   (:func:`_dp`), with a Lloyd step between them: first anywhere between its neighbours
   (:func:`_bracket_candidates`: large joint moves, which re-cut every adjacent pair at once), then
   within ``_WINDOW`` places of where it is (:func:`_window_candidates`: the fine joint shifts Lloyd
   cannot make).

No Lloyd run goes on to convergence: Lloyd's long tail of small steps was most of the time, and the
moves and DPs reach better optima (on SmolLM2 rows ~10% below scikit-learn's k-means++ with 50 Lloyd
iterations, benchmarks/kmeans.py). Everything runs on one thread (:func:`_single_threaded`).

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
_KEEP_STARTS = 2  # starts per row that go through the split-merge rounds
_REFINE_ROUNDS = 32  # default cap on split-merge rounds (each relocates one centroid)
_CUT_SHARES = 8  # a segment's candidate cuts split its index range into this many equal parts
_SPLIT_CANDIDATES = 2  # clusters of largest SSE searched for a split in each split-merge round
_BRACKET = 8  # evenly spaced candidate places per boundary in the bracket DP (plus where it is)
_WINDOW = 4  # places each boundary may move in the window DP
_EPS = 1e-12  # relative objective decrease a move must achieve (guards float64 round-off)


@dataclass(frozen=True)
class _SortedRows:
    """Rows sorted once, with float64 prefix sums in sorted order.

    xs: [rows, n] float64 sorted values.
    p:  [rows, 3, n + 1] prefix sums (leading zero) of ``(w, w*x, w*x^2)``.
    """

    xs: Tensor
    p: Tensor

    @property
    def n(self) -> int:
        return self.xs.shape[1]

    def batch(self) -> _Batch:
        """All rows as a :class:`_Batch`."""
        return _Batch(self, torch.arange(self.xs.shape[0]))

    def stats(self, idx: Tensor, parts: int = 3) -> Tensor:
        """The first ``parts`` prefix statistics at boundary indices ``idx: [rows, *shape]`` in
        ``[0, n]``: ``[rows, parts, *shape]``."""
        rows, shape = idx.shape[0], idx.shape[1:]
        flat = idx.reshape(rows, 1, -1).expand(-1, parts, -1)
        return self.p[:, :parts].gather(2, flat).view(rows, parts, *shape)

    def count_below(self, values: Tensor) -> Tensor:
        """Number of sorted values of each row below ``values: [rows, m]`` (binary search)."""
        return torch.searchsorted(self.xs, values.contiguous())


@dataclass(frozen=True)
class _Batch:
    """Rows ``ids: [B]`` (ascending) of a :class:`_SortedRows`, for the split-merge rounds, which drop
    rows as they settle.

    Selecting rows copies their ids, never their ``n``-long data (copying it was a fifth of the search
    time): a batch of only some rows reads the data through flat indices.
    """

    data: _SortedRows
    ids: Tensor

    def take(self, keep: Tensor) -> _Batch:
        """The rows selected by a bool mask or an ascending index tensor over this batch."""
        return _Batch(self.data, self.ids[keep])

    def stats(self, idx: Tensor, parts: int = 3) -> Tensor:
        """:meth:`_SortedRows.stats` of these rows: ``idx: [B, *shape] -> [B, parts, *shape]``."""
        if self.ids.numel() == self.data.xs.shape[0]:  # all rows: gather is faster than flat indices
            return self.data.stats(idx, parts)
        tail = (1,) * (idx.dim() - 1)
        part = self.ids.view(-1, 1, *tail) * 3 + torch.arange(parts).view(1, -1, *tail)
        flat = part * (self.data.n + 1) + idx.unsqueeze(1)
        # index_select on the flattened data: ~2x faster than advanced indexing on CPU.
        return self.data.p.view(-1).index_select(0, flat.flatten()).view(flat.shape)


def _range(t: Tensor) -> tuple[float, float]:
    """Least and greatest value of a non-empty tensor, NaN if it holds one: a single pass, unlike
    ``isfinite(t).all()``, which made up a third of the sorting stage."""
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def _effective_weight(x: Tensor, weight: Tensor | None) -> Tensor:
    """Weights ``[rows, n]`` (dtype of ``weight``); ``None`` or an all-zero row means unweighted (ones)."""
    if weight is None:
        return torch.ones_like(x)
    if weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}")
    lo, hi = _range(weight) if weight.numel() else (0.0, 0.0)
    if not (lo >= 0 and hi < float("inf")):  # also false for NaN
        raise ValueError("k-means weights must be finite and >= 0")
    # A row with no weight at all expresses no preference: plain k-means is the natural fallback.
    empty = weight.sum(1, keepdim=True) == 0
    return torch.where(empty, torch.ones_like(weight), weight) if bool(empty.any()) else weight


def _sort_rows(x: Tensor, weight: Tensor | None) -> tuple[_SortedRows, Tensor]:
    """Sort every row of ``x: [rows, n]``. Returns the sorted rows and ``order: [rows, n]``
    (``xs = x.gather(1, order)``)."""
    w = _effective_weight(x, weight)
    x32 = x.float()  # fp32 sorts faster than fp64 and holds fp32/fp16/bf16 values exactly
    # numpy's row-wise argsort (SIMD quicksort) is ~4x faster than torch.sort here.
    order = torch.from_numpy(np.argsort(x32.numpy(), axis=1))
    rows, n = x.shape
    xs = x32.gather(1, order).to(torch.float64)
    ws = w.gather(1, order).to(torch.float64)
    # The three prefix sums go straight into one buffer (the search gathers all three at once).
    p = torch.empty(rows, 3, n + 1, dtype=torch.float64)
    p[:, :, 0] = 0
    torch.cumsum(ws, 1, out=p[:, 0, 1:])
    wx = ws.mul_(xs)
    torch.cumsum(wx, 1, out=p[:, 1, 1:])
    torch.cumsum(wx.mul_(xs), 1, out=p[:, 2, 1:])
    return _SortedRows(xs, p), order


def _sse(stats: Tensor) -> Tensor:
    """Weighted SSE around the weighted mean from segment statistics ``[rows, 3, ...]`` (0 if weightless).

    ``stats`` is a temporary (a difference of prefix sums) and is overwritten: the in-place ops save
    an allocation and a pass each, which the search, made of many such small steps, notices.
    """
    return _sse_(*stats.unbind(1))


def _sse_(w: Tensor, s: Tensor, q: Tensor) -> Tensor:
    """:func:`_sse` of the statistics given apart, ``q - s^2 / w``, overwriting the three tensors.

    Cancellation may leave an SSE of ~0 slightly negative (by ~1e-16 of ``q``); nothing here needs it
    clamped, and clamping was a tenth of the DPs' work.
    """
    # A weightless segment has s = q = 0 exactly (its prefix sums add only zeros), so 0 / tiny = 0.
    return q.addcdiv_(s.mul_(s), w.clamp_min_(torch.finfo(w.dtype).tiny), value=-1)


def _with_ends(inner: Tensor, n: int) -> Tensor:
    """``[..., k - 1]`` inner boundaries -> ``[..., k + 1]`` with 0 in front and ``n`` behind."""
    return F.pad(F.pad(inner, (1, 0), value=0), (0, 1), value=n)


def _means(r: _SortedRows, b: Tensor) -> Tensor:
    """Weighted means ``[rows, S, k]`` of the segments of boundaries ``b: [rows, S, k + 1]``, sorted.

    A weightless segment takes the sorted value at its start, which lies between its neighbours' means.
    """
    w, s = torch.diff(r.stats(b, parts=2), dim=-1).unbind(1)
    c = s / w.clamp_min(torch.finfo(w.dtype).tiny)
    empty = w == 0  # prefix sums of weights >= 0 never decrease, so no weight means exactly 0
    if bool(empty.any()):  # rare (zero weights, k above the distinct values): skip the gather otherwise
        start = b[..., :-1].clamp(max=r.n - 1)
        c = torch.where(empty, r.xs.gather(1, start.flatten(1)).view(start.shape), c)
    return c.cummax(-1).values  # exact sortedness: a mean may pass the next start by round-off


def _assign(r: _SortedRows, c: Tensor) -> Tensor:
    """Boundaries ``[rows, S, k + 1]`` of nearest assignment to sorted centroids ``c: [rows, S, k]``:
    values below the midpoint of ``c_j, c_{j+1}`` go to cluster ``j``."""
    mid = (c[..., :-1] + c[..., 1:]) / 2
    return _with_ends(r.count_below(mid.flatten(1)).view(mid.shape), r.n)


def _lloyd_step(r: _SortedRows, b: Tensor) -> Tensor:
    """One Lloyd step on boundaries ``b: [rows, S, k + 1]``: the segments' means, then the nearest
    assignment to them."""
    return _assign(r, _means(r, b))


def _starts(r: _SortedRows, k: int, seed: int) -> Tensor:
    """Initial boundaries ``[rows, 2 + _RANDOM_STARTS, k + 1]``, deterministic for ``seed``: partitions
    into equal weight mass per cluster (weighted quantiles), equal widths over the row's range, and
    seeded random mass shares.

    Equal mass suits smooth rows, equal widths rows whose few extreme values deserve clusters of their
    own; random shares add diversity. Different starts end in different local optima, and which start
    is best shows early: after two Lloyd steps only the best ``_KEEP_STARTS`` go on.
    """
    rows = r.xs.shape[0]
    even = (torch.arange(1, k, dtype=torch.float64) / k).expand(rows, 1, k - 1)
    gen = torch.Generator().manual_seed(seed)
    random = torch.rand(rows, _RANDOM_STARTS, k - 1, generator=gen, dtype=torch.float64).sort(-1).values
    shares = torch.cat([even, random], dim=1)
    mass = r.p[:, 0].contiguous()
    by_mass = torch.searchsorted(mass, (mass[:, -1, None, None] * shares).flatten(1)).view(shares.shape)
    lo, hi = r.xs[:, :1], r.xs[:, -1:]
    by_width = r.count_below(lo + (hi - lo) * even[:, 0]).unsqueeze(1)
    return _with_ends(torch.cat([by_mass[:, :1], by_width, by_mass[:, 1:]], dim=1), r.n)


def _best_cuts(batch: _Batch, lo: Tensor, hi: Tensor, at_lo: Tensor, at_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Best candidate cut of each segment ``[lo, hi)`` into two: (SSE of the two parts, cut index).

    lo, hi: [B, S, K] boundaries; at_lo, at_hi: their prefix statistics ``batch.stats(lo)``, ``(hi)``.
    The ``_CUT_SHARES - 1`` candidates split the segment's index range into equal parts; the final
    DPs polish the cut, so a coarse grid suffices.
    """
    shares = torch.arange(1, _CUT_SHARES).view(1, -1, 1, 1)
    # Candidates on dim 1, so the elementwise work below runs over long contiguous [S, K] rows.
    cut = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * shares // _CUT_SHARES  # [B, candidates, S, K]
    at_cut = batch.stats(cut)
    sse = _sse(at_cut - at_lo.unsqueeze(2)) + _sse(at_hi.unsqueeze(2) - at_cut)
    best, arg = sse.min(1)
    return best, cut.gather(1, arg.unsqueeze(1)).squeeze(1)


def _split_merge(batch: _Batch, b: Tensor) -> tuple[Tensor, Tensor]:
    """One split-merge move per row and start where it lowers the objective.

    Split cluster ``s`` at its best cut (gain ``G_s``), merge an adjacent pair ``(m, m + 1)`` not
    containing ``s`` (cost ``M_m``); apply the pair maximising ``G_s - M_m`` if positive. This moves a
    centroid from where it is least useful to where it is most needed, which Lloyd never does.
    Returns the new boundaries ``[B, S, k + 1]`` and which rows moved ``[B]`` bool.
    """
    k = b.shape[-1] - 1
    at_b = batch.stats(b)
    sse = _sse(torch.diff(at_b, dim=-1))
    merge = _sse(at_b[..., 2:] - at_b[..., :-2]) - sse[..., :-1] - sse[..., 1:]  # [B, S, k - 1]
    # A split gains at most the cluster's SSE, so only the _SPLIT_CANDIDATES costliest clusters are
    # worth searching for cuts.
    top_sse, top = sse.topk(min(_SPLIT_CANDIDATES, k), dim=-1)  # [B, S, m]
    top3 = top.unsqueeze(1).expand(-1, 3, -1, -1)
    best_sse, best_cut = _best_cuts(
        batch, b[..., :-1].gather(-1, top), b[..., 1:].gather(-1, top),
        at_b[..., :-1].gather(-1, top3), at_b[..., 1:].gather(-1, top3),
    )
    # Gain of splitting top cluster i and merging pair (p, p + 1), [B, S, m, k - 1]; no pair may hold i.
    gain = (top_sse - best_sse).unsqueeze(-1) - merge.unsqueeze(-2)
    pair = torch.arange(k - 1)
    gain.masked_fill_((pair == top.unsqueeze(-1)) | (pair == top.unsqueeze(-1) - 1), -float("inf"))
    best, arg = gain.flatten(-2).max(-1)
    i, p = arg // (k - 1), arg % (k - 1)
    move = best > _EPS * sse.sum(-1)
    # Remove inner boundary p + 1 (the merge) and insert the cut (the split), keeping boundaries sorted.
    inner = b[..., 1:-1].scatter(-1, p.unsqueeze(-1), best_cut.gather(-1, i.unsqueeze(-1))).sort(-1).values
    nb = torch.cat([b[..., :1], inner, b[..., -1:]], dim=-1)
    return torch.where(move.unsqueeze(-1), nb, b), move.any(1)


def _objective(r: _SortedRows, b: Tensor) -> Tensor:
    """Weighted SSE ``[rows, S]`` of the segments of ``b: [rows, S, k + 1]`` around their means."""
    return _sse(torch.diff(r.stats(b), dim=-1)).sum(-1)


def _keep_best(r: _SortedRows, b: Tensor, keep: int) -> Tensor:
    """The ``keep`` starts of least objective per row: ``[rows, S, k + 1] -> [rows, keep, k + 1]``."""
    best = _objective(r, b).topk(keep, dim=1, largest=False).indices
    return b.gather(1, best.unsqueeze(-1).expand(-1, -1, b.shape[-1]))


def _refine(r: _SortedRows, b: Tensor, rounds: int) -> Tensor:
    """Up to ``rounds`` split-merge rounds on ``b: [rows, S, k + 1]``.

    A row where no move helps leaves the batch. The rounds skip Lloyd steps between moves: the final
    DPs settle the moved boundaries, for the best start only, at a fraction of the cost.
    """
    out = b.clone()
    pos = torch.arange(b.shape[0])
    batch = r.batch()
    for _ in range(rounds):
        b, moved = _split_merge(batch, b)
        out[pos] = b
        if not bool(moved.any()):
            return out
        pos, batch, b = pos[moved], batch.take(moved), b[moved]
    out[pos] = b
    return out


def _bracket_candidates(b: Tensor) -> Tensor:
    """Candidates ``[rows, S, k - 1, _BRACKET + 1]`` for each inner boundary: ``_BRACKET`` evenly spaced
    places from its left to its right neighbour, and where it is (so the DP never does worse)."""
    lo, hi = b[..., :-2, None], b[..., 2:, None]
    grid = lo + (hi - lo) * torch.arange(_BRACKET) // (_BRACKET - 1)
    return torch.cat([grid, b[..., 1:-1, None]], dim=-1)


def _window_candidates(b: Tensor, n: int) -> Tensor:
    """Candidates ``[rows, S, k - 1, 2 * _WINDOW + 1]``: each inner boundary's place and ``_WINDOW`` places on
    either side."""
    return (b[..., 1:-1, None] + torch.arange(-_WINDOW, _WINDOW + 1)).clamp(0, n)


def _dp(r: _SortedRows, cand: Tensor) -> Tensor:
    """Jointly best boundaries ``[rows, S, k + 1]`` taking inner boundary ``j`` from ``cand[..., j, :]``,
    by exact DP: ``cand: [rows, S, k - 1, C]`` (candidates in any order), ``O(k C^2)`` per row.

    Lloyd and split-merge move one boundary at a time; the DP moves all of them together, so it finds
    optima that need neighbouring boundaries to shift at once. ``D_j(t)``, the least cost of the
    clusters left of candidate ``t`` of boundary ``j``, is ``min_u D_{j-1}(u) + SSE(cand_{j-1,u},
    cand_{j,t})`` over ``u`` not right of ``t``.
    """
    at = r.stats(cand)  # [rows, 3, S, k - 1, C]
    w, s, q = at.unbind(1)
    total = r.stats(torch.full((cand.shape[0], 1), r.n)).unsqueeze(-1)  # [rows, 3, 1, 1]
    tiny = torch.finfo(w.dtype).tiny
    cost = _sse(at[..., 0, :].clone())  # [rows, S, C]: the first cluster starts at 0, whose statistics are 0
    choices = []
    for j in range(1, cand.shape[-2]):
        # The SSE from candidate u of boundary j - 1 to candidate t of boundary j is
        # Q(t) - Q(u) - dS^2 / dW; its O(C) terms Q(u), Q(t) stay out of the O(C^2) table [B, S, t, u]
        # (u last: the min reduces a contiguous dim). Built per j: the whole table spills out of caches.
        dw = w[..., j, :, None] - w[..., j - 1, None, :]
        ds = s[..., j, :, None] - s[..., j - 1, None, :]
        before = (cost - q[..., j - 1, :]).unsqueeze(-2)  # D_{j-1}(u) - Q(u)
        step = torch.addcdiv(before, ds.mul_(ds), dw.clamp_min_(tiny), value=-1)
        step.masked_fill_(cand[..., j - 1, None, :] > cand[..., j, :, None], float("inf"))  # would end first
        cost, arg = step.min(dim=-1)
        cost += q[..., j, :]
        choices.append(arg)
    t = (cost + _sse(total - at[..., -1, :])).argmin(-1)  # the last cluster ends at n
    picked = [t]
    for arg in reversed(choices):
        t = arg.gather(-1, t[..., None]).squeeze(-1)
        picked.append(t)
    inner = cand.gather(-1, torch.stack(picked[::-1], dim=-1).unsqueeze(-1)).squeeze(-1)
    return _with_ends(inner, r.n)


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
    """Run on one intra-op thread, restoring the caller's setting afterwards.

    The search is thousands of ops on tensors of a few thousand to a few hundred thousand elements;
    splitting those across threads gains little, and when other processes load the cores, every op's
    thread barrier waits for a descheduled thread: measured 0.3 s with 1 thread against 10 s with 2 for
    one 576 x 576 matrix on a loaded 2-core machine. The sort, prefix sums and code assignment fare no
    better: with them on 2 threads, one SmolLM2 block took 1.2 s against 0.38 s all on one thread
    (load average 5 on 2 cores), and switching the thread count between the phases costs as well.
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
    lo, hi = _range(x) if x.numel() else (0.0, 0.0)
    if not -float("inf") < lo <= hi < float("inf"):  # also false for NaN
        raise ValueError("x has NaN or infinite values")


def weighted_kmeans(
    x: Tensor,
    weight: Tensor | None,
    k: int,
    *,
    seed: int = 0,
    refine_rounds: int = _REFINE_ROUNDS,
    snap: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted 1-D k-means of every row of ``x: [rows, n]`` with weights ``weight: [rows, n] >= 0``.

    Minimises ``sum_i weight_i (x_i - c(x_i))^2`` per row (SqueezeLLM Eq. 4); ``weight=None`` or an
    all-zero row means unweighted. ``refine_rounds`` bounds the split-merge rounds (0: the starts and
    the final DPs only), which stop for a row when no move lowers its objective. ``snap`` (e.g. :func:`sqllm.codes.fp16_grid`,
    any monotone rounding) is applied to the centroids before codes are assigned, so codes are nearest
    for the centroids returned. Deterministic for a given ``seed``; runs on one thread.

    Returns ``centroids: [rows, k]`` (dtype of ``x``, sorted ascending; a cluster without weight keeps
    a value inside the row's range) and ``codes: [rows, n]`` uint8, the index of the nearest centroid.
    """
    device = x.device  # the search is many small ops: it runs on CPU whatever the inputs' device
    _check_k(x, k)
    if x.shape[0] == 0:  # e.g. a matrix with no output channels left to quantize
        return x.new_zeros(0, k), torch.zeros(0, x.shape[1], dtype=torch.uint8, device=device)
    with _single_threaded():
        x = x.detach().cpu()
        r, order = _sort_rows(x, None if weight is None else weight.detach().cpu())
        b = _lloyd_step(r, _lloyd_step(r, _starts(r, k, seed)))
        b = _refine(r, _keep_best(r, b, _KEEP_STARTS), refine_rounds)
        b = _dp(r, _bracket_candidates(_keep_best(r, b, 1)))
        # The bracket DP leaves boundaries on its coarse grid: a Lloyd step settles them for the fine DP.
        b = _dp(r, _window_candidates(_lloyd_step(r, b), r.n))
        c = _means(r, b).squeeze(1).to(x.dtype)
        if snap is not None:
            c = snap(c)
        # float64 midpoints of the returned centroids are exact, so codes are nearest for them.
        b = _assign(r, c.to(torch.float64).unsqueeze(1)).squeeze(1)
        codes = _codes_from_boundaries(order, b)
    return c.to(device), codes.to(device)


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
    rows, n = r.xs.shape[0], r.n
    idx = torch.arange(n + 1)
    cost = _sse(r.p[:, :, None, :] - r.p[:, :, :, None])  # cost[r, j, i] = SSE of sorted values [j, i)
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
    c = _means(r, bounds.unsqueeze(1)).squeeze(1)
    return c.to(x.dtype), _codes_from_boundaries(order, bounds)
