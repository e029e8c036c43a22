"""Uniform asymmetric quantization grids shared by RTN, GPTQ and SliM-LLM.

``w ~= scale * (q - zero)`` with ``q`` in ``[0, 2**bits - 1]``; the grid of a row (or of a group of a
row) is fitted to its min and max. Scales are rounded to float16 so that the stored checkpoint
reproduces the in-memory model exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..codes import UniformCodes, fp16_grid, num_groups


def minmax_grid(w: Tensor, bits: int, sym: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero for each row of ``w: [rows, n]`` (the min-max fit). Returns ``([rows], [rows])``.

    The range always contains 0, as in GPTQ, so that zero weights stay exactly zero.
    """
    maxq = 2**bits - 1
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    flat = wmax == wmin
    wmin = torch.where(flat, wmin - 1, wmin)
    wmax = torch.where(flat, wmax + 1, wmax)
    scale = fp16_grid((wmax - wmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``; scale/zero broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_grid(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (q - zero)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round ``w`` onto its grid and back (same shape as ``w``)."""
    return dequantize_grid(quantize_to_grid(w, scale, zero, bits), scale, zero)


def group_view(w: Tensor, group_size: int) -> tuple[Tensor, int]:
    """Reshape ``w: [out, in]`` to ``[out * n_groups, group_size]`` groups, padding a partial last group
    by repeating its last column (which leaves its min and max unchanged). Returns (groups, pad)."""
    out, n_in = w.shape
    n_g = num_groups(n_in, group_size)
    pad = n_g * group_size - n_in
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out * n_g, group_size), pad


def quantize_groups_minmax(w: Tensor, bits: int, group_size: int | None, sym: bool = False) -> UniformCodes:
    """Min-max quantization of ``w: [out, in]`` per group of ``group_size`` columns (None: per channel)."""
    w = w.float()
    out, n_in = w.shape
    g = n_in if group_size is None else group_size
    groups, pad = group_view(w, g)
    scale, zero = minmax_grid(groups, bits, sym)
    q = quantize_to_grid(groups, scale[:, None], zero[:, None], bits)
    n_g = num_groups(n_in, g)
    codes = q.reshape(out, n_g * g)[:, :n_in].to(torch.uint8)
    return UniformCodes(
        codes=codes,
        scales=scale.reshape(out, n_g),
        zeros=zero.reshape(out, n_g),
        group_bits=torch.full((n_g,), bits, dtype=torch.int64),
        group_size=g,
    )
