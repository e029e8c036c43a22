"""Peers side by side: what a user would pick instead of sqllm, on the same SmolLM2 weights and protocol.

Each peer quantizes the same fp32 SmolLM2-135M (the dequantized bundled Q4_1 GGUF) and is evaluated with
sqllm's perplexity protocol (first ``--windows`` non-overlapping 2048-token windows of WikiText-2 test,
no BOS):

* HQQ (``hqq``): half-quadratic zero/scale optimization, data-free, 2/3/4 bits, group 64 along the input
  dimension (``axis=1``); the weights are dequantized back into the fp32 model for evaluation;
* bitsandbytes NF4 / FP4 (``bitsandbytes``' CPU backend), blocks of 64, with and without double-quantized
  statistics; dequantized the same way;
* AutoRound (``auto-round``): signed-gradient rounding and clipping, trained block by block;
* llama.cpp's quantizers (``llama-cpp-python``): Q3_K, Q4_K, IQ4_NL and Q4_0 with every linear in that one
  type (``pure``) and the token embedding left at Q8_0 (the bundled model's own), plus the Q3_K_M and Q4_K_M
  mixes users pick; evaluated by llama.cpp itself on the same token windows (see ``llamacpp.py``).

sqllm's rows are read from the cached runs of ``common.py`` (``results/runs.jsonl``), which hold per-window
NLLs: the table uses the same first windows for every row. Each row states its calibration.

    python benchmarks/peers.py [--windows 10] [--only hqq bnb llama.cpp autoround]
        # results/peers.{json,md,png}; each finished peer is cached in results/peers-runs.jsonl

Bits/weight count what each format stores for the quantized linears (codes in their packing, scales,
zeros, statistics); embeddings and the head are not counted for any row (sqllm keeps them in fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from common import RESULTS, ROOT, SEQLEN, WIKI_TEST, WIKI_VALID
from sqllm.api import evaluate_perplexity
from sqllm.models import linear_names, load_model
from sqllm.report import git_commit, machine_info, markdown_table

MODEL = "smollm2-135m"
RUNS = RESULTS / "peers-runs.jsonl"
GROUP = 64

# sqllm rows: (label in results/runs.jsonl, short label, calibration)
SQLLM_ROWS = [
    ("RTN 4-bit g64", "none"),
    ("RTN 3-bit g64", "none"),
    ("RTN 3-bit g128", "none"),
    ("GPTQ 4-bit g64", "WikiText-2 valid 32x512, true-sequential off"),
    ("GPTQ 3-bit g64", "WikiText-2 valid 32x512, true-sequential off"),
    ("GPTQ 2-bit g64", "WikiText-2 valid 32x512, true-sequential off"),
    ("SliM-LLM 3-bit g64", "WikiText-2 valid 32x512, true-sequential off"),
    ("SliM-LLM 2-bit g64", "WikiText-2 valid 32x512, true-sequential off"),
    ("SliM-LLM+ 2-bit g64", "WikiText-2 valid 32x512, true-sequential off, LWC on 16"),
    ("SqueezeLLM 4-bit dense-only", "Fisher of WikiText-2 valid 32x512"),
    ("SqueezeLLM 4-bit 0.45% sparse", "Fisher of WikiText-2 valid 32x512"),
    ("SqueezeLLM 3-bit dense-only", "Fisher of WikiText-2 valid 32x512"),
    ("SqueezeLLM 3-bit 0.05% sparse", "Fisher of WikiText-2 valid 32x512"),
    ("SqueezeLLM 3-bit 0.45% sparse", "Fisher of WikiText-2 valid 32x512"),
]


# --- peers that hand back a dequantized weight per linear ------------------------------------------------

def _apply_per_linear(model: torch.nn.Module, fn: Callable[[torch.Tensor], tuple[torch.Tensor, int]]) -> float:
    """Replace every quantized linear's weight by ``fn(w)[0]`` and return the bits/weight ``fn`` reports."""
    bits = weights = 0
    for name in linear_names(model):
        layer = model.get_submodule(name)
        w = layer.weight.data.float()
        deq, stored_bits = fn(w)
        layer.weight.data = deq.to(layer.weight.dtype)
        bits += stored_bits
        weights += w.numel()
    return bits / weights


def _tensor_bits(*tensors: torch.Tensor, float_bits: int | None = None) -> int:
    """Stored bits of tensors; floating tensors count ``float_bits`` each when given (their deployed dtype)."""
    total = 0
    for t in tensors:
        per = float_bits if (float_bits and t.is_floating_point()) else t.element_size() * 8
        total += t.numel() * per
    return total


