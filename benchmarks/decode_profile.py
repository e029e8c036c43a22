"""Where a decoded token's time goes in SmolLM2-135M: the block linears, the head, and the rest of
transformers' forward and ``generate`` (norms, attention, rotary, KV cache, sampling loop).

Each model is timed three ways in one process, best of ``--rounds`` greedy generations of 32 tokens each:
whole; with the block linears stubbed (each returns zeros of its output shape without computing); with
the head stubbed too. The differences give the linears' and the head's share; what is left costs the
same whatever the weights are.

    python benchmarks/decode_profile.py --checkpoint DIR [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from common import MODEL, RESULTS, ROOT
from sqllm import api
from sqllm.nn import QuantLinear
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

TOKENS = 32


def ms_per_token(model: Any, rounds: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - t0)
    return best / TOKENS * 1e3


def stub(module: torch.nn.Module) -> None:
    """Make ``module`` return zeros of its output shape (no weight is read)."""
    out = module.out_features
    module.forward = lambda x: x.new_zeros(*x.shape[:-1], out)  # type: ignore[method-assign]


def profile(label: str, spec: str, dtype: torch.dtype | None, rounds: int) -> dict[str, Any]:
    model, _ = api.load_model(spec, dtype=dtype)
    whole = ms_per_token(model, rounds)
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, torch.nn.Linear)) and not name.endswith("lm_head"):
            stub(module)
    no_linears = ms_per_token(model, rounds)
    stub(model.get_output_embeddings())
    rest = ms_per_token(model, rounds)
    return {"label": label, "model": spec, "ms_per_token": whole, "block_linears_ms": whole - no_linears,
            "head_ms": no_linears - rest, "rest_ms": rest, "tokens_per_s": 1e3 / whole}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="packed SmolLM2 folder to profile beside bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="decode-profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [profile("bf16", MODEL, torch.bfloat16, args.rounds),
            profile("packed (fp32 activations)", args.checkpoint, None, args.rounds)]
    qc = json.loads(open(f"{args.checkpoint}/config.json").read())["quantization_config"]
    doc = {"protocol": {"tokens": TOKENS, "prompt": 8, "rounds": args.rounds, "threads": args.threads,
                        "checkpoint": args.checkpoint, "method": qc["method"],
                        "bits_per_weight": qc["bits_per_weight"]["total"]},
           "load_average": {"before": load_before, "after": os.getloadavg()}, "machine": machine_info(),
           "commit": git_commit(str(ROOT)), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown_table(
        ["model", "ms/token", "block linears ms", "head ms", "rest ms", "tokens/s"],
        [[r["label"], f"{r['ms_per_token']:.1f}", f"{r['block_linears_ms']:.1f}", f"{r['head_ms']:.1f}",
          f"{r['rest_ms']:.1f}", f"{r['tokens_per_s']:.1f}"] for r in rows])
    md = (f"# Decode time per token, SmolLM2-135M, by part\n\n{table}\n\n"
          f"Packed: {qc['method']} at {doc['protocol']['bits_per_weight']:.3f} bits/weight ({args.checkpoint}). "
          f"Greedy generation of {TOKENS} tokens after an 8-token prompt, best of {args.rounds}; parts by stubbing "
          f"the block linears, then the head (they return zeros without reading weights). 'rest' is transformers' "
          f"forward and generate loop without any linear.\n\n"
          f"Machine: {machine_line(doc['machine'])}, {args.threads} thread(s); load average "
          f"{load_before[0]:.2f} before, {doc['load_average']['after'][0]:.2f} after. Commit {doc['commit']}.\n")
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)
