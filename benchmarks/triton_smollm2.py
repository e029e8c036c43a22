"""Whole packed SmolLM2-135M forwards through the Triton kernels against the pure-torch ops (issue 15's
acceptance check), for SqueezeLLM 3-bit + 0.45% sparse, SliM-LLM 2-bit g64 and GPTQ 4-bit g64.

    python benchmarks/triton_smollm2.py            # CUDA if present, else CPU under Triton's interpreter

Each method quantizes SmolLM2 with a small calibration (the check is about the kernels, not quality),
every linear becomes a QuantLinear, and the logits of the first 1 and 16 tokens of the WikiText-2 test
text with ``SQLLM_KERNELS=triton`` are compared with ``SQLLM_KERNELS=0`` (relative Frobenius error,
limit 1e-3). Under the interpreter each Triton forward takes minutes (the interpreter runs the kernels
with numpy). Writes results/triton-smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqllm.api import quantize
from sqllm.data import eval_tokens
from sqllm.models import load_model, resolve_model_path
from sqllm.nn.qlinear import QuantLinear, replace_linear
from sqllm.report import git_commit, machine_info, markdown_table

SHARED = ROOT.parent / "shared" / "data"
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WIKI_VALID = SHARED / "wikitext-2" / "wiki.valid.tokens"
CALIB = dict(nsamples=4, calib_seqlen=128, seed=0)
METHODS = [
    ("SqueezeLLM 3-bit + 0.45% sparse", "squeezellm", dict(bits=3, sensitive_pct=0.05, outlier_pct=0.40)),
    ("SliM-LLM 2-bit g64", "slim", dict(bits=2, group_size=64, true_sequential=False)),
    ("GPTQ 4-bit g64", "gptq", dict(bits=4, group_size=64, true_sequential=False)),
]
TOKENS = (1, 16)
LIMIT = 1e-3


def packed_model(method: str, options: dict, device: str) -> torch.nn.Module:
    """SmolLM2 quantized with ``method`` and every quantized linear swapped for its QuantLinear."""
    model, tok = load_model("smollm2-135m")
    result = quantize(model, tok, method, calib=str(WIKI_VALID), progress=False, **CALIB, **options)
    for name, qm in result.matrices.items():
        linear = model.get_submodule(name)
        replace_linear(model, name, QuantLinear.from_matrix(qm, linear.bias, value_dtype=linear.weight.dtype))
    return model.to(device)


def logits(model: torch.nn.Module, ids: torch.Tensor, setting: str) -> tuple[torch.Tensor, float]:
    os.environ["SQLLM_KERNELS"] = setting
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids).logits.float()
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="triton-smollm2", help="result files results/OUT.{json,md}")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, on their first use
    load = os.getloadavg()
    from transformers import AutoTokenizer

    tokens = eval_tokens(AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m")), str(WIKI_TEST))
    rows = []
    for label, method, options in METHODS:
        start = time.perf_counter()
        model = packed_model(method, options, device)
        quantize_s = time.perf_counter() - start
        for m in TOKENS:
            ids = tokens[:, :m].to(device)
            ref, torch_s = logits(model, ids, "0")
            got, triton_s = logits(model, ids, "triton")
            rel = float((got - ref).norm() / ref.norm())
            rows.append(dict(model=label, tokens=m, rel_error=rel, max_abs_error=float((got - ref).abs().max()),
                             holds=rel < LIMIT, torch_seconds=torch_s, triton_seconds=triton_s,
                             quantize_seconds=quantize_s))
            print(rows[-1], flush=True)
    doc = dict(protocol=dict(calibration=f"{WIKI_VALID.name} {CALIB}", tokens=f"first {TOKENS} tokens of {WIKI_TEST.name}",
                             compare="logits with SQLLM_KERNELS=triton vs SQLLM_KERNELS=0, relative Frobenius error",
                             limit=LIMIT, device=device, interpreted=device == "cpu"),
               rows=rows, machine=machine_info(), commit=git_commit(str(ROOT)), load_average=load)
    results = ROOT / "benchmarks" / "results"
    (results / f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    where = "CPU, Triton interpreter" if device == "cpu" else torch.cuda.get_device_name()
    md = (f"# Packed SmolLM2-135M forwards: Triton kernels vs the torch ops ({where})\n\n"
          + markdown_table(["model", "tokens", "relative error", "max abs error", f"< {LIMIT:g}", "torch s", "Triton s"],
                           [[r["model"], r["tokens"], f"{r['rel_error']:.2e}", f"{r['max_abs_error']:.2e}",
                             "yes" if r["holds"] else "NO", f"{r['torch_seconds']:.2f}", f"{r['triton_seconds']:.1f}"]
                            for r in rows])
          + f"\n\nCalibration {doc['protocol']['calibration']} (small: this checks the kernels, not quality); "
          f"fp32 model. Machine: {doc['machine']['cpu']}, load average {load[0]:.2f} at the start. "
          f"Commit {doc['commit']}.\n")
    (results / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
