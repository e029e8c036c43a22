"""benchmarks/peers.py: the Pareto front it marks, and the peers' stored bits and grids on a tiny model."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers
from conftest import tiny_model
from sqllm.models import linear_names


def test_pareto_front_is_exactly_the_undominated_rows():
    rng = random.Random(0)
    rows = [{"label": str(i), "bits_per_weight": rng.choice([2.5, 3.0, 3.5, 4.0, 4.5]) + rng.choice([0, 1e-4]),
             "perplexity": rng.uniform(15, 60)} for i in range(40)]
    front = peers.pareto(rows)
    on_front = {r["label"] for r in front}
    for r in rows:
        # beaten: another row with lower perplexity at fewer bits, a bit map's 1e-4 bits counting as a tie
        beaten = any(o["perplexity"] < r["perplexity"] and round(o["bits_per_weight"], 1) <= r["bits_per_weight"]
                     for o in rows)
        assert (r["label"] in on_front) == (not beaten), r
    assert [r["bits_per_weight"] for r in front] == sorted(r["bits_per_weight"] for r in front)
    assert len({round(r["bits_per_weight"], 1) for r in front}) == len(front)


def _linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [model.get_submodule(n).get_parameter("weight").detach().clone() for n in linear_names(model)]


def _max_levels_per_group(w: torch.Tensor) -> int:
    """The most distinct values in any group of 64 consecutive inputs of ``w: [out, in]``."""
    return max(len(torch.unique(g)) for g in w.reshape(-1, peers.GROUP))


@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_hqq_counts_packed_codes_and_fp16_group_stats(nbits):
    pytest.importorskip("hqq")
    model = tiny_model("llama")
    before = _linear_weights(model)
    bits = peers.hqq_quantize(model, nbits)["bits_per_weight"]
    # per matrix of G groups: 2 and 4 bits pack exactly into bytes; 3 bits packs ten groups' codes into one
    # row of 64 int32 (the last row padded); plus an fp16 scale and zero per group
    groups = [w.numel() // peers.GROUP for w in before]
    code_bits = [g * peers.GROUP * nbits if nbits != 3 else -(-g // 10) * peers.GROUP * 32 for g in groups]
    expected = (sum(code_bits) + 2 * 16 * sum(groups)) / sum(w.numel() for w in before)
    assert bits == pytest.approx(expected, abs=1e-12)
    for w0, w in zip(before, _linear_weights(model)):
        assert w.shape == w0.shape and not torch.equal(w, w0)
        assert _max_levels_per_group(w) <= 2**nbits


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_counts_every_stored_state_tensor(double_quant):
    pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    weights = sum(w.numel() for w in _linear_weights(model))
    n_linears = len(linear_names(model))
    bits = peers.bnb_quantize(model, "nf4", double_quant)["bits_per_weight"]
    # codes and one fp32 absmax per block, or a uint8 absmax and an fp32 absmax per 256 blocks; per matrix
    # the 16-entry code (and the 256-entry second-level code), plus under 200 bytes of packed metadata
    per_block = 8 + 32 / 256 if double_quant else 32
    tables = 16 * 32 + (256 * 32 if double_quant else 0)
    floor = 4 + per_block / peers.GROUP + n_linears * tables / weights
    assert floor < bits < floor + n_linears * 200 * 8 / weights
    for w in _linear_weights(model):
        assert _max_levels_per_group(w) <= 16


def test_protocol_p_rows_skip_solver_studies_and_name_a_fisher_only_where_read(tmp_path, monkeypatch):
    import json

    def run(label: str, method: str, options: dict) -> dict:
        key = {"method": method, "options": options, "fisher": "fisher-P.safetensors", "eval_text": peers.EVAL_TEXT}
        stage = {"wall": 1.0, "cpu": 1.0}
        return {"key": json.dumps(key), "label": label, "method": method, "options": options,
                "window_nll": [3.0] * 40, "bits_per_weight": 3.0, "stages": {"fisher": None, "solve": stage},
                "loadavg_start": [1.0], "loadavg_end": [1.0], "commit": "abc"}

    runs = [run("SqueezeLLM 3-bit dense", "squeezellm", {"bits": 3}),
            run("SqueezeLLM 3-bit dense, heuristic k-means", "squeezellm", {"bits": 3, "kmeans": "heuristic@24bf6cf"}),
            run("SliM-LLM+ 2-bit g64", "slim+", {"bits": 2, "group_size": 64})]
    (tmp_path / "runs-P.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    monkeypatch.setattr(peers, "RESULTS", tmp_path)
    rows = peers.p_rows(40)
    assert sorted(rows) == ["sqllm SliM-LLM+ 2-bit g64", "sqllm SqueezeLLM 3-bit dense"]
    assert "fisher-P.safetensors" in rows["sqllm SqueezeLLM 3-bit dense"]["calibration"]
    assert "Fisher" not in rows["sqllm SliM-LLM+ 2-bit g64"]["calibration"]
