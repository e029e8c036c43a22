"""Linear layers that hold a packed quantized weight (exactly the tensors of ``formats.layouts``).

Three ways to compute ``y = x W^T + b`` with ``W`` = dequantized dense codes + sparse outliers:

* the reference path: unpack and dequantize the whole weight (bit for bit ``QuantizedMatrix.dequantize``),
  one matmul. Everything else is tested against it.
* the tiled path (default): a few output rows at a time, unpack the rows' codes in the packer's
  block-planar order (:func:`~sqllm.formats.bitpack.unpack_planar`, once per call, as uint8), dequantize
  them and multiply by ``x`` permuted to that column order, so the fp weight never exists whole and the
  codes are never interleaved back. Decode (<= ``DECODE_TOKENS`` rows of ``x``) uses small, cache-sized tiles; prefill
  uses large ones, where the matmul amortizes the dequantization. Outliers are added with a sparse CSR
  product. Plain eager torch, any device.
* the kernel path (:mod:`sqllm.nn.kernels`, AVX-512 CPUs): decode reads the packed codes straight into
  a matrix-vector product (LUT lookups by in-register permutes, outliers from the CSR rows); prefill
  dequantizes row tiles with the same code reader and multiplies them with torch.

``path="auto"`` (the default) takes the kernel where it applies (CPU tensors, codes of at most 4 bits,
uniform groups a multiple of 16 columns, no gradient wanted) and the tiled path elsewhere. Nothing
holds a dense weight unless :meth:`QuantLinear.cache_dense_weight` asks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codes import QuantizedMatrix
from ..formats.bitpack import block_shape, planar_columns, unpack_planar
from ..formats.layouts import LayerMeta, group_columns, matrix_meta, pack_matrix, tensor_specs, unpack_matrix
from ..formats.layouts import storage_bits as layout_storage_bits
from ..formats.sparse import csr_rows
from . import kernels as _kernels

DECODE_TOKENS = 8
DECODE_TILE = 1 << 18  # weight elements dequantized at once when decoding (1 MiB fp32, about an L2)
PREFILL_TILE = 1 << 21  # larger tiles when the matmul dominates
PATHS = ("auto", "kernel", "tiled", "reference")


@dataclass(frozen=True)
class _Part:
    """Columns stored in one packed tensor (the whole matrix, or one width's groups when mixed).

    columns:   [cpb * L] int64, the input column of each planar position (``in`` = padding, reads a zero)
    groups:    [n_groups_part] int64, global group of each of the part's groups (uniform only)
    pos_group: [cpb * L] int64, the part-local group of each planar position, only where groups do
               not line up with whole blocks (``group_size % cpb != 0``); None where they broadcast
    """

    buffer: str
    bits: int
    n: int
    pad_to: int
    columns: Tensor
    groups: Tensor | None = None
    pos_group: Tensor | None = None


class QuantLinear(nn.Module):
    """``nn.Linear`` replacement whose buffers are the packed tensors named by ``tensor_specs(meta)``.

    Build it empty from the meta (``device="meta"`` for a checkpoint skeleton) and fill it with
    ``load_state_dict(..., assign=True)``, or from a QuantizedMatrix with :meth:`from_matrix`.
    bias_dtype: dtype of the optional ``bias`` buffer ``[out]`` (the model's dtype); None for no bias.
    """

    def __init__(self, meta: LayerMeta, bias_dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.meta = meta
        self.out_features, self.in_features = meta.shape
        for name, spec in tensor_specs(meta).items():
            self.register_buffer(name, torch.empty(spec.shape, dtype=spec.dtype, device=device))
        bias = None if bias_dtype is None else torch.zeros(self.out_features, dtype=bias_dtype, device=device)
        self.register_buffer("bias", bias)
        self.path = "auto"
        self.dense_cache: Tensor | None = None
        self._kernel_parts: list[tuple[str, int, Tensor | None, Tensor | None]] | None = None
        self._row_parts: list[tuple[Tensor, QuantLinear]] | None = None  # mixed-width LUT rows

    @classmethod
    def from_matrix(
        cls, qm: QuantizedMatrix, bias: Tensor | None = None, value_dtype: torch.dtype = torch.float32
    ) -> QuantLinear:
        """Pack ``qm`` (outlier values stored in ``value_dtype``) into a new module, via the same
        meta-device + ``load_state_dict(assign=True)`` route a checkpoint loader takes."""
        tensors: dict[str, Tensor] = pack_matrix(qm, "", value_dtype)
        module = cls(matrix_meta(qm, value_dtype), None if bias is None else bias.dtype, device="meta")
        if bias is not None:
            tensors["bias"] = bias.detach().clone()
        module.load_state_dict(tensors, assign=True)
        return module

    def extra_repr(self) -> str:
        m = self.meta
        mixed = f", mixed={dict(m.mixed_cols)}" if m.mixed_cols else ""
        mixed += f", mixed_rows={dict(m.mixed_rows)}" if m.mixed_rows else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={m.kind}, bits={m.bits}, "
            f"group_size={m.group_size}{mixed}, nnz={m.nnz}, bias={self.bias is not None}, path={self.path}"
        )

    def packed_tensors(self) -> dict[str, Tensor]:
        """The layout's tensors (no bias), as ``pack_matrix`` named them with an empty prefix."""
        return {name: getattr(self, name) for name in tensor_specs(self.meta)}

    def storage_bits(self) -> dict[str, int]:
        """Stored bits by part (codes, lut or scales_zeros, bit_map, sparse) and ``"total"``; no bias."""
        return layout_storage_bits(self.packed_tensors(), "", self.meta)

    def bits_per_weight(self) -> float:
        return self.storage_bits()["total"] / (self.out_features * self.in_features)

    def dequantize_weight(self) -> Tensor:
        """``[out, in]`` float32, bit for bit the ``QuantizedMatrix.dequantize()`` that was packed."""
        return unpack_matrix(self.packed_tensors(), "", self.meta).dequantize()

    def cache_dense_weight(self, dtype: torch.dtype | None) -> None:
        """Opt in (``dtype``) or out (None) to keeping the dequantized weight for the forward: full fp
        memory, no unpacking per call. Loading a state dict drops it."""
        self.dense_cache = None if dtype is None else self.dequantize_weight().to(dtype)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.dense_cache = None  # a snapshot of the old buffers
        self._kernel_parts = None
        self._row_parts = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [..., in]`` -> ``[..., out]`` in ``x.dtype``."""
        x2 = x.reshape(-1, self.in_features)
        if self.dense_cache is not None:
            y = x2 @ self.dense_cache.to(x.dtype).T
        elif self.path == "reference":
            y = x2 @ self.dequantize_weight().to(x.dtype).T
        elif self.meta.mixed_rows is not None and self.path in ("auto", "kernel", "tiled"):
            y = self._mixed_rows(x2)
        elif self.path in ("auto", "kernel", "tiled"):
            why_not = "path='tiled'" if self.path == "tiled" else self.kernel_unsupported(x2)
            if why_not is None:
                y = self._kernel(x2)
            elif self.path == "kernel":
                raise RuntimeError(f"path='kernel' does not apply here: {why_not}")
            else:
                y = self._tiled(x2)
        else:
            raise ValueError(f"path={self.path!r}; supported values are {PATHS}")
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def kernel_unsupported(self, x2: Tensor) -> str | None:
        """Why the compiled kernel cannot compute this product (None when it can)."""
        m = self.meta
        if x2.device.type != "cpu":
            return f"x is on {x2.device}"
        if x2.requires_grad and torch.is_grad_enabled():
            return "the kernels have no backward"
        if m.bits > _kernels.MAX_BITS:
            return f"{m.bits}-bit codes (the kernels take up to {_kernels.MAX_BITS})"
        if m.kind == "uniform" and m.group_size is not None and m.group_size % _kernels.LANES:
            return f"group size {m.group_size} is not a multiple of {_kernels.LANES}"
        if _kernels.cpu_kernels() is None:
            return "the compiled CPU kernels are unavailable (no AVX-512, no compiler, or SQLLM_KERNELS=0)"
        return None

    def _kernel(self, x2: Tensor) -> Tensor:
        """Compiled path: ``[m, in]`` -> ``[m, out]`` in ``x2.dtype``."""
        return (self._kernel_decode(x2) if x2.shape[0] <= DECODE_TOKENS else self._kernel_prefill(x2)).to(x2.dtype)

    def _kernel_decode(self, x2: Tensor) -> Tensor:
        """gemv kernels on float32 ``x``, outliers included: ``[m, out]`` float32."""
        k, meta = _kernels.cpu_kernels(), self.meta
        x32 = x2.float().contiguous()
        if meta.kind == "lut":
            sparse = (self.sp_crow, self.sp_col, self.sp_val) if meta.nnz else (None, None, None)
            return k.lut_gemv(x32, self.qweight, self.lut, meta.bits, *sparse)
        y = x32.new_zeros(x32.shape[0], self.out_features)
        for buffer, bits, cols, gid in self._kernel_part_list():
            xp = x32 if cols is None else x32[:, cols].contiguous()
            k.uniform_gemv_(y, xp, getattr(self, buffer), self.scales, self.zeros, gid, meta.group_size, bits)
        return self._add_outliers(y.T, x32).T if meta.nnz else y

    def _kernel_prefill(self, x2: Tensor) -> Tensor:
        """Row tiles dequantized by the kernels, multiplied in ``x2``'s dtype (bf16/fp16 activations use
        the CPU's native low-precision units), outliers in float32: ``[m, out]`` float32."""
        k, meta = _kernels.cpu_kernels(), self.meta
        parts = [(buffer, bits, x2 if cols is None else x2[:, cols], gid)
                 for buffer, bits, cols, gid in self._kernel_part_list()]
        rows = max(1, PREFILL_TILE // self.in_features)
        tiles = []
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            acc = None
            for buffer, bits, xp, gid in parts:
                q, n = getattr(self, buffer), xp.shape[1]
                if gid is None:
                    w = k.lut_dequant(q, self.lut, bits, n, start, stop)
                else:
                    w = k.uniform_dequant(q, self.scales, self.zeros, gid, meta.group_size, bits, n, start, stop)
                w = w.to(xp.dtype)
                acc = xp @ w.T if acc is None else torch.addmm(acc, xp, w.T)
            tiles.append(acc)
        y = torch.cat(tiles, dim=1).float()
        return self._add_outliers(y.T, x2.float()).T if meta.nnz else y

    def _kernel_part_list(self) -> list[tuple[str, int, Tensor | None, Tensor | None]]:
        """``(buffer, bits, columns or None for all, global groups or None for LUT)`` per packed tensor."""
        if self._kernel_parts is None:
            meta = self.meta
            if meta.kind == "lut":
                self._kernel_parts = [("qweight", meta.bits, None, None)]
            elif meta.mixed_cols is None:
                self._kernel_parts = [("qweight", meta.bits, None, torch.arange(meta.n_groups))]
            else:
                gb = self.group_bits.long()
                G = meta.group_size
                assert G is not None
                self._kernel_parts = [
                    (f"qweight_b{b}", b, group_columns(gb, G, self.in_features, b), torch.nonzero(gb == b).flatten())
                    for b, _ in meta.mixed_cols
                ]
        return self._kernel_parts

    def _add_outliers(self, y_t: Tensor, x2: Tensor) -> Tensor:
        """``y_t: [out, m]`` plus the sparse part's product with ``x2: [m, in]``."""
        if x2.requires_grad and torch.is_grad_enabled():
            contrib = x2.T[self.sp_col.long()] * self.sp_val.to(x2.dtype)[:, None]  # [nnz, m]
            return y_t.index_add(0, csr_rows(self.sp_crow), contrib)
        # A CSR product reads x's rows once per outlier row instead of gathering strided columns of x^T:
        # over 10x faster for prefill. torch multiplies sparse CSR in float32 (MKL) on CPU.
        values = self.sp_val.float() if x2.device.type == "cpu" else self.sp_val.to(x2.dtype)
        with warnings.catch_warnings():  # "sparse CSR is beta": we rely only on CSR @ dense
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(self.sp_crow, self.sp_col, values, (self.out_features, self.in_features),
                                          check_invariants=False)
        return y_t + (csr @ x2.to(values.dtype).T).to(y_t.dtype)

    def _tiled(self, x2: Tensor) -> Tensor:
        """Dense part tile by tile of output rows, then the outliers: ``[m, in]`` -> ``[m, out]``."""
        m = x2.shape[0]
        parts = self._parts()
        x_ext = F.pad(x2, (0, 1))  # column ``in`` is the zero that padding positions read
        xs = [x_ext[:, p.columns].T for p in parts]  # [width_p, m], planar column order
        # Codes are unpacked whole (uint8: a quarter of the fp32 weight): per tile, the fixed cost of
        # each of the unpacking's few dozen small ops would be paid again for every tile.
        operands = [self._operands(p) for p in parts]
        width = sum(p.columns.numel() for p in parts)
        rows = max(1, (DECODE_TILE if m <= DECODE_TOKENS else PREFILL_TILE) // width)
        tiles = []  # no out= into one buffer: x may require grad
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            acc = None
            for part, xp, ops in zip(parts, xs, operands):
                w = _dequantize_rows(part, ops, start, stop).to(x2.dtype)
                acc = w @ xp if acc is None else torch.addmm(acc, w, xp)
            tiles.append(acc)
        y_t = torch.cat(tiles)  # [out, m]
        if self.meta.nnz:
            y_t = self._add_outliers(y_t, x2)
        return y_t.T

    def _operands(self, part: _Part) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(codes [out, cpb, L] uint8 planar, lut [out, 2**b] | scales [out, groups_p], None | zeros)``,
        tables in float32."""
        codes = unpack_planar(getattr(self, part.buffer), part.bits, part.n, part.pad_to)
        if part.groups is None:
            return codes, self.lut.float(), None
        return codes, self.scales.index_select(1, part.groups).float(), self.zeros.index_select(1, part.groups).float()

    def _parts(self) -> list[_Part]:
        """How the packed columns map to input columns; O(in) index work per call, nothing cached."""
        meta = self.meta
        n = self.in_features
        if meta.kind == "lut":
            return [_Part("qweight", meta.bits, n, 0, planar_columns(meta.bits, n).to(self.qweight.device))]
        assert meta.group_size is not None
        G = meta.group_size
        if meta.mixed_cols is None:
            groups = torch.arange(meta.n_groups, device=self.scales.device)
            return [self._uniform_part("qweight", meta.bits, torch.arange(n, device=groups.device), groups)]
        group_bits = self.group_bits.long()
        return [
            self._uniform_part(
                f"qweight_b{b}", b, group_columns(group_bits, G, n, b), torch.nonzero(group_bits == b).flatten()
            )
            for b, _ in meta.mixed_cols
        ]

    def _uniform_part(self, buffer: str, bits: int, cols: Tensor, groups: Tensor) -> _Part:
        """A part whose planar width is padded to whole groups when that lets scales broadcast."""
        G = self.meta.group_size
        assert G is not None
        _, cpb = block_shape(bits)
        n = cols.numel()
        ext = torch.cat([cols, cols.new_full((1,), self.in_features)])
        if G % cpb == 0:
            pad_to = groups.numel() * G
            return _Part(buffer, bits, n, pad_to, ext[planar_columns(bits, n, pad_to).to(cols.device)], groups)
        planar = planar_columns(bits, n).to(cols.device)
        return _Part(buffer, bits, n, 0, ext[planar], groups, planar.clamp(max=n - 1) // G)


    # Mixed-width LUT rows (``meta.mixed_rows``): the rows of each width are stored as a plain LUT matrix,
    # so each runs through an ordinary LUT QuantLinear (kernel or tiled path, as ``self.path`` says) and
    # its outputs land in its rows; the outliers are added once for the whole matrix.

    def _mixed_rows(self, x2: Tensor) -> Tensor:
        """``[m, in]`` -> ``[m, out]`` in ``x2.dtype``, width by width."""
        y = x2.new_empty(x2.shape[0], self.out_features)
        for rows, part in self._width_parts():
            part.path = self.path
            y[:, rows] = part(x2)
        return self._add_outliers(y.T, x2).T if self.meta.nnz else y

    def _width_parts(self) -> list[tuple[Tensor, QuantLinear]]:
        """``(rows, LUT QuantLinear over those rows)`` per width, sharing this module's buffers; rebuilt
        after a load or a move (``_apply``)."""
        if self._row_parts is None:
            assert self.meta.mixed_rows is not None
            row_bits = self.row_bits.long()
            parts = []
            for b, n_rows in self.meta.mixed_rows:
                part = QuantLinear(LayerMeta(kind="lut", shape=(n_rows, self.in_features), bits=b), device="meta")
                part.load_state_dict({"qweight": getattr(self, f"qweight_r{b}"), "lut": getattr(self, f"lut_r{b}")},
                                     assign=True)
                parts.append((torch.nonzero(row_bits == b).flatten(), part))
            self._row_parts = parts
        return self._row_parts

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._row_parts = None  # the parts hold the old buffers
        return super()._apply(fn, recurse)


def _dequantize_rows(part: _Part, operands: tuple[Tensor, Tensor, Tensor | None], start: int, stop: int) -> Tensor:
    """Dense dequantized rows ``[start, stop)`` of one part, planar order: ``[T, cpb * L]`` float32."""
    codes, table, zeros = operands
    c = codes[start:stop]
    t, cpb, _ = c.shape
    if zeros is None:
        return torch.gather(table[start:stop], 1, c.reshape(t, -1).long())
    s, z = table[start:stop], zeros[start:stop]
    # In place: (c - z) * s exactly as the reference, with one pass less than out of place.
    if part.pos_group is None:
        # Planar position (k, m) holds column m * cpb + k, whose group is m // (group_size / cpb).
        w = c.reshape(t, cpb, s.shape[1], -1).float()
        return w.sub_(z[:, None, :, None]).mul_(s[:, None, :, None]).view(t, -1)
    pos = part.pos_group
    return c.reshape(t, -1).float().sub_(z.index_select(1, pos)).mul_(s.index_select(1, pos))


def replace_linear(model: nn.Module, name: str, qmodule: QuantLinear) -> nn.Module:
    """Swap the ``nn.Linear`` at dotted ``name`` in ``model`` for ``qmodule``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{name} is a {type(old).__name__}, not an nn.Linear")
    if (old.out_features, old.in_features) != (qmodule.out_features, qmodule.in_features):
        raise ValueError(
            f"{name} is [{old.out_features}, {old.in_features}], the quantized module "
            f"[{qmodule.out_features}, {qmodule.in_features}]"
        )
    if (old.bias is None) != (qmodule.bias is None):
        raise ValueError(f"{name} has bias={old.bias is not None}, the quantized module the opposite")
    setattr(parent, child, qmodule)
    return old


def quant_linear_from_meta(
    meta: Mapping[str, Any] | LayerMeta, bias_dtype: torch.dtype | None = None, device: Any = "meta", where: str = ""
) -> QuantLinear:
    """An empty QuantLinear for a checkpoint skeleton; ``meta`` may be the JSON dict (checked, naming
    ``where`` in a CorruptCheckpoint) or a LayerMeta."""
    if not isinstance(meta, LayerMeta):
        meta = LayerMeta.from_dict(meta, where)
    return QuantLinear(meta, bias_dtype, device)
