"""SqueezeLLM (Kim et al. 2023): sensitivity-weighted non-uniform LUTs plus a dense-and-sparse split.

* §3.2: each output channel gets its own lookup table of ``2**bits`` values, the centroids of a 1-D
  k-means weighted by the diagonal Fisher information (Eq. 4), so that the values the loss is most
  sensitive to are reproduced most closely.
* §4: a small fraction of values is kept exact in a sparse matrix: the most sensitive ones (largest
  Fisher values over the whole matrix) and the outliers (largest magnitudes among the rest). They get
  zero weight in k-means, so they no longer stretch the tables.

* Ours: with ``mixed``, rows (output channels) get tables of 2, 3 or 4 bits, allocated to minimise the
  Fisher-weighted k-means error within a budget of ``bits`` bits per weight, tables and the width map
  included (:func:`allocate_row_bits`): sensitive rows get wide tables, insensitive ones narrow tables.
  The error of §3.1 (Eq. 3) is the second-order estimate of the loss change, ``1/2 sum F (w - q)**2``,
  so errors of different matrices are in the same unit and one budget can serve the whole model:
  :func:`plan_row_bits` allocates across every linear (sensitive layers get more bits), and the
  solver takes each matrix's widths from that plan (``row_bits``); without a plan, each matrix spends
  the budget on its own rows.

Every extracted value gets the dense code of its row's table entry nearest 0 (the cheapest place to
park it) and the sparse part stores ``original - entry``, so ``dense + sparse`` equals the original
bit for bit at every extracted position (checked, see :func:`_exact_sparse`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..codes import LUTCodes, QuantizedMatrix, SparseOutliers, lut_row_bits
from ..config import SqueezeLLMConfig
from ..errors import InvalidConfig
from .kmeans import nearest_codes, value_faults, weighted_kmeans, weighted_kmeans_objective


def _percent_count(pct: float, total: int) -> int:
    """Number of values that ``pct`` percent of ``total`` stands for (rounded to nearest)."""
    return round(pct / 100.0 * total)


def _top_count(score: Tensor, count: int) -> Tensor:
    """Bool mask of exactly ``count`` largest entries of ``score`` (any shape).

    Ties at the threshold are broken by position (row-major), so the count is exact and deterministic
    even for bf16-valued weights, which repeat often.
    """
    flat = score.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count <= 0:
        return mask.view(score.shape)
    count = min(count, flat.numel())
    threshold = flat.kthvalue(flat.numel() - count + 1).values  # the count-th largest value
    above = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: count - int(torch.count_nonzero(above))]
    mask |= above
    mask[ties] = True
    return mask.view(score.shape)


def _quantile(flat: Tensor, q: float) -> float:
    """Linear-interpolation quantile of a 1-D tensor (like ``torch.quantile``, which caps input size)."""
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = float(flat.kthvalue(lo + 1).values)
    v_hi = float(flat.kthvalue(hi + 1).values)
    return v_lo + (pos - lo) * (v_hi - v_lo)


def iqr_threshold(w: Tensor, r: float) -> float:
    """``T = max(|Q1 - r IQR|, |Q3 + r IQR|)`` over all values of ``w`` (paper §4, outlier range)."""
    flat = w.flatten()
    q1, q3 = _quantile(flat, 0.25), _quantile(flat, 0.75)
    iqr = q3 - q1
    return max(abs(q1 - r * iqr), abs(q3 + r * iqr))


def extraction_masks(w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig) -> tuple[Tensor, Tensor]:
    """(sensitive, outliers) bool masks ``[out, in]``, disjoint.

    sensitive: the ``cfg.sensitive_pct`` % largest Fisher values of the matrix.
    outliers:  among the rest, ``|w| >= T`` with ``T`` removing ``cfg.outlier_pct`` % of the matrix by
               magnitude, or ``T`` from :func:`iqr_threshold` when ``cfg.outlier_range`` is set.
    """
    total = w.numel()
    sensitive = torch.zeros_like(w, dtype=torch.bool)
    if cfg.sensitive_pct > 0:
        assert fisher is not None  # checked by _check_inputs
        sensitive = _top_count(fisher, _percent_count(cfg.sensitive_pct, total))
    if cfg.outlier_range is None and _percent_count(cfg.outlier_pct, total) == 0:
        return sensitive, torch.zeros_like(sensitive)
    magnitude = w.abs().masked_fill(sensitive, -1.0)  # sensitive values are already out
    if cfg.outlier_range is not None:
        outliers = magnitude >= iqr_threshold(w, cfg.outlier_range)
    else:
        count = min(_percent_count(cfg.outlier_pct, total), total - int(torch.count_nonzero(sensitive)))
        outliers = _top_count(magnitude, count)
    return sensitive, outliers


def _kmeans_weight(w: Tensor, fisher: Tensor | None, extracted: Tensor | None) -> Tensor:
    """k-means weights ``[out, in]``: Fisher (or 1), zero at extracted values (``None``: nothing extracted).

    A row whose remaining Fisher is all zero is weighted uniformly over its remaining values, so the
    extracted ones still do not pull its centroids.
    """
    keep = None if extracted is None else (~extracted).float()
    if fisher is None:
        return torch.ones_like(w) if keep is None else keep
    weight = fisher.float() if keep is None else fisher.float() * keep
    empty = weight.sum(1, keepdim=True) <= 0  # Fisher >= 0: a row sums to 0 only if it is all zero
    if not bool(empty.any()):
        return weight
    return torch.where(empty, 1.0 if keep is None else keep, weight)


WIDTHS = (2, 3, 4)  # table widths a mixed-precision row may get


def row_cost_bits(n_in: int) -> Tensor:
    """``[len(WIDTHS)]`` bits one row of ``n_in`` weights costs at each width (:func:`lut_row_bits`)."""
    return torch.tensor([lut_row_bits(n_in, b) for b in WIDTHS], dtype=torch.float64)


def _row_costs(n_in: Tensor) -> Tensor:
    """``[rows, len(WIDTHS)]`` bits each row costs at each width, for rows of ``n_in: [rows]`` weights."""
    widths, inverse = torch.unique(n_in, return_inverse=True)
    return torch.stack([row_cost_bits(int(n)) for n in widths.tolist()])[inverse]


def allocate_row_bits(errors: Tensor, n_in: int | Tensor, budget: float) -> Tensor:
    """Widths ``[rows]`` (values of :data:`WIDTHS`) minimising ``sum_r errors[r, width_r]`` subject to an
    average of at most ``budget`` bits per weight (:func:`row_cost_bits`).

    errors: [rows, len(WIDTHS)] each row's error at each width;  n_in: the rows' length, one for all or
    ``[rows]`` (the rows of several matrices). Every row starts at the narrowest width; upgrades are
    taken in order of error saved per bit on each row's lower convex hull (a row whose second upgrade
    saves more per bit than its first gets both as one), as long as they fit: optimal for the bits
    spent, and less than one row's upgrade of the budget is left unspent.
    Raises InvalidConfig when even the narrowest tables exceed the budget.
    """
    out = errors.shape[0]
    lengths = torch.as_tensor(n_in, dtype=torch.int64).expand(out)
    cost = _row_costs(lengths)  # [rows, len(WIDTHS)]
    spare = budget * float(lengths.sum()) - float(cost[:, 0].sum())
    if spare < 0:
        raise InvalidConfig(
            f"a budget of {budget} bits per weight is below what {WIDTHS[0]}-bit rows reach: "
            f"{float(cost[:, 0].sum()) / float(lengths.sum()):.3f} bits per weight with their tables for rows of "
            f"{sorted(set(lengths.tolist()))} inputs; raise --bits"
        )
    e = errors.double()
    gain = e[:, :-1] - e[:, 1:]  # [rows, 2] error saved by each upgrade
    step = torch.diff(cost, dim=1)  # [rows, 2] its bits
    ratio = gain / step
    merged = ratio[:, 1] > ratio[:, 0]  # not convex: the hull goes straight to the widest
    ratio = torch.where(merged[:, None], (gain.sum(1) / step.sum(1))[:, None].expand(-1, 2), ratio)
    # Steps in order, the first upgrade of a row listed before its second (a stable sort keeps ties so).
    step_cost = torch.where(merged[:, None], torch.stack([step.sum(1), torch.zeros(out, dtype=torch.float64)], 1),
                            step).T.flatten()
    step_ratio = ratio.T.flatten()
    order = torch.sort(step_ratio, descending=True, stable=True).indices
    fits = (torch.cumsum(step_cost[order], 0) <= spare) & (step_ratio[order] > 0)
    taken = torch.zeros(2 * out, dtype=torch.bool)
    taken[order[: int(fits.long().cumprod(0).sum())]] = True
    taken = taken.view(2, out)
    upgrades = taken[0].long() + (taken[1] | (merged & taken[0])).long()
    return torch.tensor(WIDTHS, dtype=torch.int64)[upgrades]


def row_width_errors(w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig) -> Tensor:
    """``[out, len(WIDTHS)]``: each row's Fisher-weighted k-means error at each table width, the values
    that ``cfg`` extracts left out, as :func:`squeezellm_quantize` leaves them out."""
    _check_inputs(w, fisher, cfg)
    w = w.float()
    sensitive, outliers = extraction_masks(w, fisher, cfg)
    weight = _kmeans_weight(w, fisher, sensitive | outliers)
    return _width_errors(w, weight)[1]


def _width_errors(w: Tensor, weight: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Tables and codes of every width for every row, and their errors ``[out, len(WIDTHS)]``."""
    tables = [weighted_kmeans(w, weight, 2**b, fp16=True) for b in WIDTHS]
    return tables, torch.stack([weighted_kmeans_objective(w, weight, *t) for t in tables], dim=1)


