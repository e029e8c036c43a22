"""The block loop on tiny models of every supported family."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from sqllm.codes import QuantizedMatrix
from sqllm.config import GPTQConfig, RTNConfig, SliMConfig
from sqllm.engine.loop import EngineOptions, _collect, capture_first_block_inputs, quantize_blocks, run_block
from sqllm.engine.stats import HessianAccumulator
from sqllm.methods import HESSIAN, INPUTS, LayerStats, MethodSpec, get_method
from sqllm.models import arch_spec, get_blocks, linear_names


class _Exact:
    """Dense codes that reproduce the weight exactly (an identity quantizer)."""

    def __init__(self, w):
        self.w = w.clone()
        self.shape = tuple(w.shape)

    def dequantize(self):
        return self.w


def _recording_identity(seen: dict):
    def solve(w, stats: LayerStats, cfg):
        seen[stats.name] = stats
        return QuantizedMatrix(dense=_Exact(w))

    return MethodSpec("identity", RTNConfig, solve, "test identity", layer_stats=(HESSIAN, INPUTS))


def _windows(n=4, L=16, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def test_identity_quantizer_leaves_logits_unchanged(tiny):
    windows = _windows()
    with torch.no_grad():
        before = tiny(windows).logits
    seen: dict = {}
    arch = arch_spec(tiny)
    res = quantize_blocks(tiny, arch, _recording_identity(seen), RTNConfig(4), windows=windows,
                          opts=EngineOptions(batch_size=3, progress=False))
    with torch.no_grad():
        after = tiny(windows).logits
    assert torch.equal(before, after)
    assert sorted(res) == sorted(linear_names(tiny)) == sorted(seen)
    assert all(s.hessian is not None and s.inputs is not None for s in seen.values())


def test_hessian_matches_direct_computation():
    model = tiny_model("llama")
    arch = arch_spec(model)
    windows = _windows(n=5, L=12)
    seen: dict = {}
    quantize_blocks(model, arch, _recording_identity(seen), RTNConfig(4), windows=windows,
                    opts=EngineOptions(batch_size=2, progress=False))
    # q_proj of block 0 sees input_layernorm(embeddings)
    block = get_blocks(model, arch)[0]
    with torch.no_grad():
        x = block.input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 64)
    expected = 2.0 / x.shape[0] * x.T @ x
    got = seen["model.layers.0.self_attn.q_proj"].hessian
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_linears_fed_one_tensor_share_their_hessian_but_not_their_input_sample(monkeypatch):
    """q/k/v (and gate/up) receive the same tensor: one Hessian product serves them all, and it equals
    the Hessian of the inputs each receives; the seeded input samples stay per linear."""
    model = tiny_model("llama")
    windows = _windows(n=5, L=12)
    seen: dict = {}
    updates = []
    update = HessianAccumulator.update
    monkeypatch.setattr(HessianAccumulator, "update", lambda acc, x: updates.append(1) or update(acc, x))
    quantize_blocks(model, arch_spec(model), _recording_identity(seen), RTNConfig(4), windows=windows,
                    opts=EngineOptions(batch_size=2, progress=False))
    n_blocks, n_batches = len(get_blocks(model, arch_spec(model))), 3  # 5 windows in batches of 2
    assert len(updates) == n_blocks * n_batches * 4  # the inputs of q, o, gate and down: 4 of 7 linears
    p = "model.layers.1."
    for a, b in [("self_attn.q_proj", "self_attn.k_proj"), ("self_attn.q_proj", "self_attn.v_proj"),
                 ("mlp.gate_proj", "mlp.up_proj")]:
        assert torch.equal(seen[p + a].hessian, seen[p + b].hessian)
    assert not torch.equal(seen[p + "self_attn.q_proj"].inputs, seen[p + "self_attn.k_proj"].inputs)
    block = get_blocks(model, arch_spec(model))[0]
    inputs = capture_first_block_inputs(model, arch_spec(model), windows, 8)
    captured: dict = {}
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: captured.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n in ("mlp.up_proj", "mlp.down_proj")]
    with torch.no_grad():
        block(inputs.hidden, **inputs.kwargs)
    for h in handles:
        h.remove()
    for name in ("mlp.up_proj", "mlp.down_proj"):
        x = torch.cat(captured[name])
        torch.testing.assert_close(seen["model.layers.0." + name].hessian, 2.0 / x.shape[0] * x.T @ x,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, cfg", [("gptq", GPTQConfig(3, 32)), ("slim", SliMConfig(2, group_size=32))])
def test_linears_of_one_input_share_one_prepared_hessian(monkeypatch, method, cfg):
    """GPTQ and SliM-LLM factor each input's Hessian once: on a LLaMA block four factorizations serve the
    seven linears (q/k/v and gate/up share theirs), and every code equals, bit for bit, a run where each
    linear prepares its own."""
    import sqllm.methods
    import sqllm.quant.gptq as gptq

    def run(share: bool) -> dict:
        if not share:  # the reference: a fresh preparation for every linear
            monkeypatch.setattr(sqllm.methods, "_prepared_hessian", lambda stats, percdamp, act_order:
                                gptq.prepare_hessian(stats.hessian, percdamp, act_order, stats.name))
        model = tiny_model("llama")
        return quantize_blocks(model, arch_spec(model), get_method(method), cfg, windows=_windows(n=5, L=12),
                               opts=EngineOptions(batch_size=2, progress=False))

    calls = []
    prepare = gptq.prepare_hessian
    monkeypatch.setattr(gptq, "prepare_hessian", lambda *a, **k: calls.append(1) or prepare(*a, **k))
    shared = run(share=True)
    n_blocks = len(get_blocks(tiny_model("llama"), arch_spec(tiny_model("llama"))))
    assert len(calls) == 4 * n_blocks
    separate = run(share=False)
    assert len(calls) == 4 * n_blocks + 7 * n_blocks
    assert sorted(shared) == sorted(separate)
    for name in shared:
        assert torch.equal(shared[name].dense.codes, separate[name].dense.codes), name
        assert torch.equal(shared[name].dense.scales, separate[name].dense.scales), name


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_statistics_forward_stops_after_the_group_and_matches_a_full_forward(family):
    """Each group's statistics forward ends once the group's linears have their inputs: the modules after
    them never run, and the Hessians equal, bit for bit, ones accumulated over a complete forward."""
    model = tiny_model(family)
    arch = arch_spec(model)
    windows = _windows(n=5, L=12)
    opts = EngineOptions(batch_size=2, progress=False)
    block = get_blocks(model, arch)[0]
    inputs = capture_first_block_inputs(model, arch, windows, 8)
    method = _recording_identity({})
    for i, group in enumerate(arch.sequential):
        ran: list[str] = []
        later = [n for g in arch.sequential[i + 1:] for n in g]
        probes = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n, ran=ran: ran.append(n)) for n in later]
        got = _collect(block, group, method, inputs, opts)
        for h in probes:
            h.remove()
        assert ran == []
        accs = {n: HessianAccumulator(block.get_submodule(n).in_features) for n in group}
        handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n, accs=accs: accs[n].update(a[0]))
                   for n in group]
        run_block(block, inputs, opts.batch_size)
        for h in handles:
            h.remove()
        for n in group:
            assert torch.equal(got[n].hessian, accs[n].result()), n


@pytest.mark.parametrize("n_in", [7, 576, 1100])
def test_hessian_accumulator_upper_blocks_mirror_to_the_full_product(n_in):
    """Only the upper block triangle is multiplied; the result equals the float64 product of all the
    batches to float32 round-off and is exactly symmetric off the diagonal blocks."""
    x = torch.randn(3, 200, n_in, generator=torch.Generator().manual_seed(n_in))
    acc = HessianAccumulator(n_in)
    acc.update(x[0])
    acc.update(x[1:])
    xx = x.reshape(-1, n_in).double()
    h = acc.result()
    torch.testing.assert_close(h.double(), 2.0 / xx.shape[0] * xx.T @ xx, rtol=1e-5, atol=1e-5)
    for a, b in zip(acc.edges[:-1], acc.edges[1:]):
        assert torch.equal(h[b:, a:b], h[a:b, b:].T)
    assert len(acc.edges) - 1 == -(-n_in // 512)


def test_second_block_sees_quantized_outputs():
    """Block 1's statistics are computed on block 0's outputs *after* block 0 was quantized."""
    model = tiny_model("llama")
    arch = arch_spec(model)
    windows = _windows(n=3, L=10)
    rtn = get_method("rtn")
    seen: dict = {}

    def solve(w, stats, cfg):
        seen[stats.name] = stats
        return rtn.solve(w, stats, cfg)

    spec = MethodSpec("rtn-rec", RTNConfig, solve, "", layer_stats=(HESSIAN,))
    quantize_blocks(model, arch, spec, RTNConfig(2), windows=windows, opts=EngineOptions(progress=False))
    inputs = capture_first_block_inputs(model, arch, windows, 8)
    with torch.no_grad():
        h = get_blocks(model, arch)[0](inputs.hidden, **inputs.kwargs)
        h = h[0] if isinstance(h, tuple) else h
        x = get_blocks(model, arch)[1].input_layernorm(h).reshape(-1, 64)
    torch.testing.assert_close(seen["model.layers.1.self_attn.q_proj"].hessian, 2.0 / x.shape[0] * x.T @ x,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rtn_through_engine_error_shrinks_with_bits(family):
    errs = []
    for bits in (2, 3, 4, 8):
        model = tiny_model(family)
        ref = {n: model.get_submodule(n).weight.detach().clone() for n in linear_names(model)}
        quantize_blocks(model, arch_spec(model), get_method("rtn"), RTNConfig(bits, 32),
                        opts=EngineOptions(progress=False))
        errs.append(sum(float((model.get_submodule(n).weight.detach() - w).pow(2).sum()) for n, w in ref.items()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 1000
