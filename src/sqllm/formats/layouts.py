"""Per-linear tensor layout: one table of names, dtypes and shapes, and the pack/unpack of one matrix.

For a linear at state-dict prefix ``p`` (e.g. ``"model.layers.0.self_attn.q_proj."``) the packed tensors
are, with ``out, n = shape``, ``G = group_size``, ``n_groups = ceil(n / G)``, ``words(c, b) = ceil(c*b/32)``:

=================  ========  =========================  =============================================
name               dtype     shape                      present for
=================  ========  =========================  =============================================
``p.qweight``      int32     [out, words(n, bits)]      LUT, and uniform with one bit width
``p.qweight_b{b}`` int32     [out, words(cols_b, b)]    mixed uniform: the columns of the groups of
                                                        width ``b``, concatenated in order
``p.group_bits``   int8      [n_groups]                 mixed uniform
``p.qweight_r{b}`` int32     [rows_b, words(n, b)]      mixed LUT: the rows of width ``b``, in order
``p.lut_r{b}``     float16   [rows_b, 2**b]             mixed LUT: those rows' tables
``p.row_bits``     int8      [out]                      mixed LUT: every row's width
``p.lut``          float16   [out, 2**bits]             LUT
``p.scales``       float16   [out, n_groups]            uniform
``p.zeros``        float16   [out, n_groups]            uniform
``p.sp_crow``      int32     [out + 1]                  sparse outliers (CSR row pointers)
``p.sp_col``       int32     [nnz]                      sparse outliers
``p.sp_val``       sparse    [nnz]                      sparse outliers, in ``sparse_dtype``
=================  ========  =========================  =============================================

:func:`tensor_specs` is that table in code; the packer, the reader's checks, the QuantLinear buffers and
the size accounting all read it, so they cannot disagree. Nothing here knows which algorithm made the
codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..codes import LUTCodes, QuantizedMatrix, UniformCodes, expand_groups, num_groups
from ..errors import CorruptCheckpoint
from .bitpack import MAX_BITS, MIN_BITS, pack_codes, packed_words, unpack_codes
from .sparse import check_csr, coo_to_csr, csr_to_coo

KINDS = ("lut", "uniform")
SPARSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PARTS = ("codes", "lut", "scales_zeros", "bit_map", "sparse")


@dataclass(frozen=True)
class LayerMeta:
    """What a reader needs to know before seeing one linear's tensors (JSON-able via :meth:`to_dict`).

    kind:         "lut" or "uniform"
    shape:        (out, in) of the weight
    bits:         LUT index width; for uniform the width of every group, or the widest one when mixed
    group_size:   uniform only: columns per group (``in`` for per-channel); None for LUT
    mixed_cols:   mixed-precision uniform only: ((bits, columns stored at that width), ...) ascending
    mixed_rows:   mixed-precision LUT only: ((bits, rows with tables of that width), ...) ascending
    nnz:          stored sparse outliers
    sparse_dtype: name of the outlier values' dtype (a key of ``SPARSE_DTYPES``); None without outliers
    """

    kind: str
    shape: tuple[int, int]
    bits: int
    group_size: int | None = None
    mixed_cols: tuple[tuple[int, int], ...] | None = None
    mixed_rows: tuple[tuple[int, int], ...] | None = None
    nnz: int = 0
    sparse_dtype: str | None = None

    def __post_init__(self) -> None:
        _validate_meta(self)

    @property
    def n_groups(self) -> int:
        assert self.group_size is not None, "LUT layers have no groups"
        return num_groups(self.shape[1], self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "mixed_cols": None if self.mixed_cols is None else {str(b): c for b, c in self.mixed_cols},
            "mixed_rows": None if self.mixed_rows is None else {str(b): c for b, c in self.mixed_rows},
            "nnz": self.nnz,
            "sparse_dtype": self.sparse_dtype,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> LayerMeta:
        """Build from :meth:`to_dict` output; CorruptCheckpoint naming ``where`` (a prefix) if malformed."""
        try:
            mixed = d.get("mixed_cols")
            rows = d.get("mixed_rows")
            if len(d["shape"]) != 2:
                raise ValueError(f"shape={d['shape']!r}: must be (out, in)")
            return cls(
                kind=d["kind"],
                shape=(int(d["shape"][0]), int(d["shape"][1])),
                bits=int(d["bits"]),
                group_size=None if d.get("group_size") is None else int(d["group_size"]),
                mixed_cols=None if mixed is None else tuple(sorted((int(b), int(c)) for b, c in mixed.items())),
                mixed_rows=None if rows is None else tuple(sorted((int(b), int(c)) for b, c in rows.items())),
                nnz=int(d.get("nnz", 0)),
                sparse_dtype=d.get("sparse_dtype"),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            why = f"{type(e).__name__}: {e}"
            raise CorruptCheckpoint(f"layer meta of {where!r} is malformed ({why}): {dict(d)}") from None


def _validate_meta(m: LayerMeta) -> None:
    """ValueError naming the first bad field (from_dict turns it into CorruptCheckpoint)."""

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{field}={getattr(m, field)!r}: {why}")

    if m.kind not in KINDS:
        raise bad("kind", f"must be one of {KINDS}")
    if len(m.shape) != 2 or min(m.shape) < 1:
        raise bad("shape", "must be (out, in), both positive")
    if not MIN_BITS <= m.bits <= MAX_BITS:
        raise bad("bits", f"must lie in {MIN_BITS}..{MAX_BITS}")
    if m.kind == "lut" and (m.group_size is not None or m.mixed_cols is not None):
        raise bad("kind", "LUT layers have no group_size or mixed_cols")
    if m.kind == "uniform" and m.mixed_rows is not None:
        raise bad("kind", "uniform layers have no mixed_rows")
    if m.kind == "uniform" and (m.group_size is None or m.group_size < 1):
        raise bad("group_size", "uniform layers need a positive group size")
    if m.mixed_cols is not None:
        _validate_widths(m, "mixed_cols", m.mixed_cols, m.shape[1], "in")
    if m.mixed_rows is not None:
        _validate_widths(m, "mixed_rows", m.mixed_rows, m.shape[0], "out")
    if m.nnz < 0:
        raise bad("nnz", "must be >= 0")
    if m.sparse_dtype is not None and m.sparse_dtype not in SPARSE_DTYPES:
        raise bad("sparse_dtype", f"must be one of {tuple(SPARSE_DTYPES)} or None")
    if m.sparse_dtype is None and m.nnz:
        raise bad("nnz", "outliers need a sparse_dtype")


def _validate_widths(m: LayerMeta, field: str, counts: tuple[tuple[int, int], ...], total: int, dim: str) -> None:
    """ValueError unless ``counts`` holds two or more distinct ascending widths with positive counts
    summing to ``total``, the widest being ``m.bits``."""
    widths = [b for b, _ in counts]
    if len(widths) < 2 or widths != sorted(set(widths)) or not (MIN_BITS <= widths[0] and widths[-1] <= MAX_BITS):
        raise ValueError(f"{field}={counts!r}: needs two or more distinct ascending widths in {MIN_BITS}..{MAX_BITS}")
    if any(c < 1 for _, c in counts) or sum(c for _, c in counts) != total:
        raise ValueError(f"{field}={counts!r}: counts must be positive and sum to {dim}={total}")
    if widths[-1] != m.bits:
        raise ValueError(f"bits={m.bits!r}: must equal the widest mixed width {widths[-1]}")


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one packed tensor, and the storage part it counts towards (one of PARTS)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    part: str


def tensor_specs(meta: LayerMeta) -> dict[str, TensorSpec]:
    """The layout table: packed tensor name (without prefix) -> spec, for one linear."""
    out, n = meta.shape
    specs: dict[str, TensorSpec] = {}
    if meta.mixed_cols is not None:
        for b, cols in meta.mixed_cols:
            specs[f"qweight_b{b}"] = TensorSpec(torch.int32, (out, packed_words(cols, b)), "codes")
        specs["group_bits"] = TensorSpec(torch.int8, (meta.n_groups,), "bit_map")
    elif meta.mixed_rows is not None:
        for b, rows in meta.mixed_rows:
            specs[f"qweight_r{b}"] = TensorSpec(torch.int32, (rows, packed_words(n, b)), "codes")
            specs[f"lut_r{b}"] = TensorSpec(torch.float16, (rows, 1 << b), "lut")
        specs["row_bits"] = TensorSpec(torch.int8, (out,), "bit_map")
    else:
        specs["qweight"] = TensorSpec(torch.int32, (out, packed_words(n, meta.bits)), "codes")
    if meta.kind == "lut":
        if meta.mixed_rows is None:
            specs["lut"] = TensorSpec(torch.float16, (out, 1 << meta.bits), "lut")
    else:
        specs["scales"] = TensorSpec(torch.float16, (out, meta.n_groups), "scales_zeros")
        specs["zeros"] = TensorSpec(torch.float16, (out, meta.n_groups), "scales_zeros")
    if meta.sparse_dtype is not None:
        specs["sp_crow"] = TensorSpec(torch.int32, (out + 1,), "sparse")
        specs["sp_col"] = TensorSpec(torch.int32, (meta.nnz,), "sparse")
        specs["sp_val"] = TensorSpec(SPARSE_DTYPES[meta.sparse_dtype], (meta.nnz,), "sparse")
    return specs


def group_columns(group_bits: Tensor, group_size: int, n_in: int, bits: int) -> Tensor:
    """Columns (``[cols_b] int64``, ascending) of the groups whose width is ``bits``.

    group_bits: [n_groups] integer. This is the order in which ``qweight_b{bits}`` stores them.
    """
    col_bits = expand_groups(group_bits, group_size, n_in)
    return torch.nonzero(col_bits == bits).flatten()


def matrix_meta(qm: QuantizedMatrix, value_dtype: torch.dtype) -> LayerMeta:
    """The meta :func:`pack_matrix` stores ``qm`` under (outliers in ``value_dtype``)."""
    d = qm.dense
    nnz = qm.sparse.nnz if qm.sparse is not None else 0
    shape = (int(d.shape[0]), int(d.shape[1]))
    sparse_dtype = str(value_dtype).removeprefix("torch.") if nnz else None
    if isinstance(d, LUTCodes):
        widths, counts = torch.unique(d.widths(), return_counts=True)
        rows = tuple(zip(widths.tolist(), counts.tolist())) if len(widths) > 1 else None
        return LayerMeta(kind="lut", shape=shape, bits=int(widths.max()), mixed_rows=rows, nnz=nnz,
                         sparse_dtype=sparse_dtype)
    col_widths, col_counts = _columns_per_width(d)
    mixed = tuple(zip(col_widths, col_counts)) if len(col_widths) > 1 else None
    return LayerMeta(kind="uniform", shape=shape, bits=max(col_widths), group_size=d.group_size, mixed_cols=mixed,
                     nnz=nnz, sparse_dtype=sparse_dtype)


def _columns_per_width(d: UniformCodes) -> tuple[list[int], list[int]]:
    """Distinct group widths (ascending) and how many columns each covers."""
    col_bits = expand_groups(d.group_bits, d.group_size, d.shape[1])
    widths, counts = torch.unique(col_bits, return_counts=True)
    return widths.tolist(), counts.tolist()


def _fp16_exact(t: Tensor, what: str) -> Tensor:
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        raise ValueError(f"{what} are not float16-representable; round them with codes.fp16_grid")
    return h


def pack_matrix(qm: QuantizedMatrix, prefix: str, value_dtype: torch.dtype) -> dict[str, Tensor]:
    """Packed tensors of ``qm``, named ``prefix + name`` per :func:`tensor_specs` of :func:`matrix_meta`.

    value_dtype: dtype of the stored outlier values (the model's dtype); must hold them exactly.
    Outliers with nnz == 0 are not stored.
    """
    meta = matrix_meta(qm, value_dtype)
    d = qm.dense
    t: dict[str, Tensor] = {}
    if isinstance(d, LUTCodes) and meta.mixed_rows is not None:
        widths = d.widths()
        for b, _ in meta.mixed_rows:
            rows = torch.nonzero(widths == b).flatten()
            t[f"qweight_r{b}"] = pack_codes(d.codes[rows], b)
            t[f"lut_r{b}"] = _fp16_exact(d.lut[rows, : 1 << b], "LUT entries")
        t["row_bits"] = widths.to(torch.int8)
    elif isinstance(d, LUTCodes):
        t["qweight"] = pack_codes(d.codes, meta.bits)
        t["lut"] = _fp16_exact(d.lut[:, : 1 << meta.bits], "LUT entries")
    else:
        if meta.mixed_cols is not None:
            for b, _ in meta.mixed_cols:
                cols = group_columns(d.group_bits, d.group_size, d.shape[1], b)
                t[f"qweight_b{b}"] = pack_codes(d.codes[:, cols], b)
            t["group_bits"] = d.group_bits.to(torch.int8)
        else:
            t["qweight"] = pack_codes(d.codes, meta.bits)
        t["scales"] = _fp16_exact(d.scales, "scales")
        t["zeros"] = _fp16_exact(d.zeros, "zeros")
    if meta.sparse_dtype is not None:
        assert qm.sparse is not None  # the meta records outliers only where there are some
        t["sp_crow"], t["sp_col"], t["sp_val"] = coo_to_csr(qm.sparse, value_dtype)
    tensors = {prefix + k: v for k, v in t.items()}
    validate_tensors(tensors, prefix, meta)  # the table is the contract in both directions
    return tensors


def validate_tensors(tensors: Mapping[str, Tensor], prefix: str, meta: LayerMeta) -> None:
    """Raise CorruptCheckpoint naming the tensor unless every tensor of the layout is present with its
    dtype and shape, the CSR outliers are well formed, and ``group_bits`` matches ``meta.mixed_cols``.
    Tensors outside the layout (e.g. ``prefix + "bias"``) are ignored.
    """
    specs = tensor_specs(meta)
    for name, spec in specs.items():
        key = prefix + name
        if key not in tensors:
            raise CorruptCheckpoint(f"missing tensor {key} ({_describe(spec.dtype, spec.shape)})")
        t = tensors[key]
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            found, expected = _describe(t.dtype, tuple(t.shape)), _describe(spec.dtype, spec.shape)
            raise CorruptCheckpoint(f"tensor {key} is {found}, expected {expected}")
    if "sp_crow" in specs:
        check_csr(tensors[prefix + "sp_crow"], tensors[prefix + "sp_col"], meta.shape[1],
                  names=(prefix + "sp_crow", prefix + "sp_col"))
    if meta.mixed_cols is not None:
        _check_group_bits(tensors[prefix + "group_bits"], meta, prefix + "group_bits")
    if meta.mixed_rows is not None:
        _check_row_bits(tensors[prefix + "row_bits"], meta, prefix + "row_bits")


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _check_group_bits(group_bits: Tensor, meta: LayerMeta, name: str) -> None:
    assert meta.group_size is not None and meta.mixed_cols is not None
    col_bits = expand_groups(group_bits.long(), meta.group_size, meta.shape[1])
    widths, counts = torch.unique(col_bits, return_counts=True)
    found = tuple(zip(widths.tolist(), counts.tolist()))
    if found != meta.mixed_cols:
        raise CorruptCheckpoint(
            f"{name} assigns (bits, columns) {found}, but the layer meta says {meta.mixed_cols}"
        )


def _check_row_bits(row_bits: Tensor, meta: LayerMeta, name: str) -> None:
    widths, counts = torch.unique(row_bits.long(), return_counts=True)
    found = tuple(zip(widths.tolist(), counts.tolist()))
    if found != meta.mixed_rows:
        raise CorruptCheckpoint(f"{name} assigns (bits, rows) {found}, but the layer meta says {meta.mixed_rows}")


def unpack_matrix(tensors: Mapping[str, Tensor], prefix: str, meta: LayerMeta) -> QuantizedMatrix:
    """Inverse of :func:`pack_matrix` after :func:`validate_tensors`: codes uint8, tables float32."""
    validate_tensors(tensors, prefix, meta)
    t = {name: tensors[prefix + name] for name in tensor_specs(meta)}
    out, n = meta.shape
    dense: LUTCodes | UniformCodes
    if meta.kind == "lut" and meta.mixed_rows is not None:
        row_bits = t["row_bits"].long()
        codes = torch.empty(out, n, dtype=torch.uint8, device=row_bits.device)
        lut = torch.full((out, 1 << meta.bits), float("inf"), device=row_bits.device)
        for b, _ in meta.mixed_rows:
            rows = torch.nonzero(row_bits == b).flatten()
            codes[rows] = unpack_codes(t[f"qweight_r{b}"], b, n)
            lut[rows, : 1 << b] = t[f"lut_r{b}"].float()
        dense = LUTCodes(codes=codes, lut=lut, bits=meta.bits, row_bits=row_bits)
    elif meta.kind == "lut":
        dense = LUTCodes(codes=unpack_codes(t["qweight"], meta.bits, n), lut=t["lut"].float(), bits=meta.bits)
    else:
        assert meta.group_size is not None
        if meta.mixed_cols is not None:
            group_bits = t["group_bits"].long()
            codes = torch.empty(out, n, dtype=torch.uint8, device=group_bits.device)
            for b, cols in meta.mixed_cols:
                idx = group_columns(group_bits, meta.group_size, n, b)
                codes[:, idx] = unpack_codes(t[f"qweight_b{b}"], b, cols)
        else:
            group_bits = torch.full((meta.n_groups,), meta.bits, dtype=torch.int64, device=t["scales"].device)
            codes = unpack_codes(t["qweight"], meta.bits, n)
        dense = UniformCodes(
            codes=codes, scales=t["scales"].float(), zeros=t["zeros"].float(),
            group_bits=group_bits, group_size=meta.group_size,
        )
    sparse = None
    if meta.sparse_dtype is not None:
        sparse = csr_to_coo(t["sp_crow"], t["sp_col"], t["sp_val"], meta.shape)
    return QuantizedMatrix(dense=dense, sparse=sparse)


def storage_bits(tensors: Mapping[str, Tensor], prefix: str, meta: LayerMeta) -> dict[str, int]:
    """Bits actually stored for one linear, by part (keys of PARTS that occur), plus ``"total"``.

    Counted from the tensors themselves, so word padding of the packed codes is included.
    """
    parts: dict[str, int] = {}
    for name, spec in tensor_specs(meta).items():
        t = tensors[prefix + name]
        parts[spec.part] = parts.get(spec.part, 0) + 8 * t.numel() * t.element_size()
    parts["total"] = sum(parts.values())
    return parts