def hqq_quantize(model: torch.nn.Module, nbits: int) -> dict[str, Any]:
    """HQQ on every linear: ``Quantizer.quantize`` with the half-quadratic optimizer, group 64 along the
    input dimension, then its own ``dequantize``. Bits: HQQ's packed codes plus fp16 scale and zero per group
    (its deployed compute dtype; here they are computed in fp32)."""
    from hqq.core.quantize import Quantizer

    def one(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        wq, meta = Quantizer.quantize(w, nbits=nbits, channel_wise=True, group_size=GROUP, optimize=True,
                                      round_zero=False, axis=1, bitpack=True, compute_dtype=torch.float32,
                                      device="cpu")
        deq = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
        return deq, _tensor_bits(wq) + _tensor_bits(meta["scale"], meta["zero"], float_bits=16)

    return {"bits_per_weight": _apply_per_linear(model, one), "calibration": "none (data-free)"}


def bnb_quantize(model: torch.nn.Module, quant_type: str, double_quant: bool) -> dict[str, Any]:
    """bitsandbytes 4-bit (``quantize_4bit`` / ``dequantize_4bit``, its CPU backend), blocks of 64 values
    of the row-major weight (= groups of 64 input columns here). Bits: packed codes plus the stored block
    statistics (fp32 absmax, or with double quantization uint8 absmax + its own fp32 scales and offset)."""
    import bitsandbytes.functional as bf

    def one(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        packed, state = bf.quantize_4bit(w, blocksize=GROUP, compress_statistics=double_quant, quant_type=quant_type)
        deq = bf.dequantize_4bit(packed, state).float()
        stats = [state.absmax]
        if state.nested:
            stats += [state.state2.absmax, state.offset]
        return deq, _tensor_bits(packed) + _tensor_bits(*stats)

    return {"bits_per_weight": _apply_per_linear(model, one), "calibration": "none (data-free)"}


def autoround_quantize(model: torch.nn.Module, tok: Any, bits: int, iters: int, nsamples: int,
                       seqlen: int) -> dict[str, Any]:
    """AutoRound on CPU with WikiText-2 validation text as its calibration set (the hub is unreachable);
    the tuned model is kept in fake-quantized form for evaluation. Bits: codes, fp16 scale and a ``bits``-wide
    zero per group of 64 (its asymmetric export)."""
    from auto_round import AutoRound

    text = WIKI_VALID.read_text(encoding="utf-8")
    step = len(text) // nsamples
    dataset = [text[i * step:(i + 1) * step] for i in range(nsamples)]
    ar = AutoRound(model, tok, bits=bits, group_size=GROUP, sym=False, iters=iters, nsamples=nsamples,
                   seqlen=seqlen, dataset=dataset, device_map="cpu", amp=False)
    ar.quantize()
    return {"bits_per_weight": bits + (16 + bits) / GROUP,
            "calibration": f"WikiText-2 valid {nsamples}x{seqlen}, {iters} iterations"}


# --- llama.cpp peers ----------------------------------------------------------------------------------------

# (label, llama.cpp file type, pure): pure = every linear in the file type's base type
LLAMA_PEERS = [
    ("llama.cpp Q3_K (pure)", "Q3_K_S", True),
    ("llama.cpp Q4_K (pure)", "Q4_K_S", True),
    ("llama.cpp IQ4_NL (pure)", "IQ4_NL", True),
    ("llama.cpp Q4_0 (pure)", "Q4_0", True),
    ("llama.cpp Q2_K (pure)", "Q2_K", True),
    ("llama.cpp Q3_K_M", "Q3_K_M", False),
    ("llama.cpp Q4_K_M", "Q4_K_M", False),
]


def _wiki_tokens() -> torch.Tensor:
    """WikiText-2 test as SmolLM2 token ids ``[1, T]`` (what llama.cpp is fed), tokenized once."""
    if not _TOKENS:
        from sqllm.data import eval_tokens

        _TOKENS.append(eval_tokens(load_model(MODEL)[1], str(WIKI_TEST)))
    return _TOKENS[0]


_TOKENS: list[torch.Tensor] = []


def llama_peer(ftype: str, pure: bool, windows: int, tokens: Callable[[], torch.Tensor]) -> dict[str, Any]:
    from llamacpp import gguf_bits, gguf_perplexity, quantize_gguf

    path, seconds = quantize_gguf(ftype, pure=pure, token_embd="Q8_0")
    bits = gguf_bits(path)
    ppl = gguf_perplexity(path, tokens(), windows)
    return {"bits_per_weight": bits["linears"], "file_bits_per_weight": bits["file"],
            "tensor_types": bits["tensor_types"], "quant_seconds": seconds, "window_nll": ppl["window_nll"],
            "calibration": "none (no importance matrix)", "engine": "llama.cpp"}


# --- runner -------------------------------------------------------------------------------------------------

def peers(windows: int, tokens: Callable[[], torch.Tensor]) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(label, family, run) of every peer; ``run`` returns bits/weight, calibration, window NLLs, seconds."""

    def hf(fn: Callable[..., dict[str, Any]], *args: Any, with_tok: bool = False) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            torch.manual_seed(0)
            model, tok = load_model(MODEL)
            t = time.perf_counter()
            info = fn(model, tok, *args) if with_tok else fn(model, *args)
            info["quant_seconds"] = time.perf_counter() - t
            res = evaluate_perplexity(model, tok, str(WIKI_TEST), seqlen=SEQLEN, windows=windows, progress=False)
            return {**info, "window_nll": res["window_nll"], "engine": "torch fp32 (dequantized weights)"}
        return go

    out: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    # most informative first: a run cut short keeps its finished rows in the cache
    out += [("HQQ 3-bit g64", "hqq", hf(hqq_quantize, 3)),
            ("bitsandbytes NF4 b64", "bnb", hf(bnb_quantize, "nf4", False)),
            ("HQQ 4-bit g64", "hqq", hf(hqq_quantize, 4)),
            ("HQQ 2-bit g64", "hqq", hf(hqq_quantize, 2)),
            ("bitsandbytes FP4 b64", "bnb", hf(bnb_quantize, "fp4", False)),
            ("bitsandbytes NF4 b64 double-quant", "bnb", hf(bnb_quantize, "nf4", True))]
    out += [(label, "llama.cpp", lambda f=ftype, p=pure: llama_peer(f, p, windows, tokens))
            for label, ftype, pure in LLAMA_PEERS]
    out += [("AutoRound 3-bit g64", "autoround", hf(autoround_quantize, 3, 200, 32, 512, with_tok=True))]
    return out


# AutoRound's cost on this machine: 200 signed-gradient iterations per block, each a forward and backward
# of one block (3.5M weights, ~8.3 MFLOP per token with attention) on a batch of 8 x 512 tokens, 30 blocks.
AUTOROUND_COST = ("not run by default: 200 iterations x 30 blocks x forward+backward of a block on 8 x 512 "
                  "tokens is about 6e14 FLOP, 2-3 hours of this 2-core CPU when idle (pass --only autoround)")


def why_not(family: str) -> str | None:
    """One line saying why a peer family cannot run here, or None."""
    import importlib.util

    module = {"hqq": "hqq", "bnb": "bitsandbytes", "llama.cpp": "llama_cpp", "autoround": "auto_round"}[family]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install it into the benchmark environment)"
    return None


def _cached() -> dict[str, dict[str, Any]]:
    if not RUNS.is_file():
        return {}
    rows = [json.loads(l) for l in RUNS.read_text().splitlines() if l.strip()]
    return {r["label"]: r for r in rows}


def sqllm_rows(windows: int) -> list[dict[str, Any]]:
    """sqllm's rows from results/runs.jsonl (``common.run``'s cache) with at least ``windows`` NLLs."""
    runs: dict[str, dict[str, Any]] = {}
    for line in (RESULTS / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        if len(r.get("window_nll", [])) >= windows:
            runs[r["label"]] = r
    rows = []
    for label, calibration in SQLLM_ROWS + [("fp32 (dequantized Q4_1 GGUF)", "-")]:
        r = runs.get(label)
        if r is None:
            rows.append({"label": f"sqllm {label}", "family": "sqllm", "error": f"no cached run with {windows} windows"})
            continue
        rows.append({"label": label if label.startswith("fp32") else f"sqllm {label}",
                     "family": "fp32" if label.startswith("fp32") else "sqllm",
                     "bits_per_weight": r["bits_per_weight"], "window_nll": r["window_nll"][:windows],
                     "quant_seconds": r["quant_seconds"], "calibration": calibration,
                     "engine": "torch fp32 (dequantized weights)", "source": "results/runs.jsonl"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="families to run: hqq bnb llama.cpp autoround")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = sqllm_rows(args.windows)
    cached = _cached()
    for label, family, go in peers(args.windows, _wiki_tokens):
        row = cached.get(label)
        if row is None or len(row.get("window_nll", [])) < args.windows:
            reason = why_not(family)
            if family == "autoround" and not (args.only and "autoround" in args.only):
                reason = reason or AUTOROUND_COST
            if reason is not None or (args.only and family not in args.only):
                rows.append({"label": label, "family": family, "error": reason or "not measured yet (excluded by --only)"})
                continue
            try:
                row = {"label": label, "family": family, **go(), "commit": git_commit(str(ROOT))}
            except Exception as exc:  # one line in the table says why this peer failed here
                row = {"label": label, "family": family, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                print(f"{label}: {row['error']}", flush=True)
                rows.append(row)
                continue
            with open(RUNS, "a") as f:
                f.write(json.dumps(row) + "\n")
        row = {**row, "window_nll": row["window_nll"][: args.windows]}
        rows.append(row)
        print(f"{label}: {row['bits_per_weight']:.3f} b/w, ppl {math.exp(sum(row['window_nll']) / args.windows):.2f}",
              flush=True)
    write(rows, args.windows)


def write(rows: list[dict[str, Any]], windows: int) -> None:
    for r in rows:
        if "window_nll" in r:
            r["perplexity"] = math.exp(sum(r["window_nll"]) / len(r["window_nll"]))
    machine = {**machine_info(), "loadavg": os.getloadavg()}
    doc = {"protocol": f"first {windows} windows of {SEQLEN} tokens of {WIKI_TEST.name}, GPTQ protocol, no BOS",
           "machine": machine, "commit": git_commit(str(ROOT)), "rows": rows}
    (RESULTS / "peers.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    ok = sorted((r for r in rows if "perplexity" in r), key=lambda r: (r["family"] != "fp32", r["bits_per_weight"]))
    table = markdown_table(
        ["method", "bits/weight (linears)", f"WikiText-2 ppl ({windows} windows)", "quantize s", "calibration",
         "evaluated with"],
        [[r["label"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.2f}",
          f"{r['quant_seconds']:.0f}" if r.get("quant_seconds") else "-", r["calibration"], r["engine"]] for r in ok])
    failed = [r for r in rows if "error" in r]
    lines = "\n".join(f"- {r['label']}: {r['error']}" for r in failed)
    md = (f"# Peers on SmolLM2-135M: perplexity against bits/weight\n\n{table}\n\n"
          + (f"Not run here:\n\n{lines}\n\n" if failed else "")
          + f"![Pareto chart](peers.png)\n\n"
          f"Protocol: {doc['protocol']}; every row scores the same windows. sqllm rows come from "
          f"`results/runs.jsonl` (the cached runs of ppl.py / squeezellm.py / slim.py, calibrated on WikiText-2 "
          f"validation with seed 0 as the calibration column says: not protocol P's 32x2048). llama.cpp rows are "
          f"scored by llama.cpp on the same token windows; the others run in torch fp32 with the dequantized "
          f"weights. Bits/weight count each format's stored codes, scales, zeros and statistics for the "
          f"quantized linears only. Quantize seconds are wall time on a shared machine (indicative).\n\n"
          f"Machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['loadavg'][0]:.1f} at the "
          f"end. Commit {doc['commit']}.\n")
    (RESULTS / "peers.md").write_text(md)
    plot(ok, windows)
    print(md)


def plot(rows: list[dict[str, Any]], windows: int) -> None:
    """Perplexity (log scale) against bits/weight, one marker per family, sqllm's Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"sqllm": ("o", "#1b7837"), "hqq": ("s", "#762a83"), "bnb": ("^", "#e08214"),
              "llama.cpp": ("D", "#2166ac"), "autoround": ("v", "#b2182b")}
    fig, ax = plt.subplots(figsize=(9, 6))
    fp = next((r for r in rows if r["family"] == "fp32"), None)
    if fp is not None:
        ax.axhline(fp["perplexity"], color="#999", ls="--", lw=1, label=f"fp32 ({fp['perplexity']:.2f})")
    for family, (marker, color) in styles.items():
        pts = [r for r in rows if r["family"] == family and r["perplexity"] < 1e4]
        if not pts:
            continue
        ax.scatter([r["bits_per_weight"] for r in pts], [r["perplexity"] for r in pts], marker=marker, color=color,
                   label=family, s=40, zorder=3)
        for r in pts:
            ax.annotate(r["label"].replace("sqllm ", "").replace("llama.cpp ", ""),
                        (r["bits_per_weight"], r["perplexity"]), fontsize=6.5, xytext=(4, 2),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits/weight of the quantized linears")
    ax.set_ylabel(f"WikiText-2 perplexity ({windows} windows of {SEQLEN}, log scale)")
    ax.set_title("SmolLM2-135M: sqllm and peers (lower left is better; rows above 10^4 omitted)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "peers.png", dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
