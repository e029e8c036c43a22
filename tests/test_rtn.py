"""Round-to-nearest on single matrices: the properties every uniform quantizer must have."""

from __future__ import annotations

import pytest
import torch

from sqllm.codes import fp16_grid
from sqllm.config import RTNConfig
from sqllm.errors import InvalidConfig
from sqllm.quant.rtn import rtn_quantize


def _w(out=48, n_in=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed columns, as in real LLM weights
    return torch.randn(out, n_in, generator=g) * torch.rand(n_in, generator=g).pow(3).mul(4).add(0.2)


def _err(w, cfg):
    return float((rtn_quantize(w, cfg).dequantize() - w).pow(2).mean())


@pytest.mark.parametrize("group", [None, 128, 64])
def test_error_shrinks_as_bits_grow(group):
    w = _w()
    errs = [_err(w, RTNConfig(b, group)) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_groupwise_beats_per_channel(bits):
    w = _w()
    assert _err(w, RTNConfig(bits, 64)) < _err(w, RTNConfig(bits, 128)) < _err(w, RTNConfig(bits, None))


def test_partial_last_group_matches_its_own_minmax():
    w = _w(n_in=576)
    qm = rtn_quantize(w, RTNConfig(3, 128))
    assert qm.dense.scales.shape == (48, 5) and qm.dense.group_size == 128
    last = w[:, 512:]
    alone = rtn_quantize(last, RTNConfig(3, None)).dequantize()
    torch.testing.assert_close(qm.dequantize()[:, 512:], alone, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_error_bounded_by_half_step(bits):
    w = _w()
    qm = rtn_quantize(w, RTNConfig(bits, 64))
    assert int(qm.dense.codes.max()) <= 2**bits - 1
    step = qm.dense.scales.repeat_interleave(64, dim=1)[:, :576]
    # half a step, plus the float16 rounding of the scale stretching the grid
    assert bool(((qm.dequantize() - w).abs() <= step * (0.5 + 2**-9 * 2**bits)).all())


def test_values_on_the_grid_are_exact():
    scale = fp16_grid(torch.rand(16, 1) + 0.1)
    codes = torch.randint(0, 16, (16, 64))
    codes[:, 0], codes[:, 1] = 0, 15  # pin the min-max fit to the grid's ends
    zero = torch.full((16, 1), 5.0)
    w = scale * (codes - zero)
    torch.testing.assert_close(rtn_quantize(w, RTNConfig(4)).dequantize(), w, rtol=0, atol=1e-6)


def test_bits_per_weight_counts_scales():
    qm = rtn_quantize(_w(), RTNConfig(4, 64))
    # 4 bits + (16-bit scale + 16-bit zero) per 64 weights
    assert qm.bits_per_weight() == pytest.approx(4 + 32 / 64)


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(bits=4, group_size=0)])
def test_bad_config(kwargs):
    with pytest.raises(InvalidConfig):
        RTNConfig(**kwargs)
