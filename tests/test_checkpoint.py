"""Packed checkpoints: every method round-trips through save and load, and damage is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from sqllm.api import load_quantized, quantize, save_quantized
from sqllm.errors import CorruptCheckpoint
from sqllm.nn import QuantLinear

METHODS = [
    ("rtn", dict(bits=3, group_size=32)),
    ("gptq", dict(bits=4, group_size=32)),
    ("slim", dict(bits=2, group_size=16)),
    ("squeezellm", dict(bits=3, sensitive_pct=0.5, outlier_pct=1.0)),
    ("squeezellm+", dict(bits=3, outlier_pct=1.0, iters=1)),
    ("squeezellm+", dict(bits=4, mixed=True, iters=1)),  # mixed-width LUT rows (2-bit rows of 64 inputs cost 3.1)
]


class _Tok:
    """Enough of a tokenizer for calibration on random ids and for save_pretrained."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
        class R:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])

        return R()

    def save_pretrained(self, path):
        pass


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 26, (4000,), generator=g)))
    return str(path)


def _quantized(family, method, options, calib_file):
    model = tiny_model(family)
    result = quantize(model, _Tok(), method, calib=calib_file, nsamples=4, calib_seqlen=32, progress=False,
                      **options)
    return model, result


@pytest.mark.parametrize("method, options", METHODS, ids=[m + "-mixed" * o.get("mixed", False) for m, o in METHODS])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_packed_model_equals_in_memory_model(tmp_path, family, method, options, calib_file):
    model, result = _quantized(family, method, options, calib_file)
    out = save_quantized(model, _Tok(), result, tmp_path / "ckpt")
    loaded, _ = load_quantized(out)
    # The matrices kept dense are stored in float16: the in-memory model with them rounded the same way
    # is what the checkpoint holds.
    assert result.dense16["dtype"] == "float16" and result.dense16["compute_dtype"] == "float32"
    assert result.dense16["tensors"]
    with torch.no_grad():
        for name in result.dense16["tensors"]:
            p = model.get_parameter(name)
            p.copy_(p.half().float())
            assert loaded.get_parameter(name).dtype == torch.float16
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    qlinears = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(qlinears) == sorted(result.matrices)
    for name, qm in result.matrices.items():  # the stored model is the in-memory model, bit for bit
        assert torch.equal(qlinears[name].dequantize_weight(), qm.dequantize())


def test_transformers_loads_packed_checkpoint(tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    model, result = _quantized("llama", "rtn", dict(bits=4, group_size=32), calib_file)
    out = save_quantized(model, _Tok(), result, tmp_path / "ckpt")
    with torch.no_grad():  # what the checkpoint stores (see test_packed_model_equals_in_memory_model)
        for name in result.dense16["tensors"]:
            model.get_parameter(name).copy_(model.get_parameter(name).half().float())
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, QuantLinear) for m in hf.modules())
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture
def checkpoint(tmp_path, calib_file):
    model, result = _quantized("llama", "squeezellm", dict(bits=3, outlier_pct=1.0), calib_file)
    return save_quantized(model, _Tok(), result, tmp_path / "ckpt")


def test_truncated_shard(checkpoint):
    shard = next(checkpoint.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="truncated or corrupt"):
        load_quantized(checkpoint)


