"""SqueezeLLM+: SqueezeLLM's lookup tables refined against the layer's Fisher-weighted output error.

SqueezeLLM fits each row's table to its own weights under the diagonal Fisher ``F``, which ignores
that the layer's inputs are correlated. LNQ (Kim et al., "GuidedQuant", ICML 2025) refines such tables
against the output error instead, weighting every output channel by the end loss's gradients; without
that weighting the output error alone did worse than SqueezeLLM. Here row ``r``'s error
``e_r = w_r - what_r`` is charged

    L_r = e_r^T H_r e_r,   H_r = S_r C S_r,   S_r = diag(sqrt(F_r)),   C = correlation of the inputs,

the output error under the Fisher-weighted Hessian ``sum_t g_r(t)^2 x(t) x(t)^T`` whose diagonal is
exactly ``F_r`` and whose correlations are those of the inputs ``x`` (GPTQ's ``H = 2/n X^T X``,
normalised). It reduces to SqueezeLLM's objective for uncorrelated inputs and to GPTQ's, scaled per
row, when ``F`` factors into a row term times ``diag(H)``. In the scaled coordinates ``v = S w`` every
row shares the Hessian ``C``, so one Cholesky factor serves all rows.

Starting from SqueezeLLM's tables and codes, two steps alternate, each batched over all rows:

* codes: a GPTQ sweep in the scaled coordinates, column by column, each value rounded to the nearest
  entry of its row's table and its error fed forward through ``chol(C^-1)``;
* tables: given the codes, each row's table solves its ``K x K`` least-squares problem
  ``(B^T C B) c = B^T C v`` (``B``: the scaled one-hot code matrix), rounded to float16.

A row takes a step's result only where it lowers ``L_r`` (computed exactly in float64), so the
objective never rises and every row ends at or below its SqueezeLLM start. Values extracted into the
sparse part stay exact (zero error) and are left out of both steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..codes import LUTCodes, QuantizedMatrix, SparseOutliers, fp16_grid
from ..config import SqueezeLLMPlusConfig
from .gptq import hessian_inverse_factor, single_threaded
from .squeezellm import _exact_sparse, squeezellm_quantize

_BLOCK = 128  # columns per lazy-batch block of the code sweep (GPTQ §4)


@dataclass(frozen=True)
class OutputMetric:
    """The per-row output metric ``H_r = S_r C S_r`` of one layer.

    scale: [out, in] float32, ``sqrt(F + fisher_damp * mean_row(F))`` (every entry > 0)
    corr:  [in, in] float32, the inputs' correlation matrix after damping (unit diagonal)
    """

    scale: Tensor
    corr: Tensor


def output_metric(fisher: Tensor, hessian: Tensor, percdamp: float, fisher_damp: float) -> OutputMetric:
    """Build the metric from ``fisher: [out, in]`` and ``hessian: [in, in]`` (``2/n X^T X``).

    ``percdamp`` adds that fraction of ``mean(diag H)`` to ``diag H`` (GPTQ's damping; it also gives
    inputs never active in calibration a unit diagonal after normalising), ``fisher_damp`` adds that
    fraction of each row's mean Fisher, so no weight is free to take any value.
    """
    h = hessian.double()
    h = h + percdamp * torch.diagonal(h).mean().clamp_min(1e-30) * torch.eye(h.shape[0], dtype=h.dtype)
    d = torch.diagonal(h).sqrt()
    corr = (h / d[:, None] / d[None, :]).float()
    f = fisher.double()
    f = f + fisher_damp * f.mean(1, keepdim=True) + 1e-30  # 1e-30: rows without any Fisher
    return OutputMetric(scale=f.sqrt().float(), corr=corr)


def row_objective(w: Tensor, wq: Tensor, metric: OutputMetric) -> Tensor:
    """``[out]`` float64 ``L_r = e_r^T S_r C S_r e_r`` with ``e = w - wq`` (``[out, in]`` each)."""
    e = (w.double() - wq.double()) * metric.scale.double()
    return ((e @ metric.corr.double()) * e).sum(1)


def _dequantize(lut: Tensor, codes: Tensor, w: Tensor, extracted: Tensor) -> Tensor:
    """``[out, in]``: table values, and the exact weights where ``extracted``."""
    return torch.where(extracted, w, lut.gather(1, codes.long()))


def sweep_codes(w: Tensor, lut: Tensor, extracted: Tensor, metric: OutputMetric, u: Tensor) -> Tensor:
    """GPTQ's sweep with per-row tables: new codes ``[out, in]`` uint8 for ``w: [out, in]``.

    In the scaled coordinates ``v = S w`` the metric is ``C`` for every row, ``u`` the upper Cholesky
    factor of ``C^-1``. Each column is rounded to the nearest table entry (in ``w``'s units: the scale
    is positive, so nearest is the same in both) after the errors of all earlier columns were fed into
    it; an extracted value is set to its exact weight, and its leftover error fed forward likewise.
    The sweep runs on transposed copies, so that each column it visits is contiguous.
    """
    s_t = metric.scale.T.contiguous()  # [in, out]
    w_t = w.T.contiguous()
    v_t = w_t * s_t
    mids = (lut[:, :-1] + lut[:, 1:]) / 2  # [out, K - 1]: x belongs to entry #{mids < x}
    exact = extracted.T.contiguous() if bool(extracted.any()) else None
    codes_t = torch.empty(w_t.shape, dtype=torch.uint8)
    n_in = w.shape[1]
    for b0 in range(0, n_in, _BLOCK):
        b1 = min(b0 + _BLOCK, n_in)
        v1 = v_t[b0:b1].clone()
        err1 = torch.empty_like(v1)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            q = (mids < (v1[i] / s_t[j]).unsqueeze(1)).sum(1)
            target = lut.gather(1, q.unsqueeze(1)).squeeze(1)
            if exact is not None:
                target = torch.where(exact[j], w_t[j], target)
            err = (v1[i] - target * s_t[j]) / u1[i, i]
            v1[i:] -= torch.outer(u1[i, i:], err)
            err1[i] = err
            codes_t[j] = q
        v_t[b1:].addmm_(u[b0:b1, b1:].T, err1, alpha=-1)  # in place: no [rest, out] temporary
    return codes_t.T.contiguous()


def solve_tables(
    w: Tensor, lut: Tensor, codes: Tensor, extracted: Tensor, metric: OutputMetric, *, chunk_elements: int = 1 << 24
) -> Tensor:
    """Least-squares tables ``[out, K]`` (float64, unsorted, not rounded) for fixed codes.

    Row r minimises ``(t_r - B_r c)^T C (t_r - B_r c)`` over ``c``, with ``t = S w`` and ``B_r[j, a] =
    s_rj [codes_rj = a]`` (zero at extracted values, whose error is zero anyway): the normal equations
    ``G_r c = h_r``, ``G_r = B_r^T C B_r``, ``h_r = B_r^T C t_r``. A small ridge towards the current
    table keeps rows with unused entries solvable (those entries stay where they are).

    Rows are solved in chunks of about ``chunk_elements`` entries of ``B^T`` (``[rows, K, in]``, held in
    float32 and float64 at once): whole, a 7B model's MLP matrix would need about 10 GB at 3 bits and 20 GB
    at 4, by those tensors' sizes.
    """
    rows = max(1, chunk_elements // (lut.shape[1] * w.shape[1]))
    parts = [
        _solve_table_rows(w[r : r + rows], lut[r : r + rows], codes[r : r + rows], extracted[r : r + rows],
                          metric.scale[r : r + rows], metric.corr)
        for r in range(0, w.shape[0], rows)
    ]
    return torch.cat(parts) if parts else torch.empty(lut.shape, dtype=torch.float64)


def _solve_table_rows(w: Tensor, lut: Tensor, codes: Tensor, extracted: Tensor, scale: Tensor, corr: Tensor) -> Tensor:
    """:func:`solve_tables` of a few rows, ``scale: [rows, in]`` their part of the metric's scale."""
    out, n_in = w.shape
    k = lut.shape[1]
    s = scale * (~extracted)
    bt = torch.zeros(out, k, n_in).scatter_(1, codes.long().unsqueeze(1), s.unsqueeze(1))  # B_r^T, [out, K, in]
    # B_r^T C and t_r^T C for every row in one product (C is symmetric): [out * (K + 1), in] @ [in, in].
    m = torch.cat([bt.reshape(out * k, n_in), w * s]) @ corr
    bc, tc = m[: out * k].reshape(out, k, n_in).double(), m[out * k:].double()
    btd = bt.double()
    g = torch.bmm(bc, btd.transpose(1, 2))  # [out, K, K]
    h = torch.bmm(btd, tc.unsqueeze(2)).squeeze(2)  # [out, K]
    ridge = 1e-9 * torch.diagonal(g, dim1=1, dim2=2).sum(1).clamp_min(1e-30) / k
    eye = torch.eye(k, dtype=torch.float64)
    return torch.linalg.solve(g + ridge[:, None, None] * eye, h + ridge[:, None] * lut.double())


