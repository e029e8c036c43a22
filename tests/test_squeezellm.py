"""SqueezeLLM solver: extraction counts, exact dense-and-sparse reconstruction, LUT invariants, config errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sqllm.codes import fp16_grid
from sqllm.config import SqueezeLLMConfig
from sqllm.errors import InvalidConfig
from sqllm.methods import LayerStats, get_method
from sqllm.nn import QuantLinear
from sqllm.quant.kmeans import weighted_kmeans, weighted_kmeans_objective
from sqllm.quant.squeezellm import (
    WIDTHS,
    allocate_row_bits,
    iqr_threshold,
    plan_row_bits,
    row_cost_bits,
    squeezellm_quantize,
)


def _matrix(out: int = 48, n_in: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A heavy-tailed weight with a few large outliers, and a Fisher-like sensitivity."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((out, n_in)) * 0.02
    fisher = torch.distributions.Gamma(0.5, 1.0).sample((out, n_in)) * (w.abs() + 0.01)
    return w, fisher


def _extracted(qm) -> torch.Tensor:
    mask = torch.zeros(qm.shape, dtype=torch.bool)
    if qm.sparse is not None:
        mask[qm.sparse.rows, qm.sparse.cols] = True
    return mask


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_codes_and_nearest_assignment(bits):
    w, fisher = _matrix()
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(bits))
    lut, codes = qm.dense.lut, qm.dense.codes
    assert lut.shape == (48, 2**bits) and codes.shape == w.shape and codes.dtype == torch.uint8
    assert torch.equal(lut, fp16_grid(lut))  # what an fp16 checkpoint stores
    assert bool((lut.diff(dim=1) >= 0).all()) and int(codes.max()) < 2**bits
    assert qm.sparse is None and qm.info["sensitive"] == 0 and qm.info["outliers"] == 0
    dist = (w[:, :, None] - lut[:, None, :]).abs()
    assert torch.equal(dist.gather(2, codes.long()[:, :, None]).squeeze(2), dist.min(dim=2).values)
    assert torch.equal(qm.dequantize(), torch.gather(lut, 1, codes.long()))


@pytest.mark.parametrize("sensitive_pct, outlier_pct", [(0.5, 0.0), (0.0, 2.0), (0.45, 1.3), (10.0, 10.0)])
def test_extraction_counts_and_exact_reconstruction(sensitive_pct, outlier_pct):
    w, fisher = _matrix()
    cfg = SqueezeLLMConfig(3, sensitive_pct=sensitive_pct, outlier_pct=outlier_pct)
    qm = squeezellm_quantize(w, fisher, cfg)
    total = w.numel()
    assert qm.info["sensitive"] == round(sensitive_pct / 100 * total)
    assert qm.info["outliers"] == round(outlier_pct / 100 * total)
    assert qm.info["sensitive_pct"] == pytest.approx(sensitive_pct, abs=100 / total)
    assert qm.sparse.nnz == qm.info["sensitive"] + qm.info["outliers"]
    extracted = _extracted(qm)
    # Sensitive = largest Fisher values; outliers = largest magnitudes among the rest.
    sensitive = torch.zeros(total, dtype=torch.bool)
    sensitive[fisher.flatten().argsort(descending=True)[: qm.info["sensitive"]]] = True
    sensitive = sensitive.view(w.shape)
    assert bool((extracted | ~sensitive).all())
    outliers = extracted & ~sensitive
    assert int(outliers.sum()) == qm.info["outliers"]
    if qm.info["outliers"]:
        assert w.abs()[outliers].min() >= w.abs()[~extracted].max()
    recon = qm.dequantize()
    assert torch.equal(recon[extracted], w[extracted])  # dense + sparse, bit for bit
    lut_value = torch.gather(qm.dense.lut, 1, qm.dense.codes.long())
    assert torch.equal(recon[~extracted], lut_value[~extracted])
    # Extracted values are parked on their row's LUT entry nearest 0.
    zero_code = qm.dense.lut.abs().argmin(dim=1, keepdim=True).expand_as(w)
    assert torch.equal(qm.dense.codes.long()[extracted], zero_code[extracted])


def test_sparse_part_is_sorted_coo():
    w, fisher = _matrix()
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(4, sensitive_pct=1.0, outlier_pct=1.0))
    key = qm.sparse.rows * w.shape[1] + qm.sparse.cols
    assert bool((key.diff() > 0).all())
    assert qm.sparse.values.dtype == torch.float32 and qm.sparse.shape == tuple(w.shape)


def test_tiny_sensitive_value_still_exact():
    # |w| far below the entry nearest 0 cannot be written as entry + float32 delta: that row's entry
    # nearest 0 must become exactly 0.
    w, fisher = _matrix()
    w[5, 7] = 3e-9
    fisher[5, 7] = 1e3  # the most sensitive value of the matrix
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(3, sensitive_pct=0.1))
    assert qm.info["zeroed_lut_rows"] >= 1
    assert 0.0 in qm.dense.lut[5].tolist() and bool((qm.dense.lut[5].diff() >= 0).all())
    assert qm.dequantize()[5, 7].item() == w[5, 7].item()
    extracted = _extracted(qm)
    assert torch.equal(qm.dequantize()[extracted], w[extracted])


def test_outlier_range_threshold():
    w, fisher = _matrix()
    r = 2.0
    q1, q3 = np.quantile(w.double().numpy(), [0.25, 0.75])
    threshold = iqr_threshold(w, r)
    assert threshold == pytest.approx(max(abs(q1 - r * (q3 - q1)), abs(q3 + r * (q3 - q1))), rel=1e-6)
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(3, sensitive_pct=0.2, outlier_range=r))
    sensitive = torch.zeros(w.numel(), dtype=torch.bool)
    sensitive[fisher.flatten().argsort(descending=True)[: qm.info["sensitive"]]] = True
    sensitive = sensitive.view(w.shape)
    outliers = (w.abs() >= threshold) & ~sensitive
    assert qm.info["outliers"] == int(outliers.sum()) > 0
    assert torch.equal(_extracted(qm), sensitive | outliers)


def test_fisher_weighting_lowers_weighted_error():
    w, fisher = _matrix(seed=1)
    fisher = fisher**3  # concentrated sensitivity
    cfg = SqueezeLLMConfig(3)
    err_weighted = (fisher * (squeezellm_quantize(w, fisher, cfg).dequantize() - w) ** 2).sum()
    err_plain = (fisher * (squeezellm_quantize(w, None, cfg).dequantize() - w) ** 2).sum()
    assert err_weighted < 0.8 * err_plain


@pytest.mark.parametrize("fisher_given", [True, False])
def test_dense_setting_is_the_weighted_kmeans_with_its_objective(fisher_given):
    w, fisher = _matrix(seed=2)
    fisher = fisher if fisher_given else None
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(3))
    lut, codes = weighted_kmeans(w, fisher, 8, fp16=True)
    assert torch.equal(qm.dense.lut, lut) and torch.equal(qm.dense.codes, codes) and qm.sparse is None
    assert qm.info["zeroed_lut_rows"] == 0 and qm.info["sensitive"] == qm.info["outliers"] == 0
    weight = None if fisher is None else fisher.double()
    want = weighted_kmeans_objective(w.double(), weight, lut.double(), codes).sum()
    assert qm.info["kmeans_objective"] == pytest.approx(float(want), rel=1e-12)


def test_dequantize_over_many_rows_is_the_table_lookup():
    w, fisher = _matrix(out=150, seed=4)  # more rows than dequantize takes at a time
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(3, mixed=True))
    lut, codes = qm.dense.lut, qm.dense.codes
    assert torch.equal(qm.dense.dequantize(), lut[torch.arange(150)[:, None], codes.long()])


def test_zero_fisher_rows_fall_back_to_unweighted():
    w, fisher = _matrix()
    fisher[3] = 0.0
    cfg = SqueezeLLMConfig(3)
    qm = squeezellm_quantize(w, fisher, cfg)
    lut, codes = weighted_kmeans(w[3:4], None, 8, fp16=True)
    assert torch.equal(qm.dense.lut[3:4], lut) and torch.equal(qm.dense.codes[3:4], codes)


def test_deterministic():
    w, fisher = _matrix()
    cfg = SqueezeLLMConfig(3, sensitive_pct=0.5, outlier_pct=0.5)
    a, b = squeezellm_quantize(w, fisher, cfg), squeezellm_quantize(w, fisher, cfg)
    assert torch.equal(a.dense.lut, b.dense.lut) and torch.equal(a.dense.codes, b.dense.codes)
    assert torch.equal(a.sparse.values, b.sparse.values) and a.info == b.info


def test_registry_solver_uses_fisher():
    w, fisher = _matrix()
    spec = get_method("squeezellm")
    cfg = SqueezeLLMConfig(3, sensitive_pct=0.5)
    qm = spec.solve(w, LayerStats("layer", fisher=fisher), cfg)
    assert torch.equal(qm.dense.lut, squeezellm_quantize(w, fisher, cfg).dense.lut)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), "bits=5"),
        (dict(bits=1), "bits=1"),
        (dict(bits=3, sensitive_pct=10.5), "sensitive_pct=10.5"),
        (dict(bits=3, sensitive_pct=-0.1), "sensitive_pct=-0.1"),
        (dict(bits=3, outlier_pct=11.0), "outlier_pct=11.0"),
        (dict(bits=3, outlier_range=-1.0), "outlier_range"),
        (dict(bits=3, outlier_pct=0.4, outlier_range=2.0), "either"),
    ],
)
def test_config_rejects_out_of_range(kwargs, message):
    with pytest.raises(InvalidConfig, match=message):
        SqueezeLLMConfig(**kwargs)


def test_bad_inputs():
    w, fisher = _matrix()
    with pytest.raises(InvalidConfig, match="needs Fisher"):
        squeezellm_quantize(w, None, SqueezeLLMConfig(3, sensitive_pct=0.1))
    with pytest.raises(InvalidConfig, match="Fisher shape"):
        squeezellm_quantize(w, fisher[:, :10], SqueezeLLMConfig(3))
    with pytest.raises(InvalidConfig, match=">= 0"):
        squeezellm_quantize(w, -fisher, SqueezeLLMConfig(3))
    w[0, 0] = float("nan")
    with pytest.raises(InvalidConfig, match="NaN"):
        squeezellm_quantize(w, fisher, SqueezeLLMConfig(3))


# Mixed-precision tables.


def _brute_force_allocation(errors: torch.Tensor, n_in: int, budget: float) -> float:
    """Least total error over every assignment of widths to the rows within the budget."""
    cost = row_cost_bits(n_in)
    best = float("inf")
    for choice in itertools.product(range(len(WIDTHS)), repeat=errors.shape[0]):
        idx = torch.tensor(choice)
        if float(cost[idx].sum()) <= budget * errors.shape[0] * n_in:
            best = min(best, float(errors.double().gather(1, idx[:, None]).sum()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_within_one_upgrade_of_the_best(seed):
    gen = torch.Generator().manual_seed(seed)
    n_in, out = 64, 6
    # Errors falling with width, not always convexly (a row may gain more from its second upgrade).
    drops = torch.rand(out, 3, generator=gen) * torch.rand(out, 1, generator=gen) * 10
    errors = drops.flip(1).cumsum(1).flip(1)
    cost = row_cost_bits(n_in)
    for budget in torch.linspace(float(cost[0]) / n_in, float(cost[-1]) / n_in, 7).tolist():
        widths = allocate_row_bits(errors, n_in, budget)
        idx = torch.searchsorted(torch.tensor(WIDTHS), widths)
        assert float(cost[idx].sum()) <= budget * out * n_in  # the budget holds
        ours = float(errors.double().gather(1, idx[:, None]).sum())
        largest_step = float((errors[:, :-1] - errors[:, 1:]).sum(1).max())
        assert ours <= _brute_force_allocation(errors, n_in, budget) + largest_step


def test_allocation_gives_wide_tables_to_the_rows_that_lose_most():
    errors = torch.tensor([[100.0, 30.0, 10.0], [1.0, 0.3, 0.1], [1.0, 0.3, 0.1], [50.0, 15.0, 5.0]])
    widths = allocate_row_bits(errors, 256, 3.0)
    assert widths[0] >= widths[3] >= widths[1] and widths[1] == widths[2]
    assert allocate_row_bits(errors, 256, 5.04).tolist() == [4, 4, 4, 4]  # 4-bit rows cost 4 + 264/256


def test_allocation_refuses_a_budget_below_two_bit_rows():
    with pytest.raises(InvalidConfig, match="below what 2-bit rows reach"):
        allocate_row_bits(torch.ones(4, 3), 64, 2.5)  # 2-bit rows cost 2 + (64 + 8) / 64 bits per weight


@pytest.mark.parametrize("sensitive_pct, outlier_pct", [(0.0, 0.0), (0.5, 1.0)])
def test_mixed_tables_meet_the_budget_and_beat_uniform_error(sensitive_pct, outlier_pct):
    w, fisher = _matrix(out=64, n_in=256, seed=3)
    fisher = fisher * torch.rand(64, 1, generator=torch.Generator().manual_seed(1)) ** 4  # rows differ in weight
    cfg = SqueezeLLMConfig(3, sensitive_pct=sensitive_pct, outlier_pct=outlier_pct, mixed=True)
    qm = squeezellm_quantize(w, fisher, cfg)
    dense = qm.dense
    assert set(dense.row_bits.tolist()) <= set(WIDTHS) and dense.is_mixed
    assert sum(dense.storage_bits().values()) <= 3.0 * w.numel()
    assert bool((dense.codes.long() < (1 << dense.row_bits)[:, None]).all())  # codes fit their row's width
    assert torch.equal(qm.dequantize()[_extracted(qm)], w[_extracted(qm)])
    uniform = squeezellm_quantize(w, fisher, SqueezeLLMConfig(3, sensitive_pct=sensitive_pct, outlier_pct=outlier_pct))
    err = lambda q: float((fisher * (q.dequantize() - w) ** 2).sum())
    assert err(qm) < err(uniform)  # with fewer bits: uniform 3-bit tables cost 3 + 128/256 bits per weight


def test_mixed_tables_pack_and_run():
    w, fisher = _matrix(out=40, n_in=96, seed=4)
    fisher = fisher * torch.rand(40, 1, generator=torch.Generator().manual_seed(2)) ** 4
    qm = squeezellm_quantize(w, fisher, SqueezeLLMConfig(4, outlier_pct=1.0, mixed=True))
    module = QuantLinear.from_matrix(qm)
    assert torch.equal(module.dequantize_weight(), qm.dequantize())
    assert module.bits_per_weight() == pytest.approx(qm.bits_per_weight(), abs=32 * 41 / w.numel())
    x = torch.randn(5, 96)
    torch.testing.assert_close(module(x), x @ qm.dequantize().T, rtol=1e-5, atol=1e-5)


def test_mixed_needs_a_budget_above_two_bits():
    with pytest.raises(InvalidConfig, match="below what 2-bit rows reach"):
        SqueezeLLMConfig(2, mixed=True)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "gptq", "--bits", "3", "--mixed"], "does not take ['mixed']"),
        (["--method", "squeezellm+", "--bits", "2", "--mixed"], "below what 2-bit rows reach"),
    ],
)
def test_cli_refuses_mixed_where_it_cannot_apply(capsys, tmp_path, argv, needle):
    from sqllm.cli import main

    code = main(["quantize", "no-model-needed", "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err


def test_mixed_budget_is_checked_against_every_linear_up_front():
    cfg = SqueezeLLMConfig(3, mixed=True)
    cfg.check_input_widths({"model.layers.0.mlp.down_proj": 1536, "model.layers.0.self_attn.q_proj": 576})
    with pytest.raises(InvalidConfig, match=r"below what 2-bit rows reach.*q_proj \(in=64\)"):
        cfg.check_input_widths({"model.layers.0.self_attn.q_proj": 64})  # 2 + 72/64 bits per weight > 3
    SqueezeLLMConfig(3).check_input_widths({"model.layers.0.self_attn.q_proj": 64})  # uniform: no budget


@pytest.mark.parametrize("seed", range(4))
def test_allocation_over_rows_of_several_lengths_is_within_one_upgrade_of_the_best(seed):
    """Rows of matrices with different input widths share one budget: it holds, and the result is within
    one upgrade of the brute-force optimum over all width choices."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([64, 64, 128, 128, 192, 64])
    drops = torch.rand(6, 3, generator=gen) * torch.rand(6, 1, generator=gen) * 10
    errors = drops.flip(1).cumsum(1).flip(1)
    cost = torch.stack([row_cost_bits(int(n)) for n in lengths])  # [rows, widths]
    total = int(lengths.sum())
    for budget in torch.linspace(float(cost[:, 0].sum()) / total, float(cost[:, -1].sum()) / total, 6,
                                 dtype=torch.float64).tolist():
        widths = allocate_row_bits(errors, lengths, budget)
        idx = torch.searchsorted(torch.tensor(WIDTHS), widths)
        assert float(cost.gather(1, idx[:, None]).sum()) <= budget * total
        ours = float(errors.double().gather(1, idx[:, None]).sum())
        best = min(
            float(errors.double().gather(1, torch.tensor(c)[:, None]).sum())
            for c in itertools.product(range(3), repeat=6)
            if float(cost.gather(1, torch.tensor(c)[:, None]).sum()) <= budget * total
        )
        assert ours <= best + float((errors[:, :-1] - errors[:, 1:]).sum(1).max())


