"""GPTQ on single matrices: error feedback beats round-to-nearest, reduces to it exactly when there is
nothing to feed back, and fails loudly on Hessians it cannot invert."""

from __future__ import annotations

import pytest
import torch

from sqllm.config import GPTQConfig, RTNConfig
from sqllm.errors import InvalidConfig, NumericalError
from sqllm.quant.gptq import gptq_quantize, hessian_error, hessian_inverse_factor, prepare_hessian
from sqllm.quant.rtn import rtn_quantize


def _layer(out=64, n_in=192, n_tok=384, seed=0):
    """Heavy-tailed weight ``[out, in]``, correlated inputs ``X = Z A: [n_tok, in]`` and ``H = 2/n X^T X``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(n_in, generator=g).pow(3).mul(4).add(0.2)
    x = torch.randn(n_tok, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) / n_in**0.5
    return w, x, 2 / n_tok * x.T @ x


def _out_err(w, q, x):
    return float(((w - q) @ x.T).norm())


def _assert_same_codes(a, b):
    assert torch.equal(a.dense.codes, b.dense.codes)
    assert torch.equal(a.dense.scales, b.dense.scales)
    assert torch.equal(a.dense.zeros, b.dense.zeros)


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_output_error_below_rtn(bits, group):
    w, x, h = _layer()
    gptq = gptq_quantize(w, h, GPTQConfig(bits, group), name="l")
    rtn = rtn_quantize(w, RTNConfig(bits, group))
    # here GPTQ removes ~10% (2 bits, heavy tails) to ~35% (4 bits) of RTN's output error
    assert _out_err(w, gptq.dequantize(), x) < 0.95 * _out_err(w, rtn.dequantize(), x)
    assert int(gptq.dense.codes.max()) <= 2**bits - 1


@pytest.mark.parametrize("group", [None, 64, 40])
@pytest.mark.parametrize("bits", [2, 4])
def test_identity_hessian_is_rtn_exactly(bits, group):
    # H = I: U = I, so no rounding error is fed to later columns and every grid is fitted on w itself
    w, _, _ = _layer()
    gptq = gptq_quantize(w, torch.eye(w.shape[1]), GPTQConfig(bits, group, percdamp=0.0))
    _assert_same_codes(gptq, rtn_quantize(w, RTNConfig(bits, group)))


@pytest.mark.parametrize("kwargs", [{}, {"percdamp": 0.0}, {"percdamp": 1.0}, {"act_order": True, "static_groups": True}])
@pytest.mark.parametrize("dead", [False, True])
def test_reported_error_is_the_error_of_the_returned_codes(kwargs, dead):
    # the sweep's O(out * in) identity against the direct tr(dW H dW^T) and the output error it stands for
    w, x, _ = _layer()
    if dead:
        x[:, [5, 70]] = 0
    h = 2 / x.shape[0] * x.T @ x
    qm = gptq_quantize(w, h, GPTQConfig(3, 64, **kwargs))
    direct = hessian_error(w, qm.dequantize(), h)
    assert qm.info["hessian_error"] == pytest.approx(direct, rel=1e-4)
    assert direct == pytest.approx(2 / x.shape[0] * _out_err(w, qm.dequantize(), x) ** 2, rel=1e-3)


@pytest.mark.parametrize("n", [5, 256, 300, 700])
def test_hessian_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(n):
    # against the definition, computed in float64: U upper with a positive diagonal and U^T U = (H + damp I)^-1
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    h = x.T @ x / n
    u, frac = hessian_inverse_factor(h.float(), 0.01)
    damped = h + frac * torch.diagonal(h).mean() * torch.eye(n, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert frac == 0.01 and torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    torch.testing.assert_close(u.double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


def test_partial_last_group():
    w, x, h = _layer(n_in=160)
    qm = gptq_quantize(w, h, GPTQConfig(3, 64))
    assert qm.dense.scales.shape == (64, 3) and qm.dense.group_size == 64
    assert qm.dense.storage_bits()["codes"] == 3 * 64 * 160
    assert _out_err(w, qm.dequantize(), x) < _out_err(w, rtn_quantize(w, RTNConfig(3, 64)).dequantize(), x)
    # with nothing fed back the partial group is RTN's too
    _assert_same_codes(gptq_quantize(w, torch.eye(160), GPTQConfig(3, 64, percdamp=0.0)),
                       rtn_quantize(w, RTNConfig(3, 64)))


@pytest.mark.parametrize("blocksize", [7, 48, 200])
def test_blocksize_only_defers_updates(blocksize):
    # lazy batching is exact in exact arithmetic: blocks smaller than, crossing, or larger than groups agree
    w, _, h = _layer()
    ref = gptq_quantize(w, h, GPTQConfig(3, 64, blocksize=128))
    qm = gptq_quantize(w, h, GPTQConfig(3, 64, blocksize=blocksize))
    assert float((qm.dense.codes != ref.dense.codes).float().mean()) < 0.01
    assert qm.info["hessian_error"] == pytest.approx(ref.info["hessian_error"], rel=1e-2)


@pytest.mark.parametrize("group", [None, 64])
def test_act_order_unpermutes(group):
    w, x, h = _layer()
    static = group is not None
    # a diagonal Hessian feeds nothing back, so whatever order the columns are visited in, the
    # un-permuted result must be RTN's exactly
    diag = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.1)
    cfg0 = GPTQConfig(3, group, percdamp=0.0, act_order=True, static_groups=static)
    _assert_same_codes(gptq_quantize(w, diag, cfg0), rtn_quantize(w, RTNConfig(3, group)))
    cfg = GPTQConfig(3, group, act_order=True, static_groups=static)
    ordered = gptq_quantize(w, h, cfg)
    rtn = rtn_quantize(w, RTNConfig(3, group))
    assert _out_err(w, ordered.dequantize(), x) < 0.9 * _out_err(w, rtn.dequantize(), x)


def test_static_groups_are_fitted_on_the_original_weight():
    w, x, h = _layer()
    qm = gptq_quantize(w, h, GPTQConfig(3, 64, static_groups=True))
    rtn = rtn_quantize(w, RTNConfig(3, 64))
    assert torch.equal(qm.dense.scales, rtn.dense.scales) and torch.equal(qm.dense.zeros, rtn.dense.zeros)
    assert _out_err(w, qm.dequantize(), x) < _out_err(w, rtn.dequantize(), x)


def test_dead_inputs_are_zeroed():
    w, x, _ = _layer()
    x[:, [3, 100]] = 0
    h = 2 / x.shape[0] * x.T @ x
    q = gptq_quantize(w, h, GPTQConfig(2, 64)).dequantize()
    assert bool((q[:, [3, 100]] == 0).all())
    assert torch.isfinite(q).all()


@pytest.mark.parametrize("kwargs", [{}, {"act_order": True, "static_groups": True}])
def test_a_prepared_hessian_serves_another_weight_of_the_same_input(kwargs):
    """What prepare_hessian keeps must not depend on the weight it was first used for: built with one
    weight (dead inputs and act-order included) and reused for another, it gives that weight's codes and
    reported error bit for bit as a fresh solve does (q/k/v and gate/up share one this way)."""
    w1, x, _ = _layer(seed=1)
    w2, _, _ = _layer(seed=2)
    x[:, [3, 100]] = 0
    h = 2 / x.shape[0] * x.T @ x
    cfg = GPTQConfig(3, 64, **kwargs)
    prepared = prepare_hessian(h, cfg.percdamp, cfg.act_order)
    gptq_quantize(w1, h, cfg, prepared=prepared)
    shared, fresh = gptq_quantize(w2, h, cfg, prepared=prepared), gptq_quantize(w2, h, cfg)
    _assert_same_codes(shared, fresh)
    assert shared.info == fresh.info
    assert bool((shared.dequantize()[:, [3, 100]] == 0).all())


def test_a_prepared_hessian_with_other_settings_is_refused():
    w, _, h = _layer()
    prepared = prepare_hessian(h, 0.3, act_order=False)
    with pytest.raises(ValueError, match="act_order=True"):
        gptq_quantize(w, h, GPTQConfig(3, 64, act_order=True, static_groups=True), prepared=prepared)
    with pytest.raises(ValueError, match="percdamp=0.01"):
        gptq_quantize(w, h, GPTQConfig(3, 64, percdamp=0.01), prepared=prepared)
    with pytest.raises(ValueError, match=r"\(96, 96\)"):
        gptq_quantize(w[:, :96], h[:96, :96], GPTQConfig(3, 32), prepared=prepared)


def test_singular_hessian_is_retried_with_more_damping():
    w, _, _ = _layer(n_in=64)
    # rank one with a nonzero diagonal: no dead input, but Cholesky fails without damping
    qm = gptq_quantize(w, torch.ones(64, 64), GPTQConfig(3, percdamp=0.0))
    assert qm.info["damp"] == pytest.approx(1e-2)
    assert torch.isfinite(qm.dequantize()).all()


def test_negative_definite_hessian_raises_naming_the_layer():
    w, _, _ = _layer(n_in=64)
    with pytest.raises(NumericalError, match=r"model\.layers\.3\.mlp\.down_proj.*damping 0\.01, 0\.1, 1, 10"):
        gptq_quantize(w, -torch.eye(64), GPTQConfig(3, percdamp=0.01), name="model.layers.3.mlp.down_proj")


def test_non_finite_hessian_raises():
    w, _, h = _layer()
    h[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="inf/NaN"):
        gptq_quantize(w, h, GPTQConfig(3), name="q_proj")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=1), "bits=1"),
        (dict(bits=9), "bits=9"),
        (dict(bits=3, group_size=0), "group_size=0"),
        (dict(bits=3, percdamp=-0.1), "percdamp"),
        (dict(bits=3, percdamp=1.5), "percdamp"),
        (dict(bits=3, blocksize=0), "blocksize"),
        (dict(bits=3, static_groups=True), "static_groups needs a group_size"),
        (dict(bits=3, group_size=64, act_order=True), "act_order with group_size needs static_groups"),
    ],
)
def test_invalid_configs(kwargs, match):
    with pytest.raises(InvalidConfig, match=match):
        GPTQConfig(**kwargs)


def test_valid_act_order_combinations():
    GPTQConfig(3, act_order=True)
    GPTQConfig(3, 64, act_order=True, static_groups=True)


def test_deterministic():
    w, _, h = _layer()
    cfg = GPTQConfig(2, 64, act_order=True, static_groups=True)
    _assert_same_codes(gptq_quantize(w, h, cfg), gptq_quantize(w, h, cfg))
