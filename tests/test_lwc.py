"""SliM-LLM+ learnable weight clipping: storable codes, exact fallbacks, and a training that helps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tqdm import tqdm

from conftest import tiny_model
from sqllm.codes import LUTCodes, QuantizedMatrix, UniformCodes, expand_groups, fp16_grid
from sqllm.config import SliMConfig, SliMPlusConfig
from sqllm.engine.loop import BlockInputs, EngineOptions, capture_first_block_inputs, quantize_blocks, run_block
from sqllm.engine.refine import lwc_block_stage, train_clipping
from sqllm.errors import InvalidConfig
from sqllm.methods import MethodSpec, get_method
from sqllm.models import arch_spec, get_blocks
from sqllm.quant.lwc import (
    LinearClip,
    binary_step,
    clipped_grid,
    export_codes,
    fake_quantize,
    init_clip,
)
from sqllm.quant.uniform import quantize_groups_minmax

GROUP = 16
# Bit map of the stand-in: mixed precision with binarized groups, cycled over the groups.
STANDIN_BITS = (1, 2, 3, 2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run fastest on one thread, and the shared test machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _binarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``w: [out, n]`` as ``mu +/- alpha`` (alpha = mean |w - mu|): codes, scale, zero."""
    mu = w.mean(dim=1, keepdim=True)
    alpha = (w - mu).abs().mean(dim=1, keepdim=True)
    scale = fp16_grid(2 * alpha)
    return (w >= mu).to(torch.uint8), scale, fp16_grid((alpha - mu) / scale)


def standin_codes(w: torch.Tensor, group_size: int = GROUP, bits: tuple[int, ...] = STANDIN_BITS) -> UniformCodes:
    """A SliM-LLM-shaped result without SliM: min-max groups at mixed bits and binarized 1-bit groups."""
    out, n_in = w.shape
    codes, scales, zeros, gbits = [], [], [], []
    for g, start in enumerate(range(0, n_in, group_size)):
        wg, b = w[:, start:start + group_size].float(), bits[g % len(bits)]
        if b == 1:
            c, s, z = _binarize(wg)
        else:
            u = quantize_groups_minmax(wg, b, None)
            c, s, z = u.codes, u.scales, u.zeros
        codes.append(c), scales.append(s), zeros.append(z), gbits.append(b)
    return UniformCodes(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1),
                        torch.tensor(gbits, dtype=torch.int64), group_size)


def _standin_method() -> MethodSpec:
    def solve(w, stats, cfg):
        return QuantizedMatrix(dense=standin_codes(w, cfg.group_size), rounded=w.float())

    return MethodSpec("slim-standin", SliMConfig, solve, "mixed min-max + binarized groups")


def _one_block_llama() -> torch.nn.Module:
    """The tiny llama cut to its first block: one block is all these tests need, and SliM is slow."""
    model = tiny_model("llama")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    return model


