"""SliM-LLM (Huang et al. 2024, "SliM-LLM: Salience-Driven Mixed-Precision Quantization for Large
Language Models") on one weight matrix.

1. Salience (§3.1): ``delta_ij = w_ij^2 / d_j^2`` with ``d`` the diagonal of the Cholesky factor of
   ``H^-1`` (reference code) or of ``H^-1`` itself (paper formula); a group's salience is its sum.
2. SBA, salience-determined bit allocation (§3.2): the ``p`` least salient groups get ``N-1`` bits,
   the ``p`` most salient ``N+1``, the rest ``N``; ``p`` minimizes the KL divergence between the
   softmax over output features of the full-precision and of a cheaply quantized layer output.
3. SQC, salience-weighted quantizer calibration (§3.3): per group and row, a multiplier of the
   min-max range chosen to minimize a squared error in which the group's most salient weights weigh more.
4. GPTQ with the per-group bit widths (error feedback across groups of different bits) using SQC
   grids, and binarization ``alpha * sign(w - mu) + mu`` for 1-bit groups (2-bit target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..codes import QuantizedMatrix, fp16_grid, num_groups
from ..config import SliMConfig
from .gptq import (
    PreparedHessian,
    check_hessian_shape,
    gptq_core,
    group_slices,
    nearest_codes,
    solver_inputs,
    sweep_hessian_error,
)
from .uniform import dequantize_grid, minmax_grid, quantize_to_grid

# Smallest binarization half-gap, relative to |mu| and absolute: keeps the stored fp16 zero
# (alpha - mu) / (2 alpha) finite (|zero| <= 2**9) and the fp16 scale a normal number.
BINARY_MIN_REL_ALPHA = 2.0**-10
BINARY_MIN_ALPHA = 2.0**-15
# Elements of the [grid points, rows, columns] SQC search tensor evaluated at once (bounds memory).
SQC_CHUNK_ELEMENTS = 2**24


def salience_denominator(hinv_u: Tensor, mode: str) -> Tensor:
    """``d: [in]`` of the salience ``w^2 / d^2`` (§3.1). hinv_u: [in, in] with ``H^-1 = U^T U``.

    "cholesky": ``diag(U)``, as the reference code; "inverse": ``diag(H^-1) = sum_k U_kj^2``."""
    if mode == "cholesky":
        return torch.diagonal(hinv_u).clone()
    return hinv_u.pow(2).sum(dim=0)


def group_salience(w: Tensor, d: Tensor, group_size: int) -> Tensor:
    """Salience of every column group: ``sum_{i, j in g} w_ij^2 / d_j^2``. w: [out, in]; d: [in] -> [n_groups]."""
    n_in = w.shape[1]
    col = (w.pow(2) / d.pow(2)).sum(dim=0)
    return torch.zeros(num_groups(n_in, group_size), dtype=col.dtype, device=col.device).index_add_(
        0, torch.arange(n_in, device=col.device) // group_size, col
    )


def sba_bits(salience: Tensor, n_full: int, bits: int, p: int) -> Tensor:
    """Bit map ``[n_groups]`` int64 (§3.2): among the ``n_full`` full groups, the ``p`` least salient get
    ``bits - 1`` and the ``p`` most salient ``bits + 1``; the rest, and a partial last group, ``bits``.

    Keeping the partial group at ``bits`` makes the average exact per weight, not only per group.
    Ties in salience are ranked by group index (stable sort), so the result is deterministic.
    """
    if not 0 <= 2 * p <= n_full:
        raise ValueError(f"p={p} must be in [0, {n_full // 2}] for {n_full} full groups")
    out = torch.full((salience.numel(),), bits, dtype=torch.int64)
    order = torch.argsort(salience[:n_full].cpu(), stable=True)
    if p:  # order[n_full - 0:] would be every group
        out[order[:p]] = bits - 1
        out[order[n_full - p :]] = bits + 1
    return out


def binary_grid(w: Tensor) -> tuple[Tensor, Tensor]:
    """1-bit grid of each row of ``w: [rows, n]`` whose levels are ``mu -/+ alpha`` (§3.2, 1-bit groups).

    ``mu`` = row mean, ``alpha`` = mean ``|w - mu|`` (the L2-optimal binarization given the sign pattern).
    As UniformCodes: ``scale = 2 alpha``, ``zero = (alpha - mu) / scale`` so that ``scale * (0 - zero)
    = mu - alpha`` and ``scale * (1 - zero) = mu + alpha``; code 1 where ``w >= mu``.
    The zero is computed from the fp16-rounded scale and then rounded itself, so the stored pair
    gives both levels to within fp16 precision of ``|mu| + alpha``. A constant row (``alpha == 0``)
    gets ``zero = -mu / scale`` instead, whose level 0 is ``mu`` itself (exact for all-zero rows).
    Returns (scale [rows], zero [rows]), fp16-representable.
    """
    mu = w.mean(dim=1)
    alpha = (w - mu[:, None]).abs().mean(dim=1)
    alpha_eff = torch.maximum(alpha, (mu.abs() * BINARY_MIN_REL_ALPHA).clamp(min=BINARY_MIN_ALPHA))
    scale = fp16_grid(2 * alpha_eff)
    zero = fp16_grid(torch.where(alpha == 0, -mu, alpha_eff - mu) / scale)
    return scale, zero


def sqc_multipliers(cfg: SliMConfig) -> Tensor:
    """Range multipliers searched by SQC: exactly 1 (plain min-max, preferred on ties) then
    ``cfg.sqc_grid`` points evenly spaced over ``cfg.sqc_range``. -> [P] float32."""
    lo, hi = cfg.sqc_range
    return torch.cat([torch.ones(1), torch.linspace(lo, hi, cfg.sqc_grid)])


def _salient_weights(salience: Tensor, frac: float, weight: float) -> Tensor:
    """Per-element SQC weight: ``weight`` for the ``frac`` most salient elements of the group, else 1."""
    k = round(frac * salience.numel())
    if k == 0:
        return torch.ones_like(salience)
    threshold = torch.topk(salience.flatten(), k).values[-1]
    return torch.where(salience >= threshold, weight, 1.0)


def sqc_grid(
    w: Tensor, bits: int, salience: Tensor, multipliers: Tensor, salient_frac: float, salient_weight: float
) -> tuple[Tensor, Tensor]:
    """SQC (§3.3): per row of a group, the min-max grid with its range ``[p*min, p*max]`` scaled by the
    ``p`` in ``multipliers`` that minimizes ``sum_j c_j (w_j - Q_p(w_j))^2``, where ``c_j`` is
    ``salient_weight`` for the ``salient_frac`` most salient weights of the whole group, else 1.

    w, salience: [rows, n]; multipliers: [P]. Evaluated at once over all grid points and rows (in
    row chunks bounding memory), with the fp16-rounded scales that will be stored.
    Returns (scale [rows], zero [rows]); with ``multipliers[0] == 1`` never worse than min-max.
    """
    rows, n = w.shape
    maxq = 2**bits - 1
    c = _salient_weights(salience, salient_frac, salient_weight)
    # the same range as minmax_grid: it contains 0, and all-zero rows get [-1, 1]
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    flat = wmax == wmin
    wmin = torch.where(flat, wmin - 1, wmin)
    wmax = torch.where(flat, wmax + 1, wmax)
    multipliers = multipliers.to(w)
    lo = multipliers[:, None] * wmin[None]  # [P, rows]
    hi = multipliers[:, None] * wmax[None]
    scale = fp16_grid((hi - lo) / maxq)
    zero = torch.round(-lo / scale)
    best = torch.empty(rows, dtype=torch.int64, device=w.device)
    step = max(1, SQC_CHUNK_ELEMENTS // (multipliers.numel() * n))
    for r in range(0, rows, step):
        s, z = scale[:, r : r + step, None], zero[:, r : r + step, None]
        x = w[None, r : r + step]
        err = (c[None, r : r + step] * (dequantize_grid(quantize_to_grid(x, s, z, bits), s, z) - x).pow(2)).sum(-1)
        best[r : r + step] = err.argmin(dim=0)
    idx = best[None]
    return scale.gather(0, idx)[0], zero.gather(0, idx)[0]


def fake_quantize_groups(w: Tensor, group_size: int, bits: int) -> Tensor:
    """The cheap quantizer of the SBA search: min-max per row and group at ``bits`` (binarization at 1
    bit), without error feedback. w: [out, in] -> dequantized [out, in]."""
    q = torch.empty_like(w)
    for cols in group_slices(w.shape[1], group_size):
        wg = w[:, cols]
        s, z = binary_grid(wg) if bits == 1 else minmax_grid(wg, bits)
        s, z = s[:, None], z[:, None]
        q[:, cols] = dequantize_grid(nearest_codes(wg, s, z, 2**bits - 1), s, z)
    return q


def _kl(p: Tensor, log_p: Tensor, y_q: Tensor) -> float:
    """``KL(P || Q)`` per token, averaged: P the full-precision output distribution (``p`` and its log,
    [n, out]), Q the softmax over output features of the quantized output ``y_q: [n, out]``."""
    log_q = F.log_softmax(y_q, dim=-1)
    return float((p * (log_p - log_q)).sum(dim=-1).mean())


def kl_search(w: Tensor, inputs: Tensor, salience: Tensor, group_size: int, bits: int) -> tuple[int, list[float]]:
    """SBA search (§3.2): the ``p`` in ``[0, n_full // 2]`` whose bit map (:func:`sba_bits`) minimizes the
    KL divergence of the output distribution, with :func:`fake_quantize_groups` as the quantizer.

    w: [out, in]; inputs: [n_tok, in]; salience: [n_groups]. The matrix is quantized once at each of
    ``bits - 1, bits, bits + 1``; the bit map of ``p`` differs from that of ``p - 1`` in two groups
    only, so its output is the previous one plus those groups' partial products
    ``x_g (Q_g[new bits] - Q_g[old bits])^T``.
    Returns (best p, smallest on ties; KL of every candidate p = 0, 1, ...).
    """
    n_full = w.shape[1] // group_size
    q = {b: fake_quantize_groups(w, group_size, b) for b in (bits - 1, bits, bits + 1)}
    log_p = F.log_softmax(inputs @ w.T, dim=-1)
    p_full = log_p.exp()  # once: every candidate compares against the same P
    y = inputs @ q[bits].T
    kls = [_kl(p_full, log_p, y)]
    prev = sba_bits(salience, n_full, bits, 0)
    for p in range(1, n_full // 2 + 1):
        cur = sba_bits(salience, n_full, bits, p)
        for g in torch.nonzero(cur != prev).flatten().tolist():
            cols = slice(g * group_size, (g + 1) * group_size)
            y += inputs[:, cols] @ (q[int(cur[g])][:, cols] - q[int(prev[g])][:, cols]).T
        kls.append(_kl(p_full, log_p, y))
        prev = cur
    return int(torch.tensor(kls).argmin()), kls


def slim_quantize(
    w: Tensor, hessian: Tensor, inputs: Tensor, cfg: SliMConfig, *, name: str = "", keep_rounded: bool = False,
    prepared: PreparedHessian | None = None,
) -> QuantizedMatrix:
    """SliM-LLM on one weight ``w: [out, in]`` given ``hessian: [in, in]`` and calibration ``inputs:
    [n_tok, in]``; ``cfg.bits`` (2 or 3) is the exact average bits per code.

    info: ``p`` (groups moved down and up), ``group_bits`` (bit map, list), ``kl`` (per candidate p),
    ``damp`` (damping fraction used), ``hessian_error`` (``tr(dW H dW^T)`` of the returned weight).
    keep_rounded: also return the values the sweep rounded (``QuantizedMatrix.rounded``), which
    SliM-LLM+'s clipping training starts from. prepared: :func:`~sqllm.quant.gptq.prepare_hessian` of
    this ``hessian`` (``cfg.percdamp``, no act-order), shared with linears of the same input.
    """
    check_hessian_shape(w, hessian)
    if inputs is None or inputs.dim() != 2 or inputs.shape[1] != w.shape[1]:
        got = None if inputs is None else tuple(inputs.shape)
        raise ValueError(f"calibration inputs of shape {got} do not match weight {tuple(w.shape)}; expected [n, in]")
    w1, prepared = solver_inputs(w, hessian, cfg.percdamp, False, name, prepared)
    u, damp = prepared.u, prepared.frac
    n_in = w1.shape[1]
    group_size = cfg.group_size if cfg.group_size is not None else n_in
    d = salience_denominator(u, cfg.salience)
    salience = group_salience(w1, d, group_size)
    p, kls = kl_search(w1, inputs.float(), salience, group_size, cfg.bits)
    group_bits = sba_bits(salience, n_in // group_size, cfg.bits, p)
    multipliers = sqc_multipliers(cfg)

    def fit(wg: Tensor, bits: int, cols: slice) -> tuple[Tensor, Tensor]:
        if bits == 1:
            return binary_grid(wg)
        sal = wg.pow(2) / d[cols].pow(2)
        return sqc_grid(wg, bits, sal, multipliers, cfg.sqc_salient_frac, cfg.sqc_salient_weight)

    dense, q, rounded = gptq_core(w1, u, group_size, group_bits, fit, blocksize=cfg.blocksize)
    info = {
        "p": p,
        "group_bits": group_bits.tolist(),
        "kl": kls,
        "damp": damp,
        "hessian_error": sweep_hessian_error(w1, q, rounded, u, prepared.damp_abs, prepared.dead),
    }
    return QuantizedMatrix(dense=dense, info=info, rounded=rounded if keep_rounded else None)