def _two_layers(scale: float) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Two matrices of different widths; the second's Fisher is ``scale`` times larger (a sensitive layer)."""
    w1, f1 = _matrix(out=32, n_in=256, seed=11)
    w2, f2 = _matrix(out=48, n_in=384, seed=12)
    return [("a.weight", w1, f1), ("b.weight", w2, f2 * scale)]


def test_model_wide_plan_moves_bits_to_the_sensitive_layer_and_lowers_the_total_error():
    cfg = SqueezeLLMConfig(3, mixed=True)
    layers = _two_layers(100.0)
    plan = plan_row_bits(iter(layers), cfg)
    planned = {n: squeezellm_quantize(w, f, cfg, row_bits=plan[n]) for n, w, f in layers}
    alone = {n: squeezellm_quantize(w, f, cfg) for n, w, f in layers}  # each matrix spends its own budget
    bits = lambda qms: sum(sum(q.dense.storage_bits().values()) for q in qms.values())
    n_weights = sum(w.numel() for _, w, _ in layers)
    assert bits(planned) <= 3.0 * n_weights and bits(alone) <= 3.0 * n_weights
    mean_width = lambda q: float(q.dense.row_bits.double().mean())
    assert mean_width(planned["b.weight"]) > mean_width(alone["b.weight"])
    assert mean_width(planned["a.weight"]) < mean_width(alone["a.weight"])
    err = lambda qms: sum(float((f * (qms[n].dequantize() - w) ** 2).sum()) for n, w, f in layers)
    assert err(planned) < err(alone)