def plan_row_bits(layers: Iterable[tuple[str, Tensor, Tensor | None]], cfg: SqueezeLLMConfig) -> dict[str, Tensor]:
    """One budget of ``cfg.bits`` bits per weight over every matrix of ``layers`` (``(name, w [out, in],
    fisher [out, in])``, e.g. all linears of a model): ``{name: row widths [out]}`` by
    :func:`allocate_row_bits` on all rows together. Only each row's errors are kept between matrices,
    so the matrices may stream through one at a time."""
    names, errors, lengths = [], [], []
    for name, w, fisher in layers:
        names.append((name, w.shape[0]))
        errors.append(row_width_errors(w, fisher, cfg))
        lengths.append(torch.full((w.shape[0],), w.shape[1], dtype=torch.int64))
    if not names:
        return {}
    bits = allocate_row_bits(torch.cat(errors), torch.cat(lengths), cfg.bits)
    return {name: part for (name, _), part in zip(names, bits.split([n for _, n in names]))}


def _mixed_tables(w: Tensor, weight: Tensor, budget: float, row_bits: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's table at its width: ``row_bits [out]`` from a model-wide plan, or (None) the matrix's
    own :func:`allocate_row_bits` on its rows' errors at every width. Returns (lut [out, 2**max(WIDTHS)]
    with +inf past each row's width, codes, row_bits)."""
    lut = torch.full((w.shape[0], 2 ** max(WIDTHS)), float("inf"))
    codes = torch.zeros_like(w, dtype=torch.uint8)
    if row_bits is None:
        tables, errors = _width_errors(w, weight)
        row_bits = allocate_row_bits(errors, w.shape[1], budget)
    else:
        if row_bits.shape != (w.shape[0],) or not bool(torch.isin(row_bits, torch.tensor(WIDTHS)).all()):
            raise ValueError(f"row_bits must be [{w.shape[0]}] widths among {WIDTHS}, got {tuple(row_bits.shape)}")
        for b in WIDTHS:
            rows = torch.nonzero(row_bits == b).flatten()
            if len(rows):  # only each row's own width is solved
                lut[rows, : 2**b], codes[rows] = weighted_kmeans(w[rows], weight[rows], 2**b, fp16=True)
        return lut, codes, row_bits
    for b, (c, q) in zip(WIDTHS, tables):
        rows = row_bits == b
        lut[rows, : 2**b] = c[rows]
        codes[rows] = q[rows]
    return lut, codes, row_bits


def _exact_sparse(w: Tensor, extracted: Tensor, lut: Tensor, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Park extracted values on their row's entry nearest 0; returns (lut, codes, zeroed rows).

    ``fl(entry + fl(w - entry)) == w`` holds unless ``|w|`` is far below ``|entry|`` (then ``w - entry``
    needs more bits than float32 has). In a row where that happens, the entry nearest 0 becomes exactly
    0 (it stays sorted: its neighbours are on either side of 0) and the row's codes are re-assigned.
    """
    zero_code = lut.abs().argmin(dim=1, keepdim=True)  # [out, 1]
    entry = lut.gather(1, zero_code)
    inexact = extracted & ((entry + (w - entry)) != w)
    zeroed = inexact.any(dim=1)
    if bool(zeroed.any()):
        lut = lut.clone()
        lut[zeroed] = lut[zeroed].scatter(1, zero_code[zeroed], 0.0)
        codes = codes.clone()
        codes[zeroed] = nearest_codes(w[zeroed], lut[zeroed])
    codes = torch.where(extracted, zero_code.to(codes.dtype), codes)
    return lut, codes, zeroed


def _check_inputs(w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig) -> None:
    if w.dim() != 2:
        raise InvalidConfig(f"squeezellm quantizes [out, in] matrices; got shape {tuple(w.shape)}")
    if fisher is not None and fisher.shape != w.shape:
        raise InvalidConfig(f"Fisher shape {tuple(fisher.shape)} differs from the weight's {tuple(w.shape)}")
    bad_w, bad_fisher = value_faults(w, None if fisher is None else fisher.float())
    if bad_w:
        raise InvalidConfig("the weight matrix has NaN or infinite values; squeezellm cannot quantize it")
    if fisher is None:
        if cfg.sensitive_pct > 0:
            raise InvalidConfig(
                f"sensitive_pct={cfg.sensitive_pct} needs Fisher information; compute it "
                "(`sqllm sensitivity`) or set sensitive_pct=0"
            )
        return
    if bad_fisher:
        raise InvalidConfig("Fisher information must be finite and >= 0 (a sum of squared gradients)")


def squeezellm_quantize(
    w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig, row_bits: Tensor | None = None
) -> QuantizedMatrix:
    """Quantize ``w: [out, in]`` with Fisher ``fisher: [out, in]`` (None: unweighted k-means); with
    ``cfg.mixed``, ``row_bits: [out]`` are the row widths of a model-wide plan (:func:`plan_row_bits`;
    None: the matrix allocates its own).

    Returns ``QuantizedMatrix(dense=LUTCodes(codes [out, in] uint8, lut [out, 2**bits] fp16-exact),
    sparse=SparseOutliers | None, info)``; ``info`` counts the extracted values (and their percentage of
    the matrix), the rows whose entry nearest 0 had to become 0, and the Fisher-weighted k-means
    objective over the non-extracted values.
    """
    w = w.float()
    _check_inputs(w, fisher, cfg)
    sensitive, outliers = extraction_masks(w, fisher, cfg)
    extracted = sensitive | outliers
    any_extracted = bool(extracted.any())
    weight = _kmeans_weight(w, fisher, extracted if any_extracted else None)
    # Codes are assigned to the fp16-rounded table, so a stored fp16 LUT reproduces this matrix exactly.
    if row_bits is not None and not cfg.mixed:
        raise ValueError("row_bits (a mixed-precision plan) given with mixed tables off")
    if cfg.mixed:
        lut, codes, row_bits = _mixed_tables(w, weight, cfg.bits, row_bits)
    else:
        lut, codes = weighted_kmeans(w, weight, 2**cfg.bits, fp16=True)
    sparse = None
    n_zeroed = 0
    if any_extracted:
        lut, codes, zeroed = _exact_sparse(w, extracted, lut, codes)
        n_zeroed = int(torch.count_nonzero(zeroed))
        rows, cols = extracted.nonzero(as_tuple=True)  # row-major: sorted by row, then column
        values = w[rows, cols] - lut[rows, codes[rows, cols].long()]
        sparse = SparseOutliers(rows=rows, cols=cols, values=values, shape=(w.shape[0], w.shape[1]))
    total = w.numel()
    # count_nonzero: a bool tensor's sum() is a tenth of a second on a 7B model's MLP matrices.
    n_sensitive, n_outliers = int(torch.count_nonzero(sensitive)), int(torch.count_nonzero(outliers))
    info: dict[str, Any] = {
        "sensitive": n_sensitive,
        "sensitive_pct": 100.0 * n_sensitive / total,
        "outliers": n_outliers,
        "outlier_pct": 100.0 * n_outliers / total,
        "zeroed_lut_rows": n_zeroed,
        "kmeans_objective": float(weighted_kmeans_objective(w, weight, lut, codes).sum()),
    }
    if row_bits is not None:
        info["row_bits"] = {b: int((row_bits == b).sum()) for b in WIDTHS}
    bits = cfg.bits if row_bits is None else int(row_bits.max())
    return QuantizedMatrix(dense=LUTCodes(codes=codes, lut=lut, bits=bits, row_bits=row_bits), sparse=sparse, info=info)
