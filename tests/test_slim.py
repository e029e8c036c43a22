"""SliM-LLM on single matrices: exact average bits, a KL search that can decline to mix, binarized
1-bit groups, reported errors that match the returned codes, and a win over uniform GPTQ where
column salience is uneven."""

from __future__ import annotations

import pytest
import torch

from sqllm.config import GPTQConfig, SliMConfig
from sqllm.errors import InvalidConfig, NumericalError
from sqllm.quant.gptq import gptq_core, gptq_quantize, hessian_error, nearest_codes
from sqllm.quant.slim import (
    binary_grid,
    group_salience,
    salience_denominator,
    sba_bits,
    slim_quantize,
    sqc_grid,
    sqc_multipliers,
)
from sqllm.quant.uniform import dequantize_grid, minmax_grid


def _uneven_layer(out=64, n_in=256, group=32, n_tok=384, seed=0):
    """Weight whose column groups differ in scale (uneven salience), correlated inputs, ``H = 2/n X^T X``."""
    g = torch.Generator().manual_seed(seed)
    n_g = -(-n_in // group)
    col_scale = torch.rand(n_g, generator=g).pow(3).mul(4).add(0.2).repeat_interleave(group)[:n_in]
    w = torch.randn(out, n_in, generator=g) * col_scale
    x = torch.randn(n_tok, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) / 16
    return w, x, 2 / n_tok * x.T @ x


def _out_err(w, q, x):
    return float(((w - q) @ x.T).norm())


# --- SBA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_groups", range(1, 12))
def test_sba_keeps_the_exact_average_for_every_p(n_groups):
    sal = torch.rand(n_groups, generator=torch.Generator().manual_seed(n_groups))
    for bits in (2, 3):
        for p in range(n_groups // 2 + 1):
            b = sba_bits(sal, n_groups, bits, p)
            assert b.sum() == bits * n_groups
            order = torch.argsort(sal)
            assert set(order[:p].tolist()) == set(torch.nonzero(b == bits - 1).flatten().tolist())
            assert set(order[n_groups - p :].tolist()) == set(torch.nonzero(b == bits + 1).flatten().tolist())


def test_sba_keeps_a_partial_last_group_at_the_target():
    sal = torch.tensor([5.0, 1.0, 3.0, 100.0])  # the last group is partial and the most salient
    b = sba_bits(sal, 3, 2, 1)
    assert b.tolist() == [3, 1, 2, 2]
    with pytest.raises(ValueError):
        sba_bits(sal, 3, 2, 2)


def test_codes_cost_exactly_the_target_bits_with_a_partial_group():
    w, x, h = _uneven_layer(n_in=240)  # 7 full groups of 32 and one of 16
    qm = slim_quantize(w, h, x, SliMConfig(2, group_size=32))
    assert qm.info["p"] > 0 and len(qm.info["group_bits"]) == 8
    assert qm.dense.storage_bits()["codes"] == 2 * 64 * 240
    bits_per_col = qm.dense.group_bits.repeat_interleave(32)[:240]
    assert bool((qm.dense.codes.long() <= 2**bits_per_col - 1).all())


def _on_grid_equal_salience(bits, out=32, group=16, n_groups=8, n_tok=256):
    """Every group-row holds each level of the ``bits``-bit min-max grid equally often (so the cheap
    ``bits`` quantization is lossless and all groups are equally salient), H = I exactly."""
    g = torch.Generator().manual_seed(0)
    levels = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) * 0.125  # contains 0, step fp16-exact
    base = levels.repeat(group // levels.numel())
    w = torch.stack([base[torch.randperm(group, generator=g)] for _ in range(out * n_groups)])
    w = w.reshape(out, n_groups * group)
    q, _ = torch.linalg.qr(torch.randn(n_tok, n_groups * group, generator=g, dtype=torch.float64))
    x = (q * (n_tok / 2) ** 0.5).float()  # X^T X = n/2 I
    return w, x, torch.eye(n_groups * group)


@pytest.mark.parametrize("bits", [2, 3])
def test_kl_search_picks_p0_when_groups_are_equally_salient(bits):
    w, x, h = _on_grid_equal_salience(bits)
    qm = slim_quantize(w, h, x, SliMConfig(bits, group_size=16))
    sal = group_salience(w, torch.ones(w.shape[1]), 16)
    assert bool((sal == sal[0]).all())
    kl = qm.info["kl"]
    assert len(kl) == 5 and kl[0] == 0.0 and min(kl[1:]) > 0
    assert qm.info["p"] == 0 and qm.info["group_bits"] == [bits] * 8
    assert torch.equal(qm.dequantize(), w)  # on-grid weights survive GPTQ + SQC at the target bits


# --- 1-bit groups ------------------------------------------------------------------------------------


def _assert_binarized(got, w):
    """``got`` is ``alpha * sign(w - mu) + mu`` per row of ``w: [rows, n]`` up to the fp16 storage of the
    grid: both levels within ``2**-10 (|mu| + alpha)``, and the sign may differ only for weights this
    close to ``mu`` (where the stored levels' midpoint may fall on either side)."""
    mu = w.mean(dim=1, keepdim=True)
    alpha = (w - mu).abs().mean(dim=1, keepdim=True)
    tol = (mu.abs() + alpha) * 2**-10
    up, down = (got - (mu + alpha)).abs() <= tol, (got - (mu - alpha)).abs() <= tol
    assert bool((up | down).all())
    clear = (w - mu).abs() > tol
    assert torch.equal(up[clear], (w >= mu)[clear])


@pytest.mark.parametrize("offset", [0.0, 0.3, -5.0, 200.0])
def test_binary_grid_reconstructs_sign_binarization(offset):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) + offset
    s, z = binary_grid(w)
    assert torch.equal(s, s.half().float()) and torch.equal(z, z.half().float())
    codes = nearest_codes(w, s[:, None], z[:, None], 1)
    _assert_binarized(dequantize_grid(codes, s[:, None], z[:, None]), w)


def test_binary_grid_constant_rows():
    w = torch.stack([torch.zeros(32), torch.full((32,), 0.7), torch.full((32,), -3.0)])
    s, z = binary_grid(w)
    got = dequantize_grid(nearest_codes(w, s[:, None], z[:, None], 1), s[:, None], z[:, None])
    assert bool((got[0] == 0).all())  # all-zero rows stay exactly zero
    torch.testing.assert_close(got, w, rtol=2**-10, atol=0)


def test_gptq_core_with_binary_groups_and_no_feedback_is_binarization():
    w, _, _ = _uneven_layer(n_in=96)
    dense, q, _ = gptq_core(w, torch.eye(96), 32, torch.ones(3, dtype=torch.int64), lambda wg, b, c: binary_grid(wg))
    assert torch.equal(q, dense.dequantize()) and int(dense.codes.max()) == 1
    for c in (0, 32, 64):
        _assert_binarized(q[:, c : c + 32], w[:, c : c + 32])


# --- SQC ---------------------------------------------------------------------------------------------


def test_sqc_with_only_multiplier_one_is_minmax():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    s, z = sqc_grid(w, 3, w.pow(2), torch.ones(1), 0.1, 2.0)
    s0, z0 = minmax_grid(w, 3)
    assert torch.equal(s, s0) and torch.equal(z, z0)


def test_sqc_never_loses_to_minmax_on_its_weighted_error():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=g) * torch.rand(64, generator=g).add(0.1)
    sal = w.pow(2)
    cfg = SliMConfig(2)
    s, z = sqc_grid(w, 3, sal, sqc_multipliers(cfg), 0.1, 2.0)
    s0, z0 = minmax_grid(w, 3)
    c = torch.where(sal >= torch.topk(sal.flatten(), round(0.1 * sal.numel())).values[-1], 2.0, 1.0)

    def err(s, z):
        s, z = s[:, None], z[:, None]
        return (c * (dequantize_grid(nearest_codes(w, s, z, 7), s, z) - w).pow(2)).sum(1)

    e, e0 = err(s, z), err(s0, z0)
    assert bool((e <= e0).all()) and bool((e < e0).any())
    assert sqc_multipliers(cfg).numel() == 102 and sqc_multipliers(cfg)[0] == 1


