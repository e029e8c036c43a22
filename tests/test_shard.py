"""Tensor-parallel slicing of packed linears: shards dequantize to exact slices of the weight, and the
shards' outputs concatenate (column-parallel) or sum (row-parallel) to the unsharded output."""

from __future__ import annotations

import pytest
import torch

from sqllm.codes import QuantizedMatrix
from sqllm.errors import InvalidConfig
from sqllm.formats import matrix_meta, pack_matrix
from sqllm.formats.shard import (
    check_column_split,
    concat_blocker,
    concat_rows,
    fuse_rows,
    shard_range,
    split_columns,
    split_rows,
)
from sqllm.nn import QuantLinear
from test_layouts import lut_matrix, uniform_matrix

# name -> random matrix [out, 96] in every layout sqllm writes; groups of 16 so 2-way splits fit them.
LAYOUTS = {
    "lut3_sparse": lambda seed, out=24: lut_matrix(seed, out, 96, 3, nnz=2 * out),
    "lut4": lambda seed, out=24: lut_matrix(seed, out, 96, 4),
    "lut2": lambda seed, out=24: lut_matrix(seed, out, 96, 2),
    "uniform4_g16": lambda seed, out=24: uniform_matrix(seed, out, 96, 16, [4]),
    "uniform3_per_channel": lambda seed, out=24: uniform_matrix(seed, out, 96, 96, [3], nnz=out // 2),
    "mixed123_g16": lambda seed, out=24: uniform_matrix(seed, out, 96, 16, [1, 2, 3]),
}


def packed(qm: QuantizedMatrix):
    return pack_matrix(qm, "", torch.float32), matrix_meta(qm, torch.float32)


def module(tensors, meta) -> QuantLinear:
    m = QuantLinear(meta, device="meta")
    m.load_state_dict(tensors, assign=True)
    return m


def x_batch(n: int) -> torch.Tensor:
    return torch.randn(5, n, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_column_parallel_shards_concatenate(name, world):
    qm = LAYOUTS[name](0)
    tensors, meta = packed(qm)
    w = qm.dequantize()
    x = x_batch(96)
    outs = []
    for rank in range(world):
        start, stop = shard_range(24, 24 // world, rank, world)
        shard = split_rows(tensors, meta, start, stop)
        lin = module(*shard)
        assert torch.equal(lin.dequantize_weight(), w[start:stop])  # bit for bit the rows of the weight
        outs.append(lin(x))
    torch.testing.assert_close(torch.cat(outs, dim=1), module(tensors, meta)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_row_parallel_shards_sum(name):
    qm = LAYOUTS[name](1)
    tensors, meta = packed(qm)
    w = qm.dequantize()
    x = x_batch(96)
    total = torch.zeros(5, 24)
    for rank in range(2):
        start, stop = shard_range(96, 48, rank, 2)
        lin = module(*split_columns(tensors, meta, start, stop))
        assert torch.equal(lin.dequantize_weight(), w[:, start:stop])
        total += lin(x[:, start:stop])
    torch.testing.assert_close(total, module(tensors, meta)(x), rtol=1e-5, atol=1e-5)


def test_outliers_follow_their_shard():
    qm = lut_matrix(2, 24, 96, 3, nnz=60)
    tensors, meta = packed(qm)
    rows = [split_rows(tensors, meta, a, a + 8)[1].nnz for a in (0, 8, 16)]
    cols = [split_columns(tensors, meta, a, a + 48)[1].nnz for a in (0, 48)]
    assert sum(rows) == sum(cols) == 60
    in_first_rows = int((qm.sparse.rows < 8).sum())
    assert rows[0] == in_first_rows


def test_mixed_shard_with_one_width_becomes_plain_uniform():
    qm = uniform_matrix(4, 8, 64, 16, [2, 3])  # groups 0, 1 get widths 2, 3 (forced), then random
    qm.dense.group_bits[2:] = 3
    qm.dense.codes[:, :16] &= 3
    tensors, meta = packed(qm)
    assert meta.mixed_cols is not None
    shard_t, shard_meta = split_columns(tensors, meta, 32, 64)
    assert shard_meta.mixed_cols is None and shard_meta.bits == 3 and "qweight" in shard_t
    assert torch.equal(module(shard_t, shard_meta).dequantize_weight(), qm.dequantize()[:, 32:64])


def test_split_cutting_a_group_is_refused():
    tensors, meta = packed(uniform_matrix(5, 8, 96, 32, [4]))
    with pytest.raises(InvalidConfig, match="input column 48 cuts a group of 32 columns"):
        split_columns(tensors, meta, 0, 48, where="model.layers.0.mlp.down_proj")
    check_column_split(meta, 32, 96)  # on group boundaries: fine
    check_column_split(packed(lut_matrix(5, 8, 96, 3))[1], 0, 47)  # LUT rows hold for any columns


def test_partial_last_group_may_end_a_shard():
    qm = uniform_matrix(6, 8, 72, 32, [4])  # groups [0,32) [32,64) [64,72)
    tensors, meta = packed(qm)
    lin = module(*split_columns(tensors, meta, 32, 72))
    assert torch.equal(lin.dequantize_weight(), qm.dequantize()[:, 32:72])


@pytest.mark.parametrize("name", LAYOUTS)
def test_fused_qkv_with_replicated_kv_heads(name):
    """q [24 rows], k and v [8 rows each] stacked, then split over 4 ranks as vLLM's QKV layer does:
    q by 4, k and v (fewer heads than ranks) each replicated on 2 ranks."""
    mats = [LAYOUTS[name](10), LAYOUTS[name](11, out=8), LAYOUTS[name](12, out=8)]
    full = [packed(m) for m in mats]
    x = x_batch(96)
    ref = torch.cat([m.dequantize() for m in mats]) @ x.T
    world = 4
    per_rank = [6, 4, 4]  # q: 24 / 4; k, v: 8 / 2 (one kv piece per pair of ranks)
    q, k, v = [], [], []
    for rank in range(world):
        shards = []
        for (tensors, meta), p in zip(full, per_rank):
            start, stop = shard_range(meta.shape[0], p, rank, world)
            shards.append(split_rows(tensors, meta, start, stop))
        y = torch.cat([module(*part)(x) for part in fuse_rows(shards)], dim=1).T
        q.append(y[:6]), k.append(y[6:10]), v.append(y[10:])
    got = torch.cat([torch.cat(q), torch.cat(k[::2]), torch.cat(v[::2])])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k[0], k[1], rtol=0, atol=0)  # replicas agree exactly


def test_fuse_rows_stacks_only_matching_layouts():
    lut = [packed(lut_matrix(s, 8, 64, 3)) for s in range(2)]
    mixed = [packed(uniform_matrix(s, 8, 64, 16, [2, 3])) for s in range(2)]
    assert [m.shape for _, m in fuse_rows(lut)] == [(16, 64)]
    assert [m.shape for _, m in fuse_rows(mixed)] == [(8, 64), (8, 64)]


def test_concat_rows_is_the_stacked_weight():
    mats = [lut_matrix(s, 8, 64, 3, nnz=s * 5) for s in range(3)]  # the first part has no outliers
    tensors, meta = concat_rows([packed(m) for m in mats])
    assert meta.shape == (24, 64) and meta.nnz == 15
    assert torch.equal(module(tensors, meta).dequantize_weight(), torch.cat([m.dequantize() for m in mats]))


def test_concat_blocker_names_the_difference():
    a, b = packed(uniform_matrix(0, 8, 64, 16, [2, 3])), packed(uniform_matrix(1, 8, 64, 16, [2, 3]))
    assert not torch.equal(a[0]["group_bits"], b[0]["group_bits"])
    assert "different bit widths" in concat_blocker([a[1], b[1]], [a[0]["group_bits"], b[0]["group_bits"]])
    lut3, lut4 = packed(lut_matrix(0, 8, 64, 3)), packed(lut_matrix(0, 8, 64, 4))
    assert concat_blocker([lut3[1], lut4[1]]) == "part 1 has bits=4, part 0 has bits=3"
    with pytest.raises(ValueError, match="bits=4"):
        concat_rows([lut3, lut4])


def test_shard_range_rejects_uneven_splits():
    assert shard_range(8, 4, 3, 4) == (4, 8)  # 2 pieces over 4 ranks: ranks 2, 3 hold the second
    with pytest.raises(ValueError, match="do not spread evenly"):
        shard_range(9, 3, 0, 2)
    with pytest.raises(ValueError, match="slice of 5 out of 8"):
        shard_range(8, 5, 0, 2)
