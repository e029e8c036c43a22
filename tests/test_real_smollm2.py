"""Perplexity bounds on the real SmolLM2-135M (2 windows of 2048 tokens of the WikiText-2 test text): the
real-model checks cheap enough for the default run (no calibration); tests/test_real_methods.py holds the
calibrated ones."""

from __future__ import annotations

import pytest

from sqllm.api import quantize
from sqllm.eval.perplexity import perplexity
from sqllm.models import load_model

pytestmark = pytest.mark.real
WINDOWS = 2


@pytest.fixture(scope="module")
def fp_ppl(smollm2_path, smollm2_tokens):
    model, _ = load_model(smollm2_path)
    return perplexity(model, smollm2_tokens, 2048, WINDOWS, progress=False)


def _rtn_ppl(path, tokens, bits, group):
    model, tok = load_model(path)
    quantize(model, tok, "rtn", bits=bits, group_size=group, progress=False)
    return perplexity(model, tokens, 2048, WINDOWS, progress=False)["perplexity"]


def test_full_precision_perplexity_is_sane(fp_ppl):
    # a 135M model on WikiText-2: well above a large model's ~5, far below a unigram model's ~1000
    assert 8 < fp_ppl["perplexity"] < 40
    assert fp_ppl["windows"] == WINDOWS and fp_ppl["tokens"] == WINDOWS * 2048


def test_rtn_4bit_g128_well_below_per_channel(smollm2_path, smollm2_tokens, fp_ppl):
    g128 = _rtn_ppl(smollm2_path, smollm2_tokens, 4, 128)
    per_channel = _rtn_ppl(smollm2_path, smollm2_tokens, 4, None)
    assert fp_ppl["perplexity"] < g128 < per_channel
    # group scales recover a clear share of what per-channel grids lose (measured: about half)
    assert per_channel - g128 > 0.25 * (per_channel - fp_ppl["perplexity"])
