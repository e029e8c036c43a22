"""SqueezeLLM+: the output metric, both refinement steps against their closed forms, monotone descent
from the SqueezeLLM start, and exact dense-and-sparse."""

from __future__ import annotations

import pytest
import torch

from sqllm.codes import fp16_grid
from sqllm.config import SqueezeLLMPlusConfig
from sqllm.quant.gptq import hessian_inverse_factor
from sqllm.quant.kmeans import nearest_codes
from sqllm.quant.squeezellm import squeezellm_quantize
from sqllm.quant.squeezellm_plus import (
    OutputMetric,
    corr_inverse_factor,
    output_metric,
    refine_tables,
    row_objective,
    solve_tables,
    squeezellm_plus_quantize,
    sweep_codes,
)


def _layer(out: int = 24, n_in: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A heavy-tailed weight, a Fisher that grows with |w|, and the Hessian ``2/n X^T X`` of strongly
    correlated inputs (a few shared factors plus noise, channels of unequal scale)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((out, n_in)) * 0.02
    fisher = torch.rand(out, n_in, generator=gen) * (w.abs() + 0.01) * torch.rand(out, 1, generator=gen)
    factors = torch.randn(512, 4, generator=gen) @ torch.randn(4, n_in, generator=gen)
    x = (factors + 0.3 * torch.randn(512, n_in, generator=gen)) * torch.rand(n_in, generator=gen).add(0.2)
    return w, fisher, 2 * x.T @ x / 512


def _start(w, fisher, bits=3, **kw):
    qm = squeezellm_quantize(w, fisher, SqueezeLLMPlusConfig(bits, **kw))
    extracted = torch.zeros_like(w, dtype=torch.bool)
    if qm.sparse is not None:
        extracted[qm.sparse.rows, qm.sparse.cols] = True
    return qm, extracted


def test_metric_is_fisher_on_the_diagonal_and_input_correlation_off_it():
    w, fisher, h = _layer()
    m = output_metric(fisher, h, percdamp=0.0, fisher_damp=0.0)
    torch.testing.assert_close(m.scale**2, fisher, rtol=1e-5, atol=1e-12)
    d = torch.diagonal(h).sqrt()
    torch.testing.assert_close(m.corr, h / d[:, None] / d[None, :], rtol=1e-5, atol=1e-6)
    # L_r is e_r^T H_r e_r with H_r = S_r C S_r built explicitly.
    e = torch.randn_like(w)
    want = torch.stack([e[r].double() @ (torch.diag(m.scale[r]) @ m.corr @ torch.diag(m.scale[r])).double()
                        @ e[r].double() for r in range(w.shape[0])])
    torch.testing.assert_close(row_objective(e, torch.zeros_like(e), m), want, rtol=1e-6, atol=0)


def test_sweep_with_uncorrelated_inputs_is_nearest_rounding():
    # With C = I nothing is fed forward: every value goes to its nearest table entry.
    w, fisher, _ = _layer()
    qm, extracted = _start(w, fisher)
    m = OutputMetric(scale=fisher.sqrt() + 0.1, corr=torch.eye(w.shape[1]))
    u = hessian_inverse_factor(m.corr, 0.0)[0]
    assert torch.equal(sweep_codes(w, qm.dense.lut, extracted, m, u), nearest_codes(w, qm.dense.lut))


def test_sweep_matches_column_by_column_obs():
    # The lazy-batched sweep equals the plain OBS recursion of one row (GPTQ Algorithm 1 without blocks).
    w, fisher, h = _layer(out=3, n_in=150)  # more columns than one lazy block
    qm, extracted = _start(w, fisher)
    m = output_metric(fisher, h, 0.01, 0.01)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(m.corr.double()))
    u = torch.linalg.cholesky(hinv, upper=True)
    got = sweep_codes(w, qm.dense.lut, extracted, m, u.float())
    for r in range(3):
        v = (w[r] * m.scale[r]).double()
        lut = qm.dense.lut[r].double()
        for j in range(w.shape[1]):
            dist = (v[j] / m.scale[r, j] - lut).abs()
            q = int(got[r, j])
            assert dist[q] <= dist.min() + 1e-6  # nearest to the value the fed-back errors left (float32 sweep)
            err = (v[j] - lut[q] * m.scale[r, j]) / u[j, j]
            v[j:] -= err * u[j, j:]