def test_a_plan_of_each_matrix_own_widths_reproduces_the_unplanned_result_exactly():
    """Rows are solved independently, so solving only each row's planned width gives the same tables
    and codes as solving every width and keeping that one."""
    cfg = SqueezeLLMConfig(3, sensitive_pct=0.5, outlier_pct=1.0, mixed=True)
    w, fisher = _two_layers(1.0)[1][1:]
    alone = squeezellm_quantize(w, fisher, cfg)
    again = squeezellm_quantize(w, fisher, cfg, row_bits=alone.dense.row_bits)
    assert torch.equal(again.dense.row_bits, alone.dense.row_bits)
    assert torch.equal(again.dense.codes, alone.dense.codes) and torch.equal(again.dense.lut, alone.dense.lut)
    assert torch.equal(again.dequantize(), alone.dequantize())
    with pytest.raises(ValueError, match="mixed tables off"):
        squeezellm_quantize(w, fisher, SqueezeLLMConfig(3), row_bits=alone.dense.row_bits)


def test_engine_solves_each_linear_at_the_widths_of_one_model_wide_plan():
    from conftest import tiny_model
    from sqllm.engine.loop import EngineOptions, quantize_blocks
    from sqllm.models import arch_spec, linear_names

    model = tiny_model("llama")
    names = linear_names(model)
    gen = torch.Generator().manual_seed(0)
    # block 1's Fisher 1000x block 0's: a model-wide budget gives block 1 the wide tables
    fisher = {n: torch.rand(model.get_submodule(n).weight.shape, generator=gen) * (1000.0 if ".1." in n else 1.0)
              for n in names}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    cfg = SqueezeLLMConfig(4, mixed=True)
    res = quantize_blocks(model, arch_spec(model), get_method("squeezellm"), cfg, fisher=fisher,
                          opts=EngineOptions(progress=False))
    plan = plan_row_bits(((n, weights[n], fisher[n]) for n in names), cfg)
    for n in names:
        assert torch.equal(res[n].dense.row_bits, plan[n]), n
        assert torch.equal(res[n].dequantize(), squeezellm_quantize(weights[n], fisher[n], cfg, plan[n]).dequantize())
    total_bits = sum(sum(q.dense.storage_bits().values()) for q in res.values())
    assert total_bits <= 4.0 * sum(w.numel() for w in weights.values())
    width = lambda block: float(torch.cat([res[n].dense.row_bits for n in names if f".{block}." in n]).double().mean())
    assert width(1) > width(0)
