"""Linear layers that hold a packed quantized weight (exactly the tensors of ``formats.layouts``).

``forward`` computes ``y = x W^T + b`` with ``W`` = dequantized dense codes + sparse outliers through the
``torch.ops.sqllm`` operators (:mod:`sqllm.nn.kernels.ops`): ``lut_mm`` for LUT layers, ``uniform_mm``
once per stored width of a uniform layer (its columns gathered from ``x``), ``csr_mm`` for the outliers.
Each device runs its registered implementation: the compiled AVX2 kernels on CPU where available, the
pure-torch one (a few dequantized rows at a time) elsewhere. The column maps of mixed-precision layers
are built once per device and dropped when a state dict is loaded.

:meth:`QuantLinear.reference_forward` is the ground truth every path is tested against: the whole
weight dequantized (bit for bit ``QuantizedMatrix.dequantize``) and one matmul. Nothing holds a dense
weight unless :meth:`QuantLinear.cache_dense_weight` asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..codes import QuantizedMatrix
from ..formats.layouts import LayerMeta, group_columns, matrix_meta, pack_matrix, tensor_specs, unpack_matrix
from ..formats.layouts import storage_bits as layout_storage_bits
from . import kernels  # also registers the CPU implementations of the ops


@dataclass(frozen=True)
class _Part:
    """One packed tensor of a uniform layer and the ``uniform_mm`` arguments that go with it.

    columns:   [n] int64, the input columns it stores (in order); None when it stores all of them
    group_ids: [ceil(n / group_size)] int64, the column of scales/zeros of each of its groups
    """

    buffer: str
    bits: int
    n: int
    columns: Tensor | None
    group_ids: Tensor


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
        self.dense_cache: Tensor | None = None
        self._parts_cache: tuple[torch.device, list[_Part]] | None = None
        self._rows_cache: tuple[torch.device, list[tuple[int, Tensor]]] | None = None

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
            f"group_size={m.group_size}{mixed}, nnz={m.nnz}, bias={self.bias is not None}"
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
        self.dense_cache = None  # snapshots of the old buffers
        self._parts_cache = None
        self._rows_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [..., in]`` -> ``[..., out]`` in ``x.dtype``."""
        x2 = x.reshape(-1, self.in_features)
        if self.dense_cache is not None:
            y = x2 @ self.dense_cache.to(x.dtype).T
        else:
            direct = kernels.direct_kernels() if kernels.may_call_directly(x) else None
            y = self.packed_product(x2, direct)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The ground truth of :meth:`forward`: the whole weight dequantized, one matmul in float32,
        ``[..., out]`` in ``x.dtype``."""
        y = x.float() @ self.dequantize_weight().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def packed_product(self, x2: Tensor, ops: Any = None) -> Tensor:
        """``x2 [m, in] @ W^T`` through the ``torch.ops.sqllm`` ops: ``[m, out]`` float32, no bias.
        ``ops``: where ``lut_mm``, ``uniform_mm`` and ``csr_mm`` are looked up; ``torch.ops.sqllm`` by
        default, or the compiled module itself (:func:`sqllm.nn.kernels.direct_kernels`), whose functions
        the dispatcher would call anyway."""
        ops = ops or torch.ops.sqllm
        meta = self.meta
        if meta.kind == "lut" and meta.mixed_rows is not None:
            # Each width's rows are a plain LUT matrix: one op per width, its outputs into its rows.
            y = x2.new_zeros((x2.shape[0], self.out_features), dtype=torch.float32)
            for b, rows in self._width_rows(x2.device):
                yb = ops.lut_mm(x2, getattr(self, f"qweight_r{b}"), getattr(self, f"lut_r{b}"), b,
                                            self.in_features)
                y.index_copy_(1, rows, yb)
        elif meta.kind == "lut":
            y = ops.lut_mm(x2, self.qweight, self.lut, meta.bits, self.in_features)
        else:
            assert meta.group_size is not None
            y = None
            for p in self._parts(x2.device):
                xp = x2 if p.columns is None else x2.index_select(1, p.columns)
                yp = ops.uniform_mm(
                    xp, getattr(self, p.buffer), self.scales, self.zeros, p.group_ids, meta.group_size, p.bits, p.n
                )
                y = yp if y is None else y.add_(yp)  # in place: one [m, out] buffer, not one per part
        if meta.nnz:
            y = y.add_(ops.csr_mm(x2, self.sp_crow, self.sp_col, self.sp_val))
        return y

    def _width_rows(self, device: torch.device) -> list[tuple[int, Tensor]]:
        """``(bits, output rows stored at that width)`` of a mixed-width LUT matrix on ``device``, built on
        first use there."""
        if self._rows_cache is None or self._rows_cache[0] != device:
            assert self.meta.mixed_rows is not None
            row_bits = self.row_bits.to(device=device, dtype=torch.int64)
            rows = [(b, torch.nonzero(row_bits == b).flatten()) for b, _ in self.meta.mixed_rows]
            self._rows_cache = (device, rows)
        return self._rows_cache[1]

    def _parts(self, device: torch.device) -> list[_Part]:
        """The uniform parts' column maps on ``device``, built on first use there."""
        if self._parts_cache is None or self._parts_cache[0] != device:
            self._parts_cache = (device, self._build_parts(device))
        return self._parts_cache[1]

    def _build_parts(self, device: torch.device) -> list[_Part]:
        meta = self.meta
        assert meta.group_size is not None
        if meta.mixed_cols is None:
            ids = torch.arange(meta.n_groups, device=device)
            return [_Part("qweight", meta.bits, self.in_features, None, ids)]
        group_bits = self.group_bits.to(device=device, dtype=torch.int64)
        return [
            _Part(
                f"qweight_b{b}", b, cols,
                group_columns(group_bits, meta.group_size, self.in_features, b),
                torch.nonzero(group_bits == b).flatten(),
            )
            for b, cols in meta.mixed_cols
        ]


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
