"""sqllm checkpoints served by vLLM (CPU build): agreement with sqllm, and throughput against bf16.

    BENCH=1 bash scripts/vllm-check.sh        # the vLLM tests, then this with the default checkpoints
    <venv>/bin/python benchmarks/vllm_serving.py [--ckpt LABEL=DIR ...] [--out NAME]   # results/NAME.{json,md}

Run it in the venv scripts/vllm-check.sh makes, with the environment that script sets.
For every packed checkpoint:

* agreement, in float32: perplexity from vLLM's prompt log-probabilities over the first 2048-token
  window of WikiText-2 test against ``sqllm eval`` (sqllm's own model) on the same window, and greedy
  text from vLLM against ``sqllm generate`` for one prompt;
* throughput, in bfloat16 activations: generated tokens/s at batch 1 and batch 8 (128-token prompts,
  64 new tokens each, EOS ignored; one warm-up, then the best of ``REPEATS`` timed runs), next to the
  bf16 model (the full-precision SmolLM2 in bfloat16) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CKPT = Path(os.environ.get("SQLLM_CKPT_DIR", "/work/ckpt"))
CHECKPOINTS = {  # label -> folder made with `sqllm quantize smollm2-135m ...` (see the README)
    "SqueezeLLM 3-bit 0.45% sparse": CKPT / "sq3s",
    "SqueezeLLM 4-bit": CKPT / "sq4",
    "GPTQ 4-bit g64": CKPT / "gptq4g64",
    "SliM-LLM 2-bit g64": CKPT / "slim2g64",
}
SEQLEN = 2048
PROMPT = "The capital of France is"
GREEDY_TOKENS = 32
BATCHES = (1, 8)
PROMPT_TOKENS, NEW_TOKENS, REPEATS = 128, 64, 3
LLM_ARGS = dict(gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=SEQLEN + 16, seed=0)


def new_llm(path: str, dtype: str):
    from vllm import LLM

    return LLM(model=path, dtype=dtype, **LLM_ARGS)


def close(llm) -> None:
    from sqllm.serving.vllm_plugin import close_llm

    close_llm(llm)


def vllm_window_ppl(llm, window: list[int]) -> float:
    """exp(mean NLL) of tokens 1.. of ``window`` from vLLM's prompt log-probabilities."""
    from vllm import SamplingParams

    out = llm.generate({"prompt_token_ids": window}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    nll = -sum(out.prompt_logprobs[i][t].logprob for i, t in enumerate(window) if i > 0) / (len(window) - 1)
    return math.exp(nll)


def vllm_greedy(llm, prompt: str) -> str:
    from vllm import SamplingParams

    return llm.generate(prompt, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0))[0].outputs[0].text


def throughput(llm, vocab: int, batch: int) -> dict[str, float]:
    """Generated tokens/s for ``batch`` random prompts of PROMPT_TOKENS, NEW_TOKENS each (best of REPEATS)."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [{"prompt_token_ids": torch.randint(0, vocab, (PROMPT_TOKENS,), generator=g).tolist()}
               for _ in range(batch)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    best = math.inf
    for _ in range(REPEATS):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
        assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    return {"seconds": best, "tok_s": batch * NEW_TOKENS / best}


def sqllm_reference(path: str, window: list[int]) -> dict[str, Any]:
    """sqllm's own perplexity on the window and greedy text (what `sqllm eval` / `sqllm generate` print)."""
    from sqllm.api import generate, load_quantized
    from sqllm.eval.perplexity import perplexity

    model, tok = load_quantized(path)
    ppl = perplexity(model, torch.tensor([window]), seqlen=SEQLEN, windows=1, progress=False)["perplexity"]
    text = "".join(generate(model, tok, PROMPT, max_new_tokens=GREEDY_TOKENS))
    return {"ppl": ppl, "greedy": text}


def measure_speed(path: str, vocab: int) -> dict[str, Any]:
    llm = new_llm(path, "bfloat16")
    try:
        return {f"batch{b}": throughput(llm, vocab, b) for b in BATCHES}
    finally:
        close(llm)


