"""Shared fixtures: tiny random models of each supported family, and the real SmolLM2 (marked slow);
the Fisher tables' round-off check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "wikitext-2" / "wiki.valid.tokens"

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def assert_fisher_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Fisher tables equal to float32 round-off: the loss's gradient sums over the vocabulary with
    cancellation, so an entry's error scales with the table's largest entries, not with itself."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7 * want.abs().max().item())


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-block, hidden-64 random causal LM of ``family`` (llama, mistral, qwen2, opt)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "opt":
        cfg = tf.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            word_embed_proj_dim=64, max_position_embeddings=256,
        )
        model = tf.OPTForCausalLM(cfg)
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
        cfg = cls[0](**TINY, num_key_value_heads=2, max_position_embeddings=256)
        model = cls[1](cfg)
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "opt"]


@pytest.fixture(params=FAMILIES)
def tiny(request) -> torch.nn.Module:
    return tiny_model(request.param)


def _need(path: Path) -> Path:
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared beside the checkout")
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def wiki_test() -> Path:
    return _need(WIKI_TEST)


@pytest.fixture(scope="session")
def wiki_valid() -> Path:
    return _need(WIKI_VALID)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the cached full-precision SmolLM2 (converted from its GGUF once)."""
    from sqllm.models import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m")
    except Exception as exc:  # the optional package is not installed
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_tokens(smollm2_path, wiki_test):
    """The WikiText-2 test text tokenized once: [1, T]."""
    from transformers import AutoTokenizer

    from sqllm.data import eval_tokens

    return eval_tokens(AutoTokenizer.from_pretrained(smollm2_path), str(wiki_test))
