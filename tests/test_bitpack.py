"""Bit packing: exact agreement with a bit-string oracle, round trips, planar order, bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqllm.formats.bitpack import (
    block_shape,
    pack_codes,
    packed_words,
    planar_columns,
    unpack_codes,
    unpack_planar,
)


def oracle_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout as written in the spec, one Python integer per row: code j at bits [j*b, (j+1)*b)."""
    words = packed_words(codes.shape[1], bits)
    rows = []
    for row in codes.tolist():
        stream = sum(c << (j * bits) for j, c in enumerate(row))
        w = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(words)]
        rows.append([v - (1 << 32) if v >> 31 else v for v in w])  # as int32
    return torch.tensor(rows, dtype=torch.int32).view(codes.shape[0], words)


def random_codes(seed: int, out: int, n: int, bits: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (out, n), generator=g, dtype=torch.uint8)


shapes = dict(
    bits=st.integers(1, 8), out=st.integers(1, 4), n=st.integers(1, 150), seed=st.integers(0, 2**31 - 1)
)


@settings(max_examples=150, deadline=None)
@given(**shapes)
def test_pack_matches_bit_string_oracle_and_round_trips(bits: int, out: int, n: int, seed: int) -> None:
    codes = random_codes(seed, out, n, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (out, -(-n * bits // 32))
    assert torch.equal(packed, oracle_pack(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@settings(max_examples=100, deadline=None)
@given(**shapes, pad_to=st.integers(0, 200))
def test_planar_order_is_a_column_permutation(bits: int, out: int, n: int, seed: int, pad_to: int) -> None:
    codes = random_codes(seed, out, n, bits)
    planar = unpack_planar(pack_codes(codes, bits), bits, n, pad_to)
    _, cpb = block_shape(bits)
    assert planar.shape == (out, cpb, -(-max(n, pad_to) // cpb))
    cols = planar_columns(bits, n, pad_to)
    with_zero = torch.cat([codes, torch.zeros(out, 1, dtype=torch.uint8)], dim=1)  # column n reads 0
    assert torch.equal(planar.reshape(out, -1), with_zero[:, cols])
    assert torch.equal(cols[cols < n].sort().values, torch.arange(n))  # every column exactly once


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_and_word_straddling(bits: int) -> None:
    """All-ones codes fill every bit up to n*bits (including the sign bit of words) and none after."""
    n = 67  # 67 * 3 = 201 bits: 3-bit codes straddle words 0/1 (j=10) and 1/2 (j=21)
    codes = torch.full((2, n), (1 << bits) - 1, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(packed[0].tolist()))
    assert stream == (1 << (n * bits)) - 1
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_known_3bit_words() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 5]], dtype=torch.uint8)
    # code 10 (value 3) sits in bits 30..32: two bits in word 0, one in word 1; code 11 at bits 33..35.
    word0 = sum(c << (3 * j) for j, c in enumerate(codes[0].tolist())) & 0xFFFFFFFF
    assert pack_codes(codes, 3).tolist() == [[word0 - (1 << 32), 0b1010]]


def test_pack_rejects_codes_too_wide_and_bad_bits() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="packable range"):
            pack_codes(torch.zeros(1, 4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(1, 4, dtype=torch.int64), 4)


def test_unpack_rejects_wrong_word_count() -> None:
    packed = pack_codes(torch.zeros(2, 20, dtype=torch.uint8), 3)  # 2 words
    with pytest.raises(ValueError, match=r"int32 \[out, 1\]"):
        unpack_codes(packed, 3, 10)