# --- salience ----------------------------------------------------------------------------------------


def test_salience_denominators():
    b = torch.randn(64, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    h = b @ b.T / 64 + torch.eye(64, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(salience_denominator(u, "inverse"), torch.diagonal(torch.linalg.inv(h)))
    assert torch.equal(salience_denominator(u, "cholesky"), torch.diagonal(u))


def test_group_salience_sums_columns_and_rows():
    w = torch.randn(8, 70, generator=torch.Generator().manual_seed(5))
    d = torch.rand(70, generator=torch.Generator().manual_seed(6)) + 0.5
    sal = group_salience(w, d, 32)
    full = w.pow(2) / d.pow(2)
    torch.testing.assert_close(sal, torch.stack([full[:, :32].sum(), full[:, 32:64].sum(), full[:, 64:].sum()]))


# --- the whole method --------------------------------------------------------------------------------


@pytest.mark.parametrize("dead", [False, True])
def test_reported_error_is_the_error_of_the_returned_codes(dead):
    w, x, _ = _uneven_layer()
    if dead:  # zeroed weights need not sit on a binarized or SQC grid: their error counts only through H
        x[:, [3, 40, 41]] = 0
    h = 2 / x.shape[0] * x.T @ x
    qm = slim_quantize(w, h, x, SliMConfig(2, group_size=32))
    assert 1 in qm.info["group_bits"]  # binarized groups are part of what is checked
    direct = hessian_error(w, qm.dequantize(), h)
    assert qm.info["hessian_error"] == pytest.approx(direct, rel=1e-4)
    assert direct == pytest.approx(2 / x.shape[0] * _out_err(w, qm.dequantize(), x) ** 2, rel=1e-3)


@pytest.mark.parametrize("salience", ["cholesky", "inverse"])
@pytest.mark.parametrize("bits", [2, 3])
def test_beats_uniform_gptq_on_uneven_salience(bits, salience):
    w, x, h = _uneven_layer()
    slim = slim_quantize(w, h, x, SliMConfig(bits, group_size=32, salience=salience), name="l")
    gptq = gptq_quantize(w, h, GPTQConfig(bits, 32))
    assert slim.info["p"] > 0
    assert slim.dense.storage_bits()["codes"] == gptq.dense.storage_bits()["codes"]
    # measured here: SliM has about half of GPTQ's output error
    assert _out_err(w, slim.dequantize(), x) < 0.8 * _out_err(w, gptq.dequantize(), x)


def test_deterministic():
    w, x, h = _uneven_layer()
    a = slim_quantize(w, h, x, SliMConfig(2, group_size=32))
    b = slim_quantize(w, h, x, SliMConfig(2, group_size=32))
    assert a.info == b.info and torch.equal(a.dense.codes, b.dense.codes)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_non_pd_hessian_raises_naming_the_layer():
    w, x, _ = _uneven_layer(n_in=64)
    with pytest.raises(NumericalError, match="self_attn.o_proj"):
        slim_quantize(w, -torch.eye(64), x, SliMConfig(2, group_size=32), name="self_attn.o_proj")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=4), "bits=4"),
        (dict(bits=1), "bits=1"),
        (dict(bits=2, group_size=0), "group_size=0"),
        (dict(bits=2, salience="fisher"), "salience"),
        (dict(bits=2, sqc_range=(1.05, 1.2)), "sqc_range"),
        (dict(bits=2, sqc_grid=0), "sqc_grid"),
        (dict(bits=2, sqc_salient_frac=1.5), "sqc_salient_frac"),
        (dict(bits=2, sqc_salient_weight=0.5), "sqc_salient_weight"),
        (dict(bits=2, percdamp=2.0), "percdamp"),
        (dict(bits=2, blocksize=0), "blocksize"),
    ],
)
def test_invalid_configs(kwargs, match):
    with pytest.raises(InvalidConfig, match=match):
        SliMConfig(**kwargs)
