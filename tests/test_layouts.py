"""Per-linear layout: bit-exact pack/unpack round trips, the tensor table, size accounting, corruption."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqllm.codes import LUTCodes, QuantizedMatrix, SparseOutliers, UniformCodes, expand_groups, fp16_grid, num_groups
from sqllm.errors import CorruptCheckpoint
from sqllm.formats import LayerMeta, check_csr, matrix_meta, pack_matrix, storage_bits, tensor_specs, unpack_matrix

PREFIX = "model.layers.0.self_attn.q_proj."


def outliers(g: torch.Generator, out: int, n: int, nnz: int, value_dtype: torch.dtype) -> SparseOutliers:
    """``nnz`` distinct positions, sorted by row then column, values exactly representable in value_dtype."""
    flat = torch.randperm(out * n, generator=g)[:nnz].sort().values
    values = (torch.randn(nnz, generator=g) * 10).to(value_dtype).float()
    return SparseOutliers(rows=flat // n, cols=flat % n, values=values, shape=(out, n))


def lut_matrix(
    seed: int, out: int, n: int, bits: int, nnz: int = 0, value_dtype: torch.dtype = torch.float32
) -> QuantizedMatrix:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, n), generator=g, dtype=torch.uint8)
    lut = fp16_grid(torch.randn(out, 1 << bits, generator=g))
    sparse = outliers(g, out, n, nnz, value_dtype) if nnz else None
    return QuantizedMatrix(LUTCodes(codes, lut, bits), sparse)


def lut_rows_matrix(seed: int, out: int, n: int, widths: list[int], nnz: int = 0) -> QuantizedMatrix:
    """Mixed-width LUT rows: each row's width drawn from ``widths`` (the first two rows get the first two
    widths), its codes below ``2**width`` and its table padded with +inf past them."""
    g = torch.Generator().manual_seed(seed)
    row_bits = torch.tensor(widths)[torch.randint(0, len(widths), (out,), generator=g)]
    row_bits[: min(2, out)] = torch.tensor(widths[: min(2, out)])
    codes = (torch.rand(out, n, generator=g) * 2.0 ** row_bits[:, None]).floor().to(torch.uint8)
    bits = int(row_bits.max())
    lut = fp16_grid(torch.randn(out, 1 << bits, generator=g))
    lut[torch.arange(1 << bits) >= (1 << row_bits)[:, None]] = float("inf")
    sparse = outliers(g, out, n, nnz, torch.float16) if nnz else None
    return QuantizedMatrix(LUTCodes(codes, lut, bits, row_bits.long()), sparse)


def uniform_matrix(seed: int, out: int, n: int, group_size: int, widths: list[int], nnz: int = 0) -> QuantizedMatrix:
    """Random uniform codes; each group's width drawn from ``widths`` (the first two forced in if mixed)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = num_groups(n, group_size)
    group_bits = torch.tensor(widths)[torch.randint(0, len(widths), (n_groups,), generator=g)]
    if len(widths) > 1:
        group_bits[:2] = torch.tensor(widths[:2])
    col_bits = expand_groups(group_bits, group_size, n)
    codes = (torch.rand(out, n, generator=g) * 2.0**col_bits).floor().to(torch.uint8)
    scales = fp16_grid(torch.rand(out, n_groups, generator=g) * 0.1 + 1e-3)
    zeros = fp16_grid(torch.randn(out, n_groups, generator=g) * 4)  # any value (SliM's 1-bit groups)
    sparse = outliers(g, out, n, nnz, torch.float16) if nnz else None
    return QuantizedMatrix(UniformCodes(codes, scales, zeros, group_bits.long(), group_size), sparse)


def uniform_op_case(bits: int, out: int, n: int, group_size: int) -> tuple[QuantizedMatrix, tuple]:
    """A one-width uniform matrix of ``bits`` (seeded by its case) and the packed arguments of
    ``uniform_mm`` after ``x``: (qweight, scales, zeros, group ids, group_size, bits, n)."""
    qm = uniform_matrix(10 * bits + n + group_size, out, n, group_size, [bits])
    t = pack_matrix(qm, "", torch.float32)
    return qm, (t["qweight"], t["scales"], t["zeros"], torch.arange(t["scales"].shape[1]), group_size, bits, n)


def round_trip(qm: QuantizedMatrix, value_dtype: torch.dtype = torch.float32) -> QuantizedMatrix:
    """Pack, serialize the meta through JSON, check and unpack, as a checkpoint would."""
    tensors = pack_matrix(qm, PREFIX, value_dtype)
    meta = LayerMeta.from_dict(json.loads(json.dumps(matrix_meta(qm, value_dtype).to_dict())), PREFIX)
    return unpack_matrix(tensors, PREFIX, meta)


def assert_bit_exact(qm: QuantizedMatrix, back: QuantizedMatrix) -> None:
    assert torch.equal(back.dequantize(), qm.dequantize())
    assert torch.equal(back.dense.codes, qm.dense.codes)


