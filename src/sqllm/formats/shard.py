"""Tensor-parallel slicing and fusing of one linear's packed tensors (pure functions, no serving engine).

A serving engine splits a linear across ranks in one of two ways:

* column-parallel (q/k/v, gate/up): each rank holds a range of *output rows*. Rows are independent in
  every layout: codes, LUTs, scales and zeros follow their rows, and the CSR outliers of those rows are
  re-based. Any row range works.
* row-parallel (o, down): each rank holds a range of *input columns* and the ranks' outputs are summed.
  Codes are cut by column and re-packed, groups (scales, zeros and the mixed-precision bit map) follow
  their columns, and the CSR column indices are re-based. A cut inside a group of a grouped uniform
  layout cannot be expressed (group ``g`` always starts at column ``g * group_size``), so it is refused.

Fused layers (qkv, gate_up) stack several checkpoint linears by rows: :func:`concat_rows` joins them into
one packed matrix where their layouts agree (:func:`fuse_rows`), and :func:`concat_blocker` says why not
where they do not.

Every function works on a packed tensor dict with an empty prefix (names of ``tensor_specs(meta)``) and
returns a new dict with its :class:`LayerMeta`; the result dequantizes to exactly the corresponding slice
(or stack) of the input's dequantized weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..codes import LUTCodes, QuantizedMatrix, SparseOutliers, UniformCodes
from ..errors import InvalidConfig
from .layouts import SPARSE_DTYPES, LayerMeta, matrix_meta, pack_matrix, unpack_matrix

Packed = tuple[dict[str, Tensor], LayerMeta]


def shard_range(full: int, per_rank: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s slice of a dimension of size ``full`` cut into ``full // per_rank``
    equal pieces over ``world`` ranks.

    With fewer pieces than ranks each piece is replicated on ``world // pieces`` consecutive ranks (the
    key/value heads of grouped-query attention under a large tensor-parallel size).
    """
    if per_rank < 1 or full % per_rank or not 0 <= rank < world:
        raise ValueError(f"cannot give rank {rank} of {world} a slice of {per_rank} out of {full}")
    pieces = full // per_rank
    if world % pieces:
        raise ValueError(f"{pieces} pieces of {per_rank} do not spread evenly over {world} ranks")
    start = (rank * pieces // world) * per_rank
    return start, start + per_rank


def split_rows(tensors: Mapping[str, Tensor], meta: LayerMeta, start: int, stop: int) -> Packed:
    """Output rows ``[start, stop)`` of a packed linear ``[out, in]``: a ``[stop - start, in]`` linear."""
    out = meta.shape[0]
    if not 0 <= start < stop <= out:
        raise ValueError(f"row range [{start}, {stop}) is not a non-empty range inside [0, {out})")
    return _cut(tensors, meta, 0, start, stop)


def _cut(tensors: Mapping[str, Tensor], meta: LayerMeta, dim: int, start: int, stop: int) -> Packed:
    """Rows (``dim`` 0) or input columns (``dim`` 1) ``[start, stop)`` of a packed linear, already checked."""
    if (start, stop) == (0, meta.shape[dim]):
        return dict(tensors), meta
    qm = unpack_matrix(tensors, "", meta)
    dense = _dense_rows(qm.dense, start, stop) if dim == 0 else _dense_columns(qm.dense, start, stop, meta.shape[1])
    sparse = None if qm.sparse is None else _sparse_cut(qm.sparse, dim, start, stop)
    return _pack(QuantizedMatrix(dense=dense, sparse=sparse), _stored_dtype(meta))


def _dense_rows(d: LUTCodes | UniformCodes, start: int, stop: int) -> LUTCodes | UniformCodes:
    if isinstance(d, LUTCodes):
        return LUTCodes(codes=d.codes[start:stop], lut=d.lut[start:stop], bits=d.bits)
    return UniformCodes(codes=d.codes[start:stop], scales=d.scales[start:stop], zeros=d.zeros[start:stop],
                        group_bits=d.group_bits, group_size=d.group_size)


def _sparse_cut(s: SparseOutliers, dim: int, start: int, stop: int) -> SparseOutliers:
    """The outliers inside rows or columns ``[start, stop)``, re-indexed from ``start``."""
    index = s.rows if dim == 0 else s.cols
    keep = (index >= start) & (index < stop)
    rows, cols = s.rows[keep], s.cols[keep]
    shape = list(s.shape)
    shape[dim] = stop - start
    if dim == 0:
        rows = rows - start
    else:
        cols = cols - start
    return SparseOutliers(rows=rows, cols=cols, values=s.values[keep], shape=(shape[0], shape[1]))


def check_column_split(meta: LayerMeta, start: int, stop: int, where: str = "") -> None:
    """Raise InvalidConfig (naming ``where``, a layer name) unless input columns ``[start, stop)`` can be
    cut out of this layout: inside ``[0, in)``, and on group boundaries for grouped uniform layouts."""
    n = meta.shape[1]
    name = f"{where}: " if where else ""
    if not 0 <= start < stop <= n:
        raise InvalidConfig(f"{name}column range [{start}, {stop}) is not a non-empty range inside [0, {n})")
    G = meta.group_size
    if meta.kind != "uniform" or G is None or G >= n:
        return  # LUT rows and per-channel scales hold for any subset of columns
    cuts = [c for c in (start, stop) if c % G and c != n]
    if cuts:
        raise InvalidConfig(
            f"{name}a tensor-parallel split at input column {cuts[0]} cuts a group of {G} columns "
            f"(shard [{start}, {stop}) of {n}); use a tensor-parallel size whose shard width "
            f"is a multiple of {G}, or re-quantize with a group size that divides it"
        )


def split_columns(tensors: Mapping[str, Tensor], meta: LayerMeta, start: int, stop: int, where: str = "") -> Packed:
    """Input columns ``[start, stop)`` of a packed linear ``[out, in]``: a ``[out, stop - start]`` linear.

    Raises InvalidConfig (see :func:`check_column_split`) for a cut inside a group. A per-channel uniform
    layer (one group spanning every column) keeps one group, as wide as the shard. A mixed-precision shard
    whose groups all share one width becomes a plain uniform layer of that width.
    """
    check_column_split(meta, start, stop, where)
    return _cut(tensors, meta, 1, start, stop)


def _dense_columns(d: LUTCodes | UniformCodes, start: int, stop: int, n: int) -> LUTCodes | UniformCodes:
    if isinstance(d, LUTCodes):
        return LUTCodes(codes=d.codes[:, start:stop], lut=d.lut, bits=d.bits)
    if d.group_size >= n:
        return UniformCodes(codes=d.codes[:, start:stop], scales=d.scales, zeros=d.zeros,
                            group_bits=d.group_bits, group_size=stop - start)
    g0, g1 = start // d.group_size, -(-stop // d.group_size)
    return UniformCodes(codes=d.codes[:, start:stop], scales=d.scales[:, g0:g1], zeros=d.zeros[:, g0:g1],
                        group_bits=d.group_bits[g0:g1], group_size=d.group_size)


def concat_blocker(metas: Sequence[LayerMeta], group_bits: Sequence[Tensor | None] = ()) -> str | None:
    """Why the linears of ``metas`` cannot be stacked by rows into one packed linear (None when they can).

    They must share the input width, the kind, the code width and, for uniform layouts, the group size
    and the per-group bit map (``group_bits``: each part's ``[n_groups]`` tensor, or None when not mixed).
    """
    first = metas[0]
    for i, m in enumerate(metas[1:], 1):
        for field in ("kind", "bits", "group_size"):
            if getattr(m, field) != getattr(first, field):
                return f"part {i} has {field}={getattr(m, field)!r}, part 0 has {field}={getattr(first, field)!r}"
        if m.shape[1] != first.shape[1]:
            return f"part {i} has {m.shape[1]} input columns, part 0 has {first.shape[1]}"
    if any(m.mixed_cols is not None for m in metas):
        maps = list(group_bits)
        if len(maps) != len(metas) or any(g is None for g in maps):
            return "mixed-precision parts need their group_bits to be compared"
        if not all(torch.equal(g, maps[0]) for g in maps[1:]):  # type: ignore[arg-type]
            return "the parts assign different bit widths to their groups"
    return None


def concat_rows(parts: Sequence[tuple[Mapping[str, Tensor], LayerMeta]]) -> Packed:
    """Stack packed linears ``[out_i, in]`` by rows into one ``[sum(out_i), in]`` linear.

    Raises ValueError with :func:`concat_blocker`'s reason when their layouts differ. Outliers keep their
    stored dtype (float32 if the parts' dtypes differ, which holds every one of them exactly).
    """
    metas = [m for _, m in parts]
    why = concat_blocker(metas, [t.get("group_bits") for t, _ in parts])
    if why is not None:
        raise ValueError(f"cannot stack these linears by rows: {why}")
    if len(parts) == 1:
        return dict(parts[0][0]), metas[0]
    qms = [unpack_matrix(t, "", m) for t, m in parts]
    dense: LUTCodes | UniformCodes
    first = qms[0].dense
    codes = torch.cat([q.dense.codes for q in qms])
    if isinstance(first, LUTCodes):
        dense = LUTCodes(codes=codes, lut=torch.cat([q.dense.lut for q in qms]), bits=first.bits)  # type: ignore[union-attr]
    else:
        dense = UniformCodes(codes=codes, scales=torch.cat([q.dense.scales for q in qms]),  # type: ignore[union-attr]
                             zeros=torch.cat([q.dense.zeros for q in qms]),  # type: ignore[union-attr]
                             group_bits=first.group_bits, group_size=first.group_size)
    out, n = codes.shape
    offsets = torch.tensor([0] + [m.shape[0] for m in metas]).cumsum(0)
    pieces = [(q.sparse, int(o)) for q, o in zip(qms, offsets) if q.sparse is not None]
    sparse = None
    if pieces:
        sparse = SparseOutliers(rows=torch.cat([s.rows + o for s, o in pieces]),
                                cols=torch.cat([s.cols for s, _ in pieces]),
                                values=torch.cat([s.values for s, _ in pieces]), shape=(out, n))
    dtypes = {m.sparse_dtype for m in metas if m.sparse_dtype is not None}
    value_dtype = SPARSE_DTYPES[dtypes.pop()] if len(dtypes) == 1 else torch.float32
    return _pack(QuantizedMatrix(dense=dense, sparse=sparse), value_dtype)


def fuse_rows(parts: Sequence[tuple[Mapping[str, Tensor], LayerMeta]]) -> list[Packed]:
    """The parts of a fused layer as one stacked linear where :func:`concat_rows` applies, else unchanged
    (each computed on its own and the outputs concatenated)."""
    if concat_blocker([m for _, m in parts], [t.get("group_bits") for t, _ in parts]) is None:
        return [concat_rows(parts)]
    return [(dict(t), m) for t, m in parts]


def _stored_dtype(meta: LayerMeta) -> torch.dtype:
    """The dtype the outliers of ``meta`` are stored in (which holds every slice of them exactly)."""
    return SPARSE_DTYPES[meta.sparse_dtype] if meta.sparse_dtype is not None else torch.float32


def _pack(qm: QuantizedMatrix, value_dtype: torch.dtype) -> Packed:
    return pack_matrix(qm, "", value_dtype), matrix_meta(qm, value_dtype)