def measure_checkpoint(label: str, path: str, window: list[int], vocab: int) -> dict[str, Any]:
    llm = new_llm(path, "float32")
    try:
        quantization = llm.llm_engine.model_config.quantization
        ppl, greedy = vllm_window_ppl(llm, window), vllm_greedy(llm, PROMPT)
    finally:
        close(llm)
    ref = sqllm_reference(path, window)
    qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    row = {
        "label": label, "path": path, "quantization": quantization,
        "bits_per_weight": qc["bits_per_weight"]["total"],
        "ppl_vllm": ppl, "ppl_sqllm": ref["ppl"], "ppl_rel_diff": ppl / ref["ppl"] - 1,
        "greedy_vllm": greedy, "greedy_sqllm": ref["greedy"], "greedy_agrees": greedy == ref["greedy"],
        **measure_speed(path, vocab),
    }
    print(json.dumps(row, default=str), flush=True)
    return row


def write(rows: list[dict[str, Any]], base: dict[str, Any], name: str, load_before: tuple) -> None:
    import vllm

    from sqllm.report import git_commit, machine_info, machine_line, markdown_table

    doc = {
        "protocol": {
            "agreement": f"float32; perplexity over the first {SEQLEN}-token window of {WIKI_TEST.name} from vLLM "
                         f"prompt logprobs vs sqllm's perplexity on the same window; greedy {GREEDY_TOKENS} tokens "
                         f"of {PROMPT!r} from vLLM vs sqllm generate",
            "throughput": f"bfloat16 activations; {PROMPT_TOKENS}-token random prompts, {NEW_TOKENS} new tokens each, "
                          f"batches {list(BATCHES)}; best of {REPEATS} after one warm-up; tokens/s = generated tokens "
                          "/ wall time of llm.generate (prefill included)",
            "vllm": f"vllm {vllm.__version__}, " + ", ".join(f"{k}={v}" for k, v in LLM_ARGS.items()),
            "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")},
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "machine": machine_info(), "commit": git_commit(str(ROOT)), "bf16": base, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    speed = markdown_table(
        ["model", "bits/weight (linears)", *(f"batch {b} tok/s" for b in BATCHES)],
        [["bf16", "16.000", *(f"{base[f'batch{b}']['tok_s']:.1f}" for b in BATCHES)]]
        + [[r["label"], f"{r['bits_per_weight']:.3f}", *(f"{r[f'batch{b}']['tok_s']:.1f}" for b in BATCHES)]
           for r in rows],
    )
    agree = markdown_table(
        ["checkpoint", "quantization", "ppl vLLM", "ppl sqllm", "difference", "greedy text agrees"],
        [[r["label"], r["quantization"], f"{r['ppl_vllm']:.3f}", f"{r['ppl_sqllm']:.3f}",
          f"{100 * r['ppl_rel_diff']:+.3f}%", "yes" if r["greedy_agrees"] else "no"] for r in rows],
    )
    m = doc["machine"]
    md = (f"# sqllm checkpoints in vLLM ({doc['protocol']['vllm']})\n\n"
          f"Agreement with sqllm ({doc['protocol']['agreement']}):\n\n{agree}\n\n"
          f"Throughput ({doc['protocol']['throughput']}):\n\n{speed}\n\n"
          f"Machine: {machine_line(m)}; load average {load_before[0]:.2f} before, "
          f"{doc['load_average']['after'][0]:.2f} after. Commit {doc['commit']}.\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", default=[], metavar="LABEL=DIR",
                    help="checkpoints to measure (default: the four of CHECKPOINTS)")
    ap.add_argument("--base", default="smollm2-135m", help="full-precision model served in bf16 as the baseline")
    ap.add_argument("--out", default="vllm", help="name of the result files under results/")
    args = ap.parse_args()
    checkpoints = dict(c.split("=", 1) for c in args.ckpt) or {k: str(v) for k, v in CHECKPOINTS.items()}
    missing = [p for p in checkpoints.values() if not (Path(p) / "config.json").is_file()]
    if missing:
        raise SystemExit(f"checkpoint folder {missing[0]} is missing; make it with `sqllm quantize` (see README)")
    from transformers import AutoTokenizer

    from sqllm.data import eval_tokens
    from sqllm.models import resolve_model_path

    load_before = os.getloadavg()
    base_path = resolve_model_path(args.base)
    tok = AutoTokenizer.from_pretrained(base_path)
    window = eval_tokens(tok, str(WIKI_TEST))[0, :SEQLEN].tolist()
    base = {"path": base_path, **measure_speed(base_path, len(tok))}
    print("bf16", json.dumps(base), flush=True)
    rows = [measure_checkpoint(label, path, window, len(tok)) for label, path in checkpoints.items()]
    write(rows, base, args.out, load_before)


if __name__ == "__main__":
    main()