dims = dict(out=st.integers(1, 9), n=st.integers(1, 140), seed=st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(**dims, bits=st.integers(1, 8), nnz_frac=st.floats(0, 0.2),
       value_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_lut_with_outliers_round_trips_bit_exact(out, n, seed, bits, nnz_frac, value_dtype) -> None:
    qm = lut_matrix(seed, out, n, bits, int(nnz_frac * out * n), value_dtype)
    assert_bit_exact(qm, round_trip(qm, value_dtype))


@settings(max_examples=60, deadline=None)
@given(**dims, bits=st.integers(1, 8), group_size=st.integers(1, 64), nnz=st.integers(0, 5))
def test_uniform_grouped_round_trips_bit_exact(out, n, seed, bits, group_size, nnz) -> None:
    qm = uniform_matrix(seed, out, n, group_size, [bits], min(nnz, out * n))
    back = round_trip(qm, torch.float16)
    assert_bit_exact(qm, back)
    assert torch.equal(back.dense.group_bits, qm.dense.group_bits)


@settings(max_examples=60, deadline=None)
@given(**dims, widths=st.lists(st.integers(1, 4), min_size=2, max_size=4, unique=True),
       group_size=st.integers(1, 48))
def test_mixed_bit_maps_round_trip_bit_exact(out, n, seed, widths, group_size) -> None:
    n = max(n, 2 * group_size)  # at least two groups, so two widths are present
    qm = uniform_matrix(seed, out, n, group_size, sorted(widths))
    back = round_trip(qm)
    assert_bit_exact(qm, back)
    assert torch.equal(back.dense.group_bits, qm.dense.group_bits)


@settings(max_examples=60, deadline=None)
@given(**dims, widths=st.lists(st.integers(1, 8), min_size=2, max_size=4, unique=True), nnz=st.integers(0, 5))
def test_mixed_lut_rows_round_trip_bit_exact(out, n, seed, widths, nnz) -> None:
    qm = lut_rows_matrix(seed, max(out, 2), n, sorted(widths), min(nnz, n))
    back = round_trip(qm, torch.float16)
    assert_bit_exact(qm, back)
    assert torch.equal(back.dense.row_bits, qm.dense.row_bits) and torch.equal(back.dense.lut, qm.dense.lut)


def test_partial_last_group_and_per_channel() -> None:
    for qm in (uniform_matrix(0, 6, 576, 128, [3]), uniform_matrix(1, 6, 576, 576, [4]),
               uniform_matrix(2, 6, 100, 32, [1, 2, 3, 4]), uniform_matrix(3, 6, 100, 100, [2], nnz=7)):
        assert_bit_exact(qm, round_trip(qm, torch.float16))


def test_tensor_names_dtypes_and_shapes() -> None:
    qm = uniform_matrix(0, 8, 100, 32, [2, 3, 4], nnz=5)  # groups: 32,32,32,4 columns
    t = pack_matrix(qm, PREFIX, torch.float32)
    bits = qm.dense.group_bits.tolist()
    cols = {b: sum(min(32, 100 - 32 * g) for g, gb in enumerate(bits) if gb == b) for b in (2, 3, 4)}
    expected = {f"qweight_b{b}": (torch.int32, (8, -(-cols[b] * b // 32))) for b in (2, 3, 4)}
    expected |= {"group_bits": (torch.int8, (4,)), "scales": (torch.float16, (8, 4)),
                 "zeros": (torch.float16, (8, 4)), "sp_crow": (torch.int32, (9,)), "sp_col": (torch.int32, (5,)), "sp_val": (torch.float32, (5,))}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {PREFIX + k: v for k, v in expected.items()}

    lut = pack_matrix(lut_matrix(0, 8, 100, 3), PREFIX, torch.float16)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in lut.items()} == {
        PREFIX + "qweight": (torch.int32, (8, 10)), PREFIX + "lut": (torch.float16, (8, 8))}


def test_meta_is_json_and_describes_the_layer() -> None:
    meta = matrix_meta(uniform_matrix(0, 8, 100, 32, [1, 4]), torch.float16)
    d = meta.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["kind"] == "uniform" and d["bits"] == 4 and d["group_size"] == 32 and d["shape"] == [8, 100]
    assert sum(d["mixed_cols"].values()) == 100 and set(d["mixed_cols"]) == {"1", "4"}
    assert LayerMeta.from_dict(d) == meta
    lut = matrix_meta(lut_matrix(0, 8, 100, 3, nnz=4), torch.bfloat16).to_dict()
    described = (lut["kind"], lut["bits"], lut["group_size"], lut["nnz"], lut["sparse_dtype"])
    assert described == ("lut", 3, None, 4, "bfloat16")


def test_storage_bits_count_the_packed_tensors() -> None:
    # 64 columns: no word padding at any width, so the packed size equals the codes' own accounting.
    lut, mixed = lut_matrix(0, 8, 64, 4, nnz=6, value_dtype=torch.float16), uniform_matrix(1, 8, 64, 16, [2, 4], nnz=3)
    for qm in (lut, mixed, lut_rows_matrix(2, 8, 64, [2, 3, 4], nnz=4)):
        tensors = pack_matrix(qm, PREFIX, torch.float16)
        parts = storage_bits(tensors, PREFIX, matrix_meta(qm, torch.float16))
        assert parts.pop("total") == sum(8 * t.numel() * t.element_size() for t in tensors.values())
        assert parts == qm.storage_bits()
    padded = lut_matrix(0, 2, 5, 3)  # 15 bits of codes per row occupy one word
    assert storage_bits(pack_matrix(padded, "", torch.float16), "", matrix_meta(padded, torch.float16))["codes"] == 64


def corrupt(name: str, edit) -> tuple[dict, LayerMeta]:
    qm = uniform_matrix(0, 8, 100, 32, [2, 3], nnz=6)
    tensors = pack_matrix(qm, PREFIX, torch.float16)
    tensors[PREFIX + name] = edit(tensors[PREFIX + name])
    return tensors, matrix_meta(qm, torch.float16)


@pytest.mark.parametrize(
    "name, edit, match",
    [
        ("scales", None, "missing tensor"),
        ("qweight_b2", lambda t: t[:, :-1], "expected int32"),
        ("zeros", lambda t: t.float(), "expected float16"),
        ("sp_val", lambda t: t[:-1], "expected float16"),
        ("group_bits", lambda t: torch.full_like(t, 2), "meta says"),
        ("sp_crow", lambda t: torch.cat([t[:1], t[-1:], 0 * t[2:-1], t[-1:]]), "decreases"),
        ("sp_crow", lambda t: t - 1, "run from 0"),
        ("sp_col", lambda t: t + 100, "outside"),
        ("sp_col", lambda t: torch.cat([t[:1], t[:-1]]), "strictly increasing"),
    ],
)
def test_corrupt_tensors_raise_naming_the_tensor(name, edit, match) -> None:
    if edit is None:
        tensors, meta = corrupt(name, lambda t: t)
        del tensors[PREFIX + name]
    else:
        tensors, meta = corrupt(name, edit)
    with pytest.raises(CorruptCheckpoint, match=match) as e:
        unpack_matrix(tensors, PREFIX, meta)
    assert PREFIX + name in str(e.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("kind"),
        lambda d: d.update(kind="vq"),
        lambda d: d.update(bits=9),
        lambda d: d.update(shape=[8]),
        lambda d: d.update(shape=[8, 100, 1]),
        lambda d: d.update(group_size=None),
        lambda d: d.update(mixed_cols={"2": 1, "3": 1}),
        lambda d: d.update(sparse_dtype="int8"),
    ],
)
def test_malformed_meta_raises_naming_the_layer(edit) -> None:
    d = matrix_meta(uniform_matrix(0, 8, 100, 32, [2, 3], nnz=2), torch.float16).to_dict()
    edit(d)
    with pytest.raises(CorruptCheckpoint, match="q_proj"):
        LayerMeta.from_dict(d, PREFIX)


def test_pack_refuses_what_it_could_not_store_exactly() -> None:
    qm = lut_matrix(0, 4, 16, 2)
    qm.dense.lut += 1e-4  # off the fp16 grid
    with pytest.raises(ValueError, match="LUT entries are not float16-representable"):
        pack_matrix(qm, "", torch.float16)
    qm = lut_matrix(0, 4, 16, 2, nnz=3)
    qm.sparse.values += 1e-4
    with pytest.raises(ValueError, match="not exactly representable in torch.float16"):
        pack_matrix(qm, "", torch.float16)
    qm.sparse.rows = qm.sparse.rows.flip(0)
    with pytest.raises(ValueError, match="sorted by row then column"):
        pack_matrix(qm, "", torch.float32)


def test_specs_table_is_what_pack_writes() -> None:
    qm = lut_matrix(0, 3, 33, 5, nnz=2)
    meta = matrix_meta(qm, torch.float32)
    t = pack_matrix(qm, "", torch.float32)
    table = {k: (s.dtype, s.shape) for k, s in tensor_specs(meta).items()}
    assert table == {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}


@pytest.mark.parametrize("cols", [[3, 3], [5, 3]])
def test_csr_rejects_duplicate_or_unsorted_columns_within_a_row(cols) -> None:
    crow, col = torch.tensor([0, 2, 2], dtype=torch.int32), torch.tensor(cols, dtype=torch.int32)
    with pytest.raises(CorruptCheckpoint, match="x.sp_col is not strictly increasing"):
        check_csr(crow, col, 8, names=("x.sp_crow", "x.sp_col"))
    check_csr(crow, torch.tensor([3, 5], dtype=torch.int32), 8)  # the sorted, distinct version passes