def _windows(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def _weight(out: int = 24, n_in: int = 72, seed: int = 0) -> torch.Tensor:
    """Random weights with a few outliers (which clipping is for); 72 columns leave a partial last group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.02
    w[torch.rand(out, n_in, generator=g) < 0.02] *= 8
    return w


def _binary_mask(codes: UniformCodes) -> torch.Tensor:
    return expand_groups(codes.group_bits == 1, codes.group_size, codes.codes.shape[1])


def test_initial_clipping_reproduces_the_given_codes_exactly():
    """At the initial logits the clipped grids are the given grids, bit for bit after float16 storage, the
    values round to the given codes, and the 1-bit groups keep their codes and levels."""
    w = _weight()
    ref = standin_codes(w)
    clip = init_clip(w, ref)
    got = export_codes(clip)
    multi = (ref.group_bits > 1)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales[:, multi], ref.scales[:, multi])
    assert torch.equal(got.zeros[:, multi], ref.zeros[:, multi])
    assert torch.equal(got.group_bits, ref.group_bits) and got.group_size == ref.group_size
    torch.testing.assert_close(got.dequantize(), ref.dequantize(), rtol=0, atol=2e-6)
    # Training works with the exact scale, storage with its float16 rounding (relative error 2**-11).
    torch.testing.assert_close(fake_quantize(clip), ref.dequantize(), rtol=1e-3, atol=1e-6)


def test_exported_codes_are_storable_and_on_the_clipped_grid():
    w = _weight(seed=1)
    ref = standin_codes(w)
    clip = init_clip(w, ref)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an arbitrary trained state: clipping between none and heavy
        for p in clip.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 6 - 1)
    got = export_codes(clip)
    maxq = expand_groups((2 ** got.group_bits - 1).expand_as(got.scales), GROUP, w.shape[1])
    assert got.codes.dtype == torch.uint8 and bool((got.codes.float() <= maxq).all())
    assert torch.equal(fp16_grid(got.scales), got.scales) and torch.equal(fp16_grid(got.zeros), got.zeros)
    multi = got.group_bits > 1
    z = got.zeros[:, multi]
    assert torch.equal(z, z.round()) and bool((z >= 0).all() and (z <= (2 ** got.group_bits[multi] - 1)).all())
    # Multi-bit groups: each weight lands within half a step of its value clipped to [lo, hi].
    scale, lo = clipped_grid(clip)
    hi = lo + scale * clip.maxq
    clipped = torch.minimum(torch.maximum(clip.w, lo), hi).reshape(w.shape[0], -1)[:, : w.shape[1]]
    err = (got.dequantize() - clipped).abs()
    half_step = expand_groups(got.scales, GROUP, w.shape[1]) / 2
    keep = ~_binary_mask(got).expand_as(err)
    assert bool((err[keep] <= half_step[keep] * (1 + 1e-3) + 1e-7).all())
    # 1-bit groups: SliM's codes, levels symmetric about SliM's midpoint at the learned distance.
    bin_groups = got.group_bits == 1
    assert torch.equal(got.codes[_binary_mask(got).expand_as(err)], ref.codes[_binary_mask(ref).expand_as(err)])
    mid_ref = ref.scales * (0.5 - ref.zeros)
    mid_got = got.scales * (0.5 - got.zeros)
    # Both zeros are float16: each moves its midpoint by up to 2**-11 of (|mid| + scale).
    tol = 2.0**-10 * (mid_ref.abs() + ref.scales + got.scales)
    assert bool(((mid_got - mid_ref).abs() <= tol)[:, bin_groups].all())
    torch.testing.assert_close(got.scales[:, bin_groups], binary_step(clip).squeeze(-1)[:, bin_groups],
                               rtol=1e-3, atol=0)


def test_exported_codes_pack_and_unpack_bit_for_bit():
    """The packer stores the learned codes (mixed widths, fractional 1-bit zeros, a partial group) exactly."""
    from sqllm.formats.layouts import matrix_meta, pack_matrix, unpack_matrix

    w = _weight(seed=3)
    clip = init_clip(w, standin_codes(w))
    with torch.no_grad():
        clip.up.fill_(1.5), clip.low.fill_(2.5), clip.alpha.fill_(0.7)
    qm = QuantizedMatrix(dense=export_codes(clip))
    back = unpack_matrix(pack_matrix(qm, "m.", torch.float32), "m.", matrix_meta(qm, torch.float32))
    assert torch.equal(back.dense.group_bits, qm.dense.group_bits)
    assert torch.equal(back.dequantize(), qm.dequantize())


def _block_setup(method: str | MethodSpec, cfg: SliMConfig, hook=None):
    model = _one_block_llama()
    spec = get_method(method) if isinstance(method, str) else method
    spec = replace(spec, block_stage=None if hook is None else (lambda c, o: hook))
    res = quantize_blocks(model, arch_spec(model), spec, cfg, windows=_windows(),
                          opts=EngineOptions(batch_size=4, progress=False))
    return model, res


def _block_mse(model: torch.nn.Module) -> float:
    """Output MSE of the model's (quantized) block 0 against the full-precision block on the test windows."""
    fp = _one_block_llama()
    arch = arch_spec(fp)
    inputs = capture_first_block_inputs(fp, arch, _windows(), 4)
    target = run_block(get_blocks(fp, arch)[0], inputs, 4)
    return torch.mean((run_block(get_blocks(model, arch)[0], inputs, 4) - target) ** 2).item()


def test_zero_epochs_equals_slim_exactly():
    cfg = SliMPlusConfig(bits=2, group_size=GROUP, lwc_epochs=0)
    plain_model, plain = _block_setup("slim", cfg)
    lwc_model, lwc = _block_setup("slim", cfg, lwc_block_stage(cfg, progress=False))
    assert list(plain) == list(lwc)
    for name in plain:
        a, b = plain[name].dense, lwc[name].dense
        for field in ("codes", "scales", "zeros", "group_bits"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
        assert torch.equal(plain_model.get_submodule(name).weight, lwc_model.get_submodule(name).weight)


def _check_chosen(model: torch.nn.Module, res: dict[str, QuantizedMatrix], slim: dict[str, QuantizedMatrix]) -> dict:
    """The block holds the kept result, which is the one with the lower recorded loss, on SliM's bit map."""
    info = next(iter(res.values())).info
    assert info["lwc_chosen"] == ("lwc" if info["lwc_loss_after"] < info["lwc_loss_slim"] else "slim")
    for name, qm in res.items():
        assert qm.info["lwc_chosen"] == info["lwc_chosen"]
        assert torch.equal(model.get_submodule(name).weight, qm.dequantize())
        assert torch.equal(qm.dense.group_bits, slim[name].dense.group_bits)
        assert torch.equal(fp16_grid(qm.dense.scales), qm.dense.scales)
    torch.testing.assert_close(_block_mse(model), min(info["lwc_loss_after"], info["lwc_loss_slim"]),
                               rtol=1e-4, atol=0)
    return info


def test_training_lowers_block_mse_on_real_slim():
    cfg = SliMPlusConfig(bits=2, group_size=GROUP, lwc_epochs=6, lwc_samples=4, lwc_lr=5e-2)
    _, slim = _block_setup("slim", cfg)
    model, res = _block_setup("slim", cfg, lwc_block_stage(cfg, progress=False))
    info = _check_chosen(model, res, slim)
    assert info["lwc_loss_after"] < info["lwc_loss_before"]
    assert info["lwc_loss_before"] == pytest.approx(info["lwc_loss_slim"], rel=1e-5)  # starts at SliM
    assert len(info["lwc_epoch_losses"]) == 6
    assert all(qm.rounded is None for qm in res.values())  # the by-product is dropped once used


def test_slim_rounded_values_round_to_slims_codes():
    """``QuantizedMatrix.rounded`` is what the GPTQ sweep rounded: its nearest codes are SliM's codes."""
    from sqllm.quant.gptq import nearest_codes

    cfg = SliMPlusConfig(bits=2, group_size=GROUP)
    _, res = _block_setup("slim", cfg)
    for qm in res.values():
        d = qm.dense
        assert qm.rounded is not None and qm.rounded.shape == d.codes.shape
        cols = d.codes.shape[1]
        s, z = (expand_groups(t, GROUP, cols) for t in (d.scales, d.zeros))
        maxq = expand_groups((2 ** d.group_bits - 1).float().expand_as(d.scales), GROUP, cols)
        again = torch.minimum(nearest_codes(qm.rounded, s, z, 255), maxq)
        assert (again != d.codes.float()).float().mean() < 1e-3  # ties may round either way
    _, plain = _block_setup("slim", SliMConfig(bits=2, group_size=GROUP))
    assert all(qm.rounded is None for qm in plain.values())  # only SliM-LLM+ keeps it


def test_training_on_mixed_bits_with_binarized_groups_is_kept_when_better():
    cfg = SliMPlusConfig(bits=2, group_size=GROUP, lwc_epochs=6, lwc_samples=4, lwc_lr=5e-2)
    standin = _standin_method()
    _, slim = _block_setup(standin, cfg)
    model, res = _block_setup(standin, cfg, lwc_block_stage(cfg, progress=False))
    info = _check_chosen(model, res, slim)
    # Training starts at the stand-in's plain min-max grids, which block-wise training improves on.
    assert info["lwc_chosen"] == "lwc"
    assert info["lwc_loss_after"] < info["lwc_loss_before"]
    assert info["lwc_loss_before"] == pytest.approx(info["lwc_loss_slim"], rel=1e-5)


def _clip_ranges(clip: LinearClip) -> None:
    up, low = torch.sigmoid(clip.up), torch.sigmoid(clip.low)
    assert bool(((up > 0) & (up <= 1) & (low > 0) & (low <= 1)).all())
    scale, lo = clipped_grid(clip)
    assert bool((lo <= 0).all())
    assert bool((up * clip.w_max >= low * clip.w_min).all())
    factor = binary_step(clip) / clip.bin_step.clamp(min=1e-30)
    assert bool(((factor > 0.5) & (factor < 1.5))[clip.bin_step.expand_as(factor) > 0].all())


def test_clipping_parameters_stay_in_range_under_aggressive_training():
    model = _one_block_llama()
    arch = arch_spec(model)
    block = get_blocks(model, arch)[0]
    inputs = capture_first_block_inputs(model, arch, _windows(), 4)
    target = run_block(block, inputs, 4)
    base = {k: v.detach() for k, v in block.named_parameters()}
    clips = {f"{n}.weight": init_clip(base[f"{n}.weight"], standin_codes(base[f"{n}.weight"])) for n in arch.linears}
    with torch.enable_grad():
        losses = train_clipping(block, base, clips, inputs.hidden, target, inputs.kwargs, epochs=3, lr=1.0,
                                batch_size=2, seed=0, bar=tqdm(disable=True))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    moved = sum(float((c.up.detach() - 4).abs().max()) for c in clips.values())
    assert moved > 1.0  # the lr really pushed the logits
    for c in clips.values():
        _clip_ranges(c)


def test_hook_rejects_lookup_table_codes():
    hook = lwc_block_stage(SliMPlusConfig(bits=2), progress=False)
    lut = QuantizedMatrix(dense=LUTCodes(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(2, 4), 2))
    with pytest.raises(InvalidConfig, match="model.layers.0.mlp.up_proj.*LUTCodes"):
        hook(torch.nn.Module(), 0, BlockInputs(torch.zeros(1, 1, 4)), torch.zeros(1, 1, 4),
             {"model.layers.0.mlp.up_proj": lut})


@pytest.mark.parametrize("field, value", [("lwc_lr", 0.0), ("lwc_lr", float("nan")), ("lwc_lr", -1.0),
                                          ("lwc_samples", 0), ("lwc_epochs", -1)])
def test_config_rejects_bad_training_settings(field, value):
    with pytest.raises(InvalidConfig, match=f"{field}={value}"):
        SliMPlusConfig(bits=2, **{field: value})