def test_missing_tensor(checkpoint):
    from safetensors.torch import load_file, save_file

    shard = next(checkpoint.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.lut"]
    save_file(tensors, shard)
    with pytest.raises(CorruptCheckpoint, match="model.layers.1.mlp.up_proj.lut"):
        load_quantized(checkpoint)


def test_wrong_shape(checkpoint):
    from safetensors.torch import load_file, save_file

    shard = next(checkpoint.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.q_proj.lut"] = tensors["model.layers.0.self_attn.q_proj.lut"][:, :4].contiguous()
    save_file(tensors, shard)
    with pytest.raises(CorruptCheckpoint, match="model.layers.0.self_attn.q_proj.lut"):
        load_quantized(checkpoint)


def test_unknown_format_version(checkpoint):
    cfg_path = checkpoint / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpoint, match="format_version 99"):
        load_quantized(checkpoint)


def test_cli_reports_corrupt_checkpoint(checkpoint, capsys):
    from sqllm.cli import main

    (checkpoint / "model.safetensors.index.json").unlink()
    assert main(["eval", str(checkpoint), "--ppl", "wikitext2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sqllm: error:") and "index" in err[-1]


def test_loaded_tensors_own_aligned_memory(checkpoint):
    """Loading copies each tensor out of the shard's file mapping: the kernels read 64-byte-aligned,
    process-owned memory (safetensors' mapped tensors start at the header's odd offsets), and a later
    change to the files cannot reach a loaded model."""
    loaded, _ = load_quantized(checkpoint)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and all(t.data_ptr() % 64 == 0 for t in tensors if t.numel())
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = loaded(ids).logits
        for shard in Path(checkpoint).glob("*.safetensors"):
            shard.write_bytes(b"\0" * shard.stat().st_size)  # in place: the same inode
        assert torch.equal(loaded(ids).logits, before)


def test_packed_model_computes_in_the_dtype_asked(checkpoint):
    """``dtype=bfloat16``: norms, biases and the 16-bit matrices in bf16, packed tensors as stored, logits
    within bf16 round-off of the float32 load; None keeps the stored norms' dtype; other dtypes refused."""
    from sqllm.errors import InvalidConfig

    fp32, _ = load_quantized(checkpoint)
    bf16, _ = load_quantized(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32, torch.float16}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(fp32.named_modules(), bf16.named_modules()):
        if isinstance(a, QuantLinear):
            assert all(torch.equal(t, b.packed_tensors()[k]) for k, t in a.packed_tensors().items()), name
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = fp32(ids).logits, bf16(ids).logits
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref).norm() / ref.norm()) < 0.03
    with pytest.raises(InvalidConfig, match="computes in one of"):
        load_quantized(checkpoint, dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense16_head_decode_kernel_matches_tiles(dtype):
    """A 16-bit head in a float32 model: decode steps (the compiled kernel where loaded) and prefill (widened
    tiles) both give the widened weight's matmul to fp32 round-off; a gradient flows to x."""
    from sqllm.nn.dense16 import Dense16Linear, use_dense16

    model = torch.nn.Sequential(torch.nn.Linear(77, 1031, bias=False))
    model[0].weight.data = torch.randn(1031, 77, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert use_dense16(model, torch.float32) == ["0"] and isinstance(model[0], Dense16Linear)
    for tokens in (1, 8, 9, 40):
        x = torch.randn(1, tokens, 77, generator=torch.Generator().manual_seed(tokens))
        expected = x.double() @ model[0].weight.detach().double().T
        with torch.no_grad():
            got = model(x)
        assert got.dtype == torch.float32 and got.shape == (1, tokens, 1031)
        assert float((got.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    xg = x[:, :1].clone().requires_grad_()
    model(xg).sum().backward()
    torch.testing.assert_close(xg.grad[0, 0], model[0].weight.float().sum(0))


def test_dense16_dtype_takes_float16_only_where_every_value_fits():
    from sqllm.formats.checkpoint import dense16_dtype, store_dense_in_16_bits

    small, big = torch.randn(4, 4), torch.randn(4, 4) * 1e5
    assert dense16_dtype({"a": small}) == torch.float16
    assert dense16_dtype({"a": small, "b": big}) == torch.bfloat16
    assert dense16_dtype({"a": small.bfloat16()}) == torch.bfloat16  # a 16-bit source keeps its dtype
    assert dense16_dtype({"a": torch.tensor([[float("nan")]])}) == torch.bfloat16
    state = {"e": small.clone(), "n": torch.ones(4)}
    record = store_dense_in_16_bits(state, ["e"])
    assert record == {"dtype": "float16", "tensors": ["e"], "compute_dtype": "float32"}
    assert state["e"].dtype == torch.float16 and state["n"].dtype == torch.float32
    assert torch.equal(state["e"], small.half())
