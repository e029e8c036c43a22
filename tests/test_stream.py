"""Streamed weights: parts read from safetensors shards, and the streamed Fisher against the whole model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_fisher_close, tiny_model
from sqllm.engine.fisher import compute_fisher, streamed_fisher_dict
from sqllm.engine.stream import (
    ActivationCache,
    InMemoryParts,
    StreamedModel,
    all_finite,
    check_device,
    first_block_inputs,
)
from sqllm.errors import CorruptCheckpoint, InvalidConfig
from sqllm.models import linear_names


def _windows(vocab: int = 256, n: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def _naive_fisher(model, names, windows) -> dict[str, torch.Tensor]:
    """sum over windows of grad**2, one plain whole-model backward per window with every parameter trainable."""
    total = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    for window in windows:
        model.zero_grad(set_to_none=True)
        model(input_ids=window[None], labels=window[None], use_cache=False).loss.backward()
        for n in names:
            total[n] += model.get_submodule(n).weight.grad ** 2
    model.zero_grad(set_to_none=True)
    return total


def _saved(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_fisher_equals_whole_model_fisher(family, tmp_path):
    model = tiny_model(family)
    names = linear_names(model)
    want = _naive_fisher(model, names, _windows())
    # Streamed from a sharded folder, block inputs spilled to disk (budget 0), blocks loaded one at a time.
    folder = _saved(model, tmp_path / "ckpt", max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    cache = ActivationCache(tmp_path / "acts", budget_bytes=0)
    streamed = streamed_fisher_dict(StreamedModel(folder), _windows(), cache=cache, batch_size=2, progress=False)
    in_memory = streamed_fisher_dict(InMemoryParts(model), _windows(), progress=False)
    assert list(streamed) == names
    for n in names:
        assert_fisher_close(streamed[n], want[n])
        assert torch.equal(streamed[n], in_memory[n])
    assert not any((tmp_path / "acts").iterdir())  # each block's spilled inputs are deleted once used
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_streamed_fisher_with_tied_head_matches_compute_fisher(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    names = linear_names(model)
    want = compute_fisher(model, names, _windows(128), progress=False)
    got = streamed_fisher_dict(StreamedModel(_saved(model, tmp_path / "tied")), _windows(128), progress=False)
    for n in names:
        assert_fisher_close(got[n], want[n])


def test_bf16_autocast_fisher_is_close_to_fp32():
    """The fast pass changes only rounding: its Fisher tracks the fp32 one closely, weight by weight."""
    model = tiny_model("llama")
    names = linear_names(model)
    fp32 = streamed_fisher_dict(InMemoryParts(model), _windows(), progress=False)
    bf16 = streamed_fisher_dict(InMemoryParts(model), _windows(), amp=torch.bfloat16, progress=False)
    whole = compute_fisher(model, names, _windows(), amp=torch.bfloat16, progress=False)
    for n in names:
        rel = (bf16[n] - fp32[n]).norm() / fp32[n].norm()
        assert rel < 0.05, (n, float(rel))
        torch.testing.assert_close(whole[n], bf16[n], rtol=0.05, atol=1e-9 * float(fp32[n].max()))


def test_streamed_parts_release_their_weights(tmp_path):
    model = tiny_model("llama")
    parts = StreamedModel(_saved(model, tmp_path / "ckpt"))
    assert all(p.is_meta for p in parts.model.parameters())
    hidden, _ = first_block_inputs(parts, _windows(), batch_size=2)
    assert hidden.shape == (3, 16, 64) and not hidden.is_meta
    with parts.loaded(parts.names_under((parts.block_name(1),))):
        block = parts.block(1)
        assert torch.equal(block.mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert all(p.is_meta for p in parts.model.parameters())


def test_missing_shard_or_tensor_is_one_corrupt_checkpoint_error(tmp_path):
    model = tiny_model("llama")
    folder = _saved(model, tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).rename(tmp_path / "away")
    with pytest.raises(CorruptCheckpoint, match=f"shard {shard} listed in model.safetensors.index.json is missing"):
        StreamedModel(folder)
    (tmp_path / "away").rename(folder / shard)
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpoint, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing from model"):
        StreamedModel(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_gpu_is_rejected():
    with pytest.raises(InvalidConfig, match="no CUDA GPU"):
        check_device("cuda")
    with pytest.raises(InvalidConfig, match="not a device"):
        check_device("gpu0")
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_perplexity_equals_whole_model_perplexity(family, tmp_path):
    from sqllm.eval.perplexity import perplexity, streamed_perplexity

    model = tiny_model(family)
    tokens = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(4))
    want = perplexity(model, tokens, seqlen=32, progress=False)
    got = streamed_perplexity(StreamedModel(_saved(model, tmp_path / "ckpt")), tokens, seqlen=32, progress=False)
    assert got["windows"] == want["windows"] == 3
    torch.testing.assert_close(torch.tensor(got["window_nll"]), torch.tensor(want["window_nll"]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite(dtype):
    for bad in (None, float("nan"), float("inf"), -float("inf")):
        t = torch.randn(7, 33).to(dtype)
        if bad is not None:
            t[3, 5] = bad
        assert all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)
    assert all_finite(torch.empty(0, 4, dtype=dtype))