def test_tables_solve_the_per_row_least_squares():
    w, fisher, h = _layer()
    qm, extracted = _start(w, fisher, sensitive_pct=1.0, outlier_pct=1.0)
    m = output_metric(fisher, h, 0.01, 0.01)
    lut = solve_tables(w, qm.dense.lut, qm.dense.codes, extracted, m)
    k = lut.shape[1]
    for r in range(w.shape[0]):
        keep = ~extracted[r]
        b = torch.zeros(w.shape[1], k, dtype=torch.float64)
        b[keep, qm.dense.codes[r, keep].long()] = m.scale[r, keep].double()
        t = (w[r] * m.scale[r] * keep).double()
        l_fac = torch.linalg.cholesky(m.corr.double())  # C = L L^T: minimise ||L^T (t - B c)||
        used = b.abs().sum(0) > 0
        want = torch.linalg.lstsq(l_fac.T @ b[:, used], l_fac.T @ t).solution
        # Compared on the objective: the problem is ill-conditioned (correlated inputs), and C B is
        # formed in float32, so the coefficients agree only to ~1e-4 where the objective agrees to 1e-7.
        ours = (l_fac.T @ (t - b[:, used] @ lut[r, used])).square().sum()
        best = (l_fac.T @ (t - b[:, used] @ want)).square().sum()
        assert ours <= best * (1 + 1e-6)


def test_tables_solved_a_few_rows_at_a_time_equal_the_whole_solve():
    w, fisher, h = _layer()
    qm, extracted = _start(w, fisher, sensitive_pct=1.0, outlier_pct=1.0)
    m = output_metric(fisher, h, 0.01, 0.01)
    whole = solve_tables(w, qm.dense.lut, qm.dense.codes, extracted, m)
    k, n_in = qm.dense.lut.shape[1], w.shape[1]
    for rows in (2, 5, w.shape[0] - 1):  # uneven chunks, the last one short
        chunked = solve_tables(w, qm.dense.lut, qm.dense.codes, extracted, m, chunk_elements=rows * k * n_in)
        # the same per-row problems; only the float32 product C B of a smaller batch may round otherwise
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6 * float(whole.abs().max()))


def test_tables_with_uncorrelated_inputs_are_fisher_weighted_means():
    w, fisher, _ = _layer()
    qm, extracted = _start(w, fisher)
    m = OutputMetric(scale=fisher.sqrt() + 0.01, corr=torch.eye(w.shape[1]))
    lut = solve_tables(w, qm.dense.lut, qm.dense.codes, extracted, m)
    s2 = m.scale.double() ** 2
    onehot = torch.nn.functional.one_hot(qm.dense.codes.long(), lut.shape[1]).double()
    means = (onehot * (s2 * w.double()).unsqueeze(2)).sum(1) / (onehot * s2.unsqueeze(2)).sum(1)
    used = onehot.sum(1) > 0
    torch.testing.assert_close(lut[used], means[used], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits, sensitive_pct, outlier_pct, mixed",
                         [(2, 0.0, 0.0, False), (3, 0.0, 0.0, False), (3, 0.5, 1.0, False), (4, 0.2, 0.3, False),
                          (3, 0.2, 0.3, True)])
def test_every_row_ends_at_or_below_its_squeezellm_start(bits, sensitive_pct, outlier_pct, mixed):
    w, fisher, h = _layer(out=48, n_in=128, seed=bits)
    cfg = SqueezeLLMPlusConfig(bits, sensitive_pct=sensitive_pct, outlier_pct=outlier_pct, iters=3, mixed=mixed)
    start = squeezellm_quantize(w, fisher, cfg)
    qm = squeezellm_plus_quantize(w, fisher, h, cfg)
    m = output_metric(fisher, h, cfg.percdamp, cfg.fisher_damp)
    before, after = row_objective(w, start.dequantize(), m), row_objective(w, qm.dequantize(), m)
    assert bool((after <= before).all())
    assert after.sum() < 0.8 * before.sum()  # correlated inputs leave a lot to gain
    assert qm.info["objective"] == pytest.approx(float(after.sum()), rel=1e-9)
    assert torch.equal(qm.dense.widths(), start.dense.widths())


def test_each_iteration_lowers_the_objective():
    w, fisher, h = _layer(seed=5)
    qm, extracted = _start(w, fisher)
    m = output_metric(fisher, h, 0.01, 0.01)
    lut, codes, last = qm.dense.lut, qm.dense.codes, None
    for _ in range(3):
        lut, codes, info = refine_tables(w, lut, codes, extracted, m, 1, corr_inverse_factor(m))
        assert info["objective"] <= info["objective_start"]
        assert last is None or info["objective_start"] == pytest.approx(last, rel=1e-12)
        last = info["objective"]
        assert torch.equal(lut, fp16_grid(lut)) and bool((lut.diff(dim=1) >= 0).all())


def test_dense_and_sparse_stays_exact():
    w, fisher, h = _layer(seed=2)
    cfg = SqueezeLLMPlusConfig(3, sensitive_pct=0.5, outlier_pct=1.0, iters=2)
    qm = squeezellm_plus_quantize(w, fisher, h, cfg)
    start = squeezellm_quantize(w, fisher, cfg)
    assert torch.equal(qm.sparse.rows, start.sparse.rows) and torch.equal(qm.sparse.cols, start.sparse.cols)
    recon = qm.dequantize()
    assert torch.equal(recon[qm.sparse.rows, qm.sparse.cols], w[qm.sparse.rows, qm.sparse.cols])
    assert torch.equal(qm.dense.lut, fp16_grid(qm.dense.lut))