def _sorted_table(lut: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
    """The same assignment with the table sorted ascending (codes relabelled)."""
    lut, order = lut.sort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(lut.shape[1]).expand_as(order))
    return lut, rank.gather(1, codes.long()).to(torch.uint8)


def corr_inverse_factor(metric: OutputMetric) -> Tensor:
    """Upper Cholesky factor ``[in, in]`` of ``C^-1`` (``C`` is damped already)."""
    return hessian_inverse_factor(metric.corr, 0.0, "squeezellm+")[0]


def refine_tables(
    w: Tensor, lut: Tensor, codes: Tensor, extracted: Tensor, metric: OutputMetric, iters: int, u: Tensor
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Alternate :func:`sweep_codes` and :func:`solve_tables` ``iters`` times from ``(lut, codes)``.

    w: [out, in] float32; lut: [out, K] fp16-representable, sorted; codes: [out, in] uint8;
    extracted: [out, in] bool; u: :func:`corr_inverse_factor`. Every row keeps a step's result only
    where it lowers its objective. Returns (lut, codes, info) with ``info``: ``objective_start`` /
    ``objective`` (sums over rows) and the rows each step improved.
    """
    best = row_objective(w, _dequantize(lut, codes, w, extracted), metric)
    info = {"objective_start": float(best.sum()), "rows_codes_improved": 0, "rows_tables_improved": 0}
    for _ in range(iters):
        with single_threaded():
            new_codes = sweep_codes(w, lut, extracted, metric, u)
        lut, codes, best, n = _take_better(w, extracted, metric, best, (lut, codes), (lut, new_codes))
        info["rows_codes_improved"] += n
        new_lut, new_codes = _sorted_table(fp16_grid(solve_tables(w, lut, codes, extracted, metric).float()), codes)
        lut, codes, best, n = _take_better(w, extracted, metric, best, (lut, codes), (new_lut, new_codes))
        info["rows_tables_improved"] += n
    info["objective"] = float(best.sum())
    return lut, codes, info


def _take_better(
    w: Tensor, extracted: Tensor, metric: OutputMetric, best: Tensor,
    old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per row, ``new`` (lut, codes) where its objective is below ``best``; returns (lut, codes, objective,
    rows taken)."""
    obj = row_objective(w, _dequantize(*new, w, extracted), metric)
    take = obj < best
    lut = torch.where(take[:, None], new[0], old[0])
    codes = torch.where(take[:, None], new[1], old[1])
    return lut, codes, torch.where(take, obj, best), int(take.sum())


def squeezellm_plus_quantize(
    w: Tensor, fisher: Tensor, hessian: Tensor, cfg: SqueezeLLMPlusConfig, row_bits: Tensor | None = None
) -> QuantizedMatrix:
    """SqueezeLLM on ``w: [out, in]`` with ``fisher: [out, in]`` (mixed-precision tables too, their row
    widths ``row_bits: [out]`` from a model-wide plan where given), then :func:`refine_tables` against
    the layer's Fisher-weighted output error (``hessian: [in, in] = 2/n X^T X``), the rows of each
    table width together.

    Returns the same kind of result as :func:`~sqllm.quant.squeezellm.squeezellm_quantize` (LUT codes
    plus exact sparse outliers); ``info`` adds the refinement's numbers.
    """
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match weight {tuple(w.shape)}")
    return _refined(w, fisher, hessian, cfg, row_bits)


def _refined(
    w: Tensor, fisher: Tensor, hessian: Tensor, cfg: SqueezeLLMPlusConfig, row_bits: Tensor | None
) -> QuantizedMatrix:
    start = squeezellm_quantize(w, fisher, cfg, row_bits)
    w = w.float()
    extracted = torch.zeros_like(w, dtype=torch.bool)
    if start.sparse is not None:
        extracted[start.sparse.rows, start.sparse.cols] = True
    metric = output_metric(fisher, hessian.float(), cfg.percdamp, cfg.fisher_damp)
    u = corr_inverse_factor(metric)
    dense = start.dense
    assert isinstance(dense, LUTCodes)
    lut, codes = dense.lut.clone(), dense.codes.clone()
    widths = dense.widths()
    info: dict[str, float] = {}
    for b in torch.unique(widths).tolist():
        rows = torch.nonzero(widths == b).flatten()
        part = OutputMetric(scale=metric.scale[rows], corr=metric.corr)
        lut_b, codes[rows], info_b = refine_tables(
            w[rows], lut[rows, : 2**b], codes[rows], extracted[rows], part, cfg.iters, u
        )
        lut[rows, : 2**b] = lut_b
        info = {k: info.get(k, 0) + v for k, v in info_b.items()}
    lut, codes, zeroed = _exact_sparse(w, extracted, lut, codes)
    sparse = None
    if start.sparse is not None:
        rows, cols = start.sparse.rows, start.sparse.cols
        values = w[rows, cols] - lut[rows, codes[rows, cols].long()]
        sparse = SparseOutliers(rows=rows, cols=cols, values=values, shape=start.sparse.shape)
    result = QuantizedMatrix(dense=LUTCodes(codes=codes, lut=lut, bits=dense.bits, row_bits=dense.row_bits),
                             sparse=sparse, info={**start.info, **info, "zeroed_lut_rows": int(zeroed.sum())})
    end = row_objective(w, result.dequantize(), metric)
    if bool(zeroed.any()):
        # Parking an extracted value exactly can force a table entry to 0 and re-round its row: such a
        # row keeps its refinement only where that still beats its start.
        begin = row_objective(w, start.dequantize(), metric)
        worse = end > begin
        if bool(worse.any()):
            result = _revert_rows(start, result, worse)
            end = torch.where(worse, begin, end)
    result.info["objective"] = float(end.sum())
    return result


def _revert_rows(start: QuantizedMatrix, result: QuantizedMatrix, rows: Tensor) -> QuantizedMatrix:
    """``result`` with ``rows`` ([out] bool) taken from ``start`` (dense codes, tables and sparse values)."""
    assert isinstance(start.dense, LUTCodes) and isinstance(result.dense, LUTCodes)
    lut = torch.where(rows[:, None], start.dense.lut, result.dense.lut)
    codes = torch.where(rows[:, None], start.dense.codes, result.dense.codes)
    sparse = None
    if result.sparse is not None and start.sparse is not None:
        from_start = rows[result.sparse.rows]
        values = torch.where(from_start, start.sparse.values, result.sparse.values)
        sparse = SparseOutliers(result.sparse.rows, result.sparse.cols, values, result.sparse.shape)
    dense = LUTCodes(codes=codes, lut=lut, bits=start.dense.bits, row_bits=start.dense.row_bits)
    return QuantizedMatrix(dense=dense, sparse=sparse, info={**result.info, "rows_reverted": int(rows.sum())})
