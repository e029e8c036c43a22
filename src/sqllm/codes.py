"""Format-neutral results of quantizing one weight matrix.

Every quantizer returns a :class:`QuantizedMatrix`; the packer (``sqllm.formats``) stores one and the
QuantLinear modules (``sqllm.nn``) compute with one, without knowing which algorithm made it.

Conventions shared by every class here:

* ``w`` has shape ``[out, in]`` (``nn.Linear.weight``); codes have the same shape, dtype ``uint8``.
* Codebook parameters (scales, zeros, lookup tables) are float32 tensors whose values are exactly
  representable in float16 (see :func:`fp16_grid`). That is what the checkpoint stores, so the packed
  model dequantizes to the in-memory result bit for bit.
* Groups run along the input dimension: group ``g`` holds columns ``[g*G, min((g+1)*G, in))``; the last
  group may be partial (576 = 4 x 128 + 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def fp16_grid(t: Tensor) -> Tensor:
    """Round ``t`` to the nearest float16 value, keeping its dtype (so storage in fp16 is lossless)."""
    return t.to(torch.float16).to(t.dtype)


def num_groups(n_in: int, group_size: int) -> int:
    """Number of column groups of ``group_size`` over ``n_in`` columns, the last one possibly partial."""
    return math.ceil(n_in / group_size)


def lut_row_bits(n_in: int, width: int) -> int:
    """Bits one row of ``n_in`` weights stores in mixed-precision LUT form at ``width``: its codes, its
    float16 table of ``2**width`` entries and its byte in the width map."""
    return n_in * width + 16 * 2**width + 8


def expand_groups(t: Tensor, group_size: int, n_in: int) -> Tensor:
    """Broadcast per-group values ``t: [out, n_groups]`` (or ``[n_groups]``) to per-column ``[..., n_in]``."""
    return t.repeat_interleave(group_size, dim=-1)[..., :n_in]


@dataclass
class UniformCodes:
    """Group-wise asymmetric uniform codes: ``w[i, j] ~= scales[i, g(j)] * (codes[i, j] - zeros[i, g(j)])``.

    codes:      [out, in] uint8, in ``[0, 2**group_bits[g(j)] - 1]``
    scales:     [out, n_groups] float32 (fp16-representable)
    zeros:      [out, n_groups] float32 (fp16-representable; integers for GPTQ/RTN, any value for
                the binarized 1-bit groups of SliM-LLM, whose two levels are ``mu -/+ alpha``)
    group_bits: [n_groups] int64, the bit width of every group (one value repeated unless mixed precision)
    group_size: columns per group; ``in`` for per-output-channel quantization
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    group_bits: Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def is_mixed(self) -> bool:
        return bool((self.group_bits != self.group_bits[0]).any())

    def dequantize(self) -> Tensor:
        """Reference dequantization: ``[out, in]`` float32."""
        n_in = self.codes.shape[1]
        s = expand_groups(self.scales, self.group_size, n_in)
        z = expand_groups(self.zeros, self.group_size, n_in)
        return s * (self.codes.to(torch.float32) - z)

    def storage_bits(self) -> dict[str, int]:
        """Bits this representation needs, by part (codes; scales+zeros in fp16; bit map)."""
        out, n_in = self.codes.shape
        cols = torch.diff(torch.arange(0, n_in + self.group_size, self.group_size).clamp(max=n_in))
        code_bits = int((cols * self.group_bits).sum()) * out
        parts = {"codes": code_bits, "scales_zeros": 2 * 16 * self.scales.numel()}
        if self.is_mixed:
            parts["bit_map"] = 8 * self.group_bits.numel()
        return parts


@dataclass
class LUTCodes:
    """Non-uniform codes with one lookup table per output channel: ``w[i, j] ~= lut[i, codes[i, j]]``.

    codes:    [out, in] uint8 in ``[0, 2**row_width(i) - 1]``
    lut:      [out, 2**bits] float32 (fp16-representable); a row narrower than ``bits`` uses its first
              ``2**row_bits[i]`` entries and holds ``+inf`` in the rest (never indexed, never stored, and
              never nearest to any value)
    bits:     the width of every row, or the widest one when ``row_bits`` is given
    row_bits: [out] int64, each row's width (mixed-precision tables); None when all rows have ``bits``
    """

    codes: Tensor
    lut: Tensor
    bits: int
    row_bits: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def is_mixed(self) -> bool:
        return self.row_bits is not None and bool((self.row_bits != self.bits).any())

    def widths(self) -> Tensor:
        """[out] int64 width of every row."""
        if self.row_bits is None:
            return torch.full((self.codes.shape[0],), self.bits, dtype=torch.int64, device=self.codes.device)
        return self.row_bits

    def dequantize(self) -> Tensor:
        """Reference dequantization: ``[out, in]`` float32."""
        out = torch.empty(self.codes.shape, dtype=self.lut.dtype, device=self.codes.device)
        # A few rows at a time: gather wants int64 indices, and their copy of a whole 7B MLP matrix's codes
        # (360 MB) costs as much again as the gather; a chunk's copy stays in cache.
        for s in range(0, self.codes.shape[0], 64):
            torch.gather(self.lut[s : s + 64], 1, self.codes[s : s + 64].long(), out=out[s : s + 64])
        return out

    def storage_bits(self) -> dict[str, int]:
        """Bits by part: codes at each row's width, fp16 tables of ``2**width`` entries, and one byte per
        row for the width map when mixed."""
        widths = self.widths()
        parts = {"codes": int(widths.sum()) * self.codes.shape[1], "lut": 16 * int((1 << widths).sum())}
        if self.is_mixed:
            parts["bit_map"] = 8 * self.codes.shape[0]
        return parts


@dataclass
class SparseOutliers:
    """The sparse part of a dense-and-sparse decomposition (COO, sorted by row then column).

    rows, cols: [nnz] int64;  values: [nnz] float32;  shape: (out, in).
    Added to the dense part's dequantized weight.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense[self.rows, self.cols] = self.values
        return dense

    def storage_bits(self, value_bits: int = 16) -> dict[str, int]:
        """CSR cost: int32 row pointers and column indices, values at ``value_bits``."""
        return {"sparse": 32 * (self.shape[0] + 1) + (32 + value_bits) * self.nnz}


DenseCodes = UniformCodes | LUTCodes


@dataclass
class QuantizedMatrix:
    """What a quantizer returns for one weight ``[out, in]``: dense codes plus optional sparse outliers.

    ``info`` holds numbers worth reporting (e.g. how many values were extracted), never tensors needed
    to reconstruct the weight. ``rounded`` ([out, in] float32, optional) is a solver's by-product for a
    later refinement stage: the values it actually rounded (GPTQ's error-compensated weights, which
    SliM-LLM+ re-rounds on learned grids). It is never stored and plays no part in ``dequantize``.
    """

    dense: DenseCodes
    sparse: SparseOutliers | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rounded: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.dense.shape

    def dequantize(self) -> Tensor:
        """Reference reconstruction ``[out, in]`` float32: dense + sparse."""
        w = self.dense.dequantize()
        if self.sparse is not None and self.sparse.nnz:
            w = w.clone()
            w[self.sparse.rows, self.sparse.cols] += self.sparse.values
        return w

    def storage_bits(self) -> dict[str, int]:
        parts = dict(self.dense.storage_bits())
        if self.sparse is not None:
            parts.update(self.sparse.storage_bits())
        return parts

    def bits_per_weight(self) -> float:
        out, n_in = self.shape
        return sum(self.storage_bits().values()) / (out * n_in)
