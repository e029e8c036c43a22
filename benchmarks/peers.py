"""Peers side by side: what a user would pick instead of sqllm, on the same SmolLM2 weights and protocol.

Every row quantizes the same fp32 SmolLM2-135M (the dequantized bundled Q4_1 GGUF) and is scored under protocol
P's evaluation: the first ``--windows`` (40) non-overlapping 2048-token windows of WikiText-2 test, no BOS.

Measured here (each finished run cached in ``results/peers-runs.jsonl``):

* HQQ (``hqq``): its ``BaseQuantizeConfig`` settings at 2/3/4 bits, group 64 along the input dimension,
  data-free; the weights are dequantized back into the fp32 model for evaluation;
* bitsandbytes NF4 / FP4 (its CPU backend), blocks of 64, NF4 also with double-quantized statistics;
* sqllm's RTN (data-free) where no other cache holds it at ``--windows`` windows;
* AutoRound (``auto-round``) only with ``--only autoround``: hours of this CPU.

Read from other benchmarks' caches (first source wins): SqueezeLLM / SqueezeLLM+ under protocol P
(``results/runs-P.jsonl``, the latest run of each setting), GPTQ / SliM-LLM / RTN under protocol P
(robustness.py's ``results/robustness-runs.jsonl``, or ``--robustness``), llama.cpp's Q4_0, Q4_K_M,
Q3_K_M and IQ4_NL made and scored by llamacpp.py (``results/llamacpp.json`` / ``llamacpp-ppl.jsonl``),
and fp32 plus the 2-bit rows from ``results/runs.jsonl`` (older 32 x 512 calibration, marked "not P").

    python benchmarks/peers.py [--windows 40] [--threads 1] [--only hqq bnb sqllm autoround]
        # results/peers.{json,md,png}

Bits/weight count what each format stores for the quantized linears (codes in their packing, scales,
zeros, second-level statistics); embeddings and the head are not counted for any row.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import (
    EVAL_TEXT,
    LF_FIX,
    RESULTS,
    ROOT,
    SEQLEN,
    WIKI_TEST,
    WIKI_VALID,
    jsonl_rows,
    keyed_options,
    scored_on_lf_text,
)
from sqllm.api import evaluate_perplexity, quantize
from sqllm.methods import METHODS
from sqllm.models import linear_names, load_model
from sqllm.report import git_commit, machine_info, markdown_table

MODEL = "smollm2-135m"
RUNS = RESULTS / "peers-runs.jsonl"
GROUP = 64

# --- peers that hand back a dequantized weight per linear ------------------------------------------------

def _apply_per_linear(model: torch.nn.Module, fn: Callable[[torch.Tensor], tuple[torch.Tensor, int]]) -> float:
    """Replace every quantized linear's weight ``[out, in]`` by ``fn(w)[0]`` (same shape) and return the
    bits/weight over all of them from the stored bits ``fn(w)[1]`` reports."""
    bits = weights = 0
    for name in linear_names(model):
        weight = model.get_submodule(name).get_parameter("weight")
        w = weight.data.float()
        deq, stored_bits = fn(w)
        weight.data = deq.to(weight.dtype)
        bits += stored_bits
        weights += w.numel()
    return bits / weights


def _tensor_bits(*tensors: torch.Tensor) -> int:
    """Stored bits of tensors in their own dtypes."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def hqq_quantize(model: torch.nn.Module, nbits: int) -> dict[str, Any]:
    """HQQ on every linear with the settings of its own ``BaseQuantizeConfig(nbits, group_size=64)``: the
    half-quadratic optimizer, groups of 64 along the input dimension (``axis=1``), zero rounded at 4 bits
    only; then its own ``dequantize``. Scale and zero are computed in fp32 and rounded to fp16, the dtype HQQ
    deploys them in, before dequantizing. Bits: HQQ's bit-packed codes as stored (3-bit packs ten codes per
    int32, so 3.2 bits per code) plus the fp16 scale and zero of each group."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=nbits, group_size=GROUP)["weight_quant_params"]

    def one(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        wq, meta = Quantizer.quantize(w, **params, bitpack=True, compute_dtype=torch.float32, device="cpu")
        scale, zero = meta["scale"].half(), meta["zero"].half()
        meta.update(scale=scale.float(), zero=zero.float())
        deq = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
        return deq, _tensor_bits(wq, scale, zero)

    return {"bits_per_weight": _apply_per_linear(model, one), "calibration": "none (data-free)"}


def bnb_quantize(model: torch.nn.Module, quant_type: str, double_quant: bool) -> dict[str, Any]:
    """bitsandbytes 4-bit (``quantize_4bit`` / ``dequantize_4bit``, its CPU backend), blocks of 64 values
    of the row-major weight (= groups of 64 input columns here). Bits: the packed codes plus every tensor of
    the quantization state as bitsandbytes serializes it (``as_dict(packed=True)``: fp32 absmax per block,
    or with double quantization uint8 absmax + fp32 absmax per 256 blocks and the 256-entry second-level
    code; the 16-entry code and the packed state metadata, per matrix)."""
    import bitsandbytes.functional as bf

    def one(w: torch.Tensor) -> tuple[torch.Tensor, int]:
        packed, state = bf.quantize_4bit(w, blocksize=GROUP, compress_statistics=double_quant, quant_type=quant_type)
        deq = bf.dequantize_4bit(packed, state).float()
        return deq, _tensor_bits(packed, *state.as_dict(packed=True).values())

    return {"bits_per_weight": _apply_per_linear(model, one), "calibration": "none (data-free)"}


def rtn_quantize(model: torch.nn.Module, tok: Any, bits: int, group_size: int) -> dict[str, Any]:
    """sqllm's RTN through the public API (data-free); bits/weight from its own storage accounting."""
    result = quantize(model, tok, "rtn", bits=bits, group_size=group_size, progress=False)
    return {"bits_per_weight": result.summary()["bits_per_weight"]["total"], "calibration": "none (data-free)"}


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


# --- rows made elsewhere -----------------------------------------------------------------------------------

# llama.cpp's rows: the file types a user picks with llama-quantize, quantized (no importance matrix) and
# scored on the same 40 token windows by llamacpp.py; label in results/llamacpp.json -> llama.cpp file type
LLAMA_TYPES = {"llama.cpp Q4_0": "Q4_0", "llama.cpp Q4_K_M": "Q4_K_M", "llama.cpp Q3_K_M": "Q3_K_M",
               "llama.cpp IQ4_NL": "IQ4_NL"}


def _wanted(windows: int, nll: list[float]) -> list[float] | None:
    """The first ``windows`` NLLs, or None when the run scored fewer."""
    return nll[:windows] if len(nll) >= windows else None


def llama_rows(windows: int) -> dict[str, dict[str, Any]]:
    """llama.cpp rows of results/llamacpp.json with their per-window NLLs from results/llamacpp-ppl.jsonl
    (the last cached run of each file with at least ``windows`` windows)."""
    doc_path = RESULTS / "llamacpp.json"
    if not doc_path.is_file():
        return {}
    nll_by_path: dict[str, list[float]] = {}
    for r in jsonl_rows(RESULTS / "llamacpp-ppl.jsonl"):
        nll = _wanted(windows, r["result"].get("window_nll", []))
        if nll is not None and r["key"].get("eval_text") == EVAL_TEXT:
            nll_by_path[r["key"]["path"]] = nll
    doc = json.loads(doc_path.read_text())
    rows = {}
    for r in doc["rows"]:
        if r["label"] in LLAMA_TYPES and r["path"] in nll_by_path:
            rows[r["label"]] = {
                "label": r["label"], "family": "llama.cpp", "bits_per_weight": r["linears"],
                "file_bits_per_weight": r["file"], "tensor_types": r["tensor_types"],
                "window_nll": nll_by_path[r["path"]], "quant_seconds": None,
                "calibration": "none (no importance matrix)", "engine": "llama.cpp",
                "source": "results/llamacpp.json + llamacpp-ppl.jsonl (llamacpp.py)", "commit": doc["commit"]}
    return rows


def llama_quantize_seconds(ftype: str) -> dict[str, Any]:
    """Time llama.cpp's quantizer (one thread) remaking, in a scratch folder, the file llamacpp.py scored
    (made earlier without a recorded time); ``same_bytes`` checks that the remade file is that file."""
    from llamacpp import gguf_dir, quantize_gguf

    with tempfile.TemporaryDirectory() as tmp:
        load_start = os.getloadavg()[0]
        path, seconds = quantize_gguf(ftype, threads=1, folder=Path(tmp))
        load_end = os.getloadavg()[0]
        same = filecmp.cmp(path, gguf_dir() / path.name, shallow=False)
    return {"quant_seconds": seconds, "loadavg": [load_start, load_end], "same_bytes": same}


def _p_calibration(fisher: str | None) -> str:
    # the Fisher file's metadata holds the requested --fisher-dtype ("auto"), not the one it resolved to,
    # so the row names the file rather than guess the pass's precision from its name
    return "P: WikiText-2 valid 32x2048" + (f", Fisher file {fisher}" if fisher else "")


def p_rows(windows: int) -> dict[str, dict[str, Any]]:
    """SqueezeLLM / SqueezeLLM+ rows under protocol P (results/runs-P.jsonl, squeezellm_plus.py). The file
    only grows, so the last run of a configuration is the one the current code made (an older mixed-table
    run used an allocation since replaced), whichever Fisher file it read. Quantize seconds are the run's
    stages; the Fisher pass itself was made once beforehand and read from its file."""
    latest: dict[str, dict[str, Any]] = {}
    for r in jsonl_rows(RESULTS / "runs-P.jsonl"):
        nll = _wanted(windows, r.get("window_nll", []))
        key = json.loads(r["key"])
        # rows with another k-means swapped in are a study of the solver, not something a user runs
        if nll is None or key.get("eval_text") != EVAL_TEXT or "kmeans" in r["options"]:
            continue
        fisher = key["fisher"] if METHODS[r["method"]].fisher else None
        label = f"sqllm {r['label']}"
        latest[label] = {
            "label": label, "family": "sqllm", "bits_per_weight": r["bits_per_weight"], "window_nll": nll,
            "quant_seconds": sum(st["wall"] for st in r["stages"].values() if st),
            "calibration": _p_calibration(fisher), "engine": "torch fp32 (dequantized weights)",
            "source": "results/runs-P.jsonl (squeezellm_plus.py)", "loadavg": [r["loadavg_start"][0], r["loadavg_end"][0]],
            "commit": r["commit"]}
    return latest


def robustness_rows(windows: int, path: Path) -> dict[str, dict[str, Any]]:
    """GPTQ / SliM-LLM / RTN rows under protocol P from robustness.py's cache (``final`` settings: library
    defaults, WikiText-2 calibration), WikiText-2 NLLs only."""
    rows = {}
    for r in jsonl_rows(path):
        st = r["setting"]
        p_calib = st["method"] == "rtn" or (st["calib"] == "wiki" and st["nsamples"] == 32
                                            and st["calib_seqlen"] == 2048 and st.get("fisher") is None)
        nll = _wanted(windows, r["window_nll"].get("WikiText-2", []))
        if json.loads(r["key"]).get("eval_text") != EVAL_TEXT:
            continue
        if st["method"] not in ("rtn", "gptq", "slim") or not p_calib or nll is None:
            continue
        # the library's present defaults only: a run with another damping than the method's default is a
        # variant, and one made at a default that has moved since is not the default any more
        plain = {k: v for k, v in st["options"].items() if k != "percdamp"}
        if json.loads(r["key"])["options"] != keyed_options(st["method"], plain):
            continue
        label = f"sqllm {st['label'].split(' percdamp')[0]}"
        rows[label] = {
            "label": label, "family": "sqllm", "bits_per_weight": r["bits_per_weight"], "window_nll": nll,
            "quant_seconds": r["quant_seconds"],
            "calibration": "none (data-free)" if st["method"] == "rtn" else "P: WikiText-2 valid 32x2048",
            "engine": "torch fp32 (dequantized weights)", "source": f"{path.name} (robustness.py)",
            "loadavg": r.get("loadavg"), "commit": r["commit"]}  # its earliest rows did not record the load
    return rows


# runs.jsonl rows (ppl.py / slim.py, 32 x 512 calibration, not P's) that nothing under P replaces yet
OLD_CALIB = "WikiText-2 valid 32x512 (not P), true-sequential off"
RUNS_ROWS = [
    ("fp32 (dequantized Q4_1 GGUF)", "-"),
    ("GPTQ 2-bit g64", OLD_CALIB),
    ("SliM-LLM 2-bit g64", OLD_CALIB),
    ("SliM-LLM+ 2-bit g64", OLD_CALIB + ", LWC on 16 windows"),
]


def runs_rows(windows: int) -> dict[str, dict[str, Any]]:
    """Rows of results/runs.jsonl (``common.run``'s cache) listed in ``RUNS_ROWS`` with ``windows`` NLLs."""
    calibration = dict(RUNS_ROWS)
    rows = {}
    for r in jsonl_rows(RESULTS / "runs.jsonl"):
        nll = _wanted(windows, r.get("window_nll", []))
        if r["label"] not in calibration or nll is None or not scored_on_lf_text(r):
            continue
        fp32 = r["method"] == "fp32"
        label = r["label"] if fp32 else f"sqllm {r['label']}"
        rows[label] = {
            "label": label, "family": "fp32" if fp32 else "sqllm", "bits_per_weight": r["bits_per_weight"],
            "window_nll": nll, "quant_seconds": None if fp32 else r["quant_seconds"],
            "calibration": calibration[r["label"]], "engine": "torch fp32 (dequantized weights)",
            "source": "results/runs.jsonl (common.py)", "commit": r["commit"]}
    return rows


# sqllm rows the table should hold; one missing at ``--windows`` gets a line saying so
SQLLM_WANTED = ["sqllm RTN 4-bit g64", "sqllm RTN 3-bit g64", "sqllm RTN 3-bit g128", "sqllm GPTQ 4-bit g64",
                "sqllm GPTQ 3-bit g64", "sqllm SliM-LLM 3-bit g64"]


# --- runner -------------------------------------------------------------------------------------------------

def peers(windows: int) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(label, family, run) of every row peers.py measures itself; ``run`` returns bits/weight,
    calibration, window NLLs, seconds and the load average around it."""

    def hf(fn: Callable[..., dict[str, Any]], *args: Any, with_tok: bool = False) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            torch.manual_seed(0)
            model, tok = load_model(MODEL)
            load_start = os.getloadavg()[0]
            t = time.perf_counter()
            info = fn(model, tok, *args) if with_tok else fn(model, *args)
            info["quant_seconds"] = time.perf_counter() - t
            res = evaluate_perplexity(model, tok, str(WIKI_TEST), seqlen=SEQLEN, windows=windows, progress=False)
            return {**info, "window_nll": res["window_nll"], "engine": "torch fp32 (dequantized weights)",
                    "loadavg": [load_start, os.getloadavg()[0]]}
        return go

    # most informative first: a run cut short keeps its finished rows in the cache
    return [("HQQ 3-bit g64", "hqq", hf(hqq_quantize, 3)),
            ("bitsandbytes NF4 b64", "bnb", hf(bnb_quantize, "nf4", False)),
            ("HQQ 4-bit g64", "hqq", hf(hqq_quantize, 4)),
            ("sqllm RTN 4-bit g64", "sqllm", hf(rtn_quantize, 4, 64, with_tok=True)),
            ("bitsandbytes FP4 b64", "bnb", hf(bnb_quantize, "fp4", False)),
            ("HQQ 2-bit g64", "hqq", hf(hqq_quantize, 2)),
            ("bitsandbytes NF4 b64 double-quant", "bnb", hf(bnb_quantize, "nf4", True)),
            ("sqllm RTN 3-bit g64", "sqllm", hf(rtn_quantize, 3, 64, with_tok=True)),
            ("sqllm RTN 3-bit g128", "sqllm", hf(rtn_quantize, 3, 128, with_tok=True)),
            ("AutoRound 3-bit g64", "autoround", hf(autoround_quantize, 3, 200, 32, 512, with_tok=True))]


# AutoRound's cost on this machine: 200 signed-gradient iterations per block, each a forward and backward
# of one block (3.5M weights, ~8.3 MFLOP per token with attention) on a batch of 8 x 512 tokens, 30 blocks.
AUTOROUND_COST = ("not run: 200 iterations x 30 blocks x forward+backward of a block on 8 x 512 tokens is "
                  "about 6e14 FLOP, 2-3 hours of this shared 2-core CPU when idle (--only autoround runs it)")


def why_not(family: str) -> str | None:
    """One line saying why a peer family cannot run here, or None."""
    import importlib.util

    module = {"hqq": "hqq", "bnb": "bitsandbytes", "sqllm": "sqllm", "autoround": "auto_round"}[family]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install it into the benchmark environment)"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--only", nargs="*", help="families to run: hqq bnb sqllm llama.cpp (its quantizer's time) autoround "
                                           "(default: all but autoround)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--robustness", type=Path, default=RESULTS / "robustness-runs.jsonl",
                    help="robustness.py's run cache holding the GPTQ / SliM-LLM / RTN rows under protocol P")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # first source wins: protocol P's runs, then robustness.py's, then llama.cpp's, then the older runs.jsonl
    made: dict[str, dict[str, Any]] = {}
    for source in (p_rows(args.windows), robustness_rows(args.windows, args.robustness), llama_rows(args.windows),
                   runs_rows(args.windows)):
        made = {**source, **made}
    # quantizer timings (no window_nll) do not depend on the evaluation text; scored runs must have read it
    # with LF line ends
    cached = {r["label"]: r for r in jsonl_rows(RUNS) if "window_nll" not in r or scored_on_lf_text(r)}
    for label, ftype in LLAMA_TYPES.items():
        timing = cached.get(label)
        if label in made and timing is None and (not args.only or "llama.cpp" in args.only):
            timing = {"label": label, "family": "llama.cpp", **llama_quantize_seconds(ftype)}
            with open(RUNS, "a") as f:
                f.write(json.dumps(timing) + "\n")
        if label in made and timing is not None:
            made[label].update(quant_seconds=timing["quant_seconds"], loadavg=timing["loadavg"],
                               quantizer_remade_same_bytes=timing["same_bytes"])
    rows = list(made.values())
    rows += [{"label": label, "family": "llama.cpp",
              "error": f"no llamacpp.py run scored on the test text read with LF line ends (its runs before {LF_FIX} "
                       f"kept wiki.test.raw's \\r); rerun benchmarks/llamacpp.py, which needs llama-cpp-python"}
             for label in LLAMA_TYPES if label not in made]
    for label, family, go in peers(args.windows):
        if label in made:
            continue
        row = cached.get(label)
        if row is None or len(row.get("window_nll", [])) < args.windows:
            reason = why_not(family)
            if family == "autoround" and not (args.only and "autoround" in args.only):
                reason = AUTOROUND_COST + ("" if reason is None else f"; besides, {reason}")
            if reason is not None or (args.only and family not in args.only):
                rows.append({"label": label, "family": family,
                             "error": reason or f"not measured yet: no cached {args.windows}-window run (one takes "
                                                f"15-20 min of this shared 2-core CPU; --only {family} runs it)"})
                continue
            try:
                row = {"label": label, "family": family, **go(), "source": f"{RUNS.name} (peers.py)",
                       "commit": git_commit(str(ROOT))}
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
    have = {r["label"] for r in rows}
    rows += [{"label": label, "family": "sqllm", "error": f"no {args.windows}-window run in runs-P.jsonl, "
                                                          f"{args.robustness.name} or runs.jsonl yet"}
             for label in SQLLM_WANTED if label not in have]
    write(rows, args.windows)


# bits/weight differences below this are ties on the front (SliM-LLM's bit map adds 0.0001 to g64's 2.5)
TIE_BITS = 0.01


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats: none has lower perplexity at bits/weight within ``TIE_BITS`` of theirs or
    below, by increasing bits/weight."""
    front = [r for r in rows if not any(o["bits_per_weight"] <= r["bits_per_weight"] + TIE_BITS
                                        and o["perplexity"] < r["perplexity"] for o in rows)]
    return sorted(front, key=lambda r: r["bits_per_weight"])


def _loadavg_cell(r: dict[str, Any]) -> str:
    return " / ".join(f"{x:.1f}" for x in r["loadavg"]) if r.get("loadavg") else "-"


def write(rows: list[dict[str, Any]], windows: int) -> None:
    for r in rows:
        if "window_nll" in r:
            r["perplexity"] = math.exp(sum(r["window_nll"]) / len(r["window_nll"]))
    machine = {**machine_info(), "loadavg": os.getloadavg()}
    ok = sorted((r for r in rows if "perplexity" in r), key=lambda r: (r["family"] != "fp32", r["bits_per_weight"]))
    front = pareto([r for r in ok if r["family"] != "fp32"])
    on_front = {r["label"] for r in front}
    for r in ok:
        r["pareto"] = r["label"] in on_front
    doc = {"protocol": f"first {windows} windows of {SEQLEN} tokens of {WIKI_TEST.name}, GPTQ protocol, no BOS",
           "machine": machine, "commit": git_commit(str(ROOT)), "pareto_front": [r["label"] for r in front],
           "rows": rows}
    (RESULTS / "peers.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    table = markdown_table(
        ["method", "bits/weight (linears)", f"WikiText-2 ppl ({windows} windows)", "Pareto front", "quantize s",
         "load avg (1 min) start / end", "calibration", "evaluated with", "from"],
        [[r["label"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.2f}", "yes" if r["pareto"] else "",
          f"{r['quant_seconds']:.0f}" if r.get("quant_seconds") is not None else "-", _loadavg_cell(r),
          r["calibration"], r["engine"], r["source"]] for r in ok])
    same = [r["quantizer_remade_same_bytes"] for r in ok if "quantizer_remade_same_bytes" in r]
    remade = ("no file timed yet" if not same else "the remade files are byte-identical to the scored ones"
              if all(same) else f"{same.count(False)} remade file(s) differ from the scored ones")
    failed = [r for r in rows if "error" in r]
    lines = "\n".join(f"- {r['label']}: {r['error']}" for r in failed)
    md = (f"# Peers on SmolLM2-135M: perplexity against bits/weight\n\n{table}\n\n"
          + (f"Not in the table:\n\n{lines}\n\n" if failed else "")
          + "![Pareto chart](peers.png)\n\n"
          f"Protocol P's evaluation: {doc['protocol']}; every row scores the same {windows} windows of the same "
          f"fp32 SmolLM2-135M weights (the dequantized bundled Q4_1 GGUF). Rows marked P were calibrated on protocol "
          f"P's 32 x 2048 WikiText-2 validation windows (seed 0); each SqueezeLLM row is the latest run of its "
          f"setting in results/runs-P.jsonl, with the Fisher file (fp32 or bf16 pass) the calibration column names "
          f"(results/fisher-dtype-P.md compares the two). Rows marked \"not P\" "
          f"come from the older 32 x 512 calibration, kept until a run under P replaces them. HQQ and "
          f"bitsandbytes are applied by peers.py with their own quantize/dequantize functions and evaluated in "
          f"torch fp32 with the dequantized weights, as sqllm's rows are. llama.cpp rows are made and scored by "
          f"llamacpp.py (llama.cpp's quantizer from an F32 GGUF of the same weights, no importance matrix; "
          f"perplexity by llama.cpp on the same token windows); SmolLM2's hidden size 576 is not a multiple of "
          f"256, so its K-quant mixes store the 576-wide rows in Q4_0/Q5_0/Q8_0 fallbacks, and Q3_K_M ends up at "
          f"4.6 bits/weight. Bits/weight count each format's stored codes, scales, zeros and second-level "
          f"statistics of the quantized linears only (embeddings and head excluded for every row). "
          f"Quantize seconds are wall time on a shared 2-core machine beside other jobs (read them with the load "
          f"column; indicative only): SqueezeLLM's exclude the Fisher pass, made once and read from its file "
          f"(5-6 minutes for P's 32 x 2048 windows in bf16: results/smollm2-P-squeezellm-plus-3bit.md); llama.cpp's are "
          f"peers.py's timing of llama.cpp's quantizer (one thread) remaking each scored file in a scratch folder "
          f"({remade}). The Pareto front column marks the rows no other row beats: none has a lower perplexity "
          f"at fewer bits/weight (differences under {TIE_BITS} count as ties).\n\n"
          f"Machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['loadavg'][0]:.1f} when "
          f"the table was written. Commit {doc['commit']}.\n")
    (RESULTS / "peers.md").write_text(md)
    plot(ok, front, windows)
    print(md)


# the chart's left panel leaves out rows above this perplexity (2-bit collapses) so the rest stay readable;
# its right panel zooms into the crowded 4-bit region
PLOT_CAP = 300.0
ZOOM_BITS = (4.3, 5.7)


def plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], windows: int) -> None:
    """Perplexity against bits/weight, one marker per family, the Pareto front of all rows drawn: the whole
    range (log scale, rows above ``PLOT_CAP`` left out) and a linear zoom on ``ZOOM_BITS``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"sqllm": ("o", "#1b7837"), "hqq": ("s", "#762a83"), "bnb": ("^", "#e08214"),
              "llama.cpp": ("D", "#2166ac"), "autoround": ("v", "#b2182b")}
    fig, (wide, zoom) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    fp = next((r for r in rows if r["family"] == "fp32"), None)
    shown = [r for r in rows if r["family"] != "fp32" and r["perplexity"] < PLOT_CAP]
    in_zoom = [r for r in shown if ZOOM_BITS[0] <= r["bits_per_weight"] <= ZOOM_BITS[1]]
    for ax, pts_all in ((wide, shown), (zoom, in_zoom)):
        if fp is not None:
            ax.axhline(fp["perplexity"], color="#999", ls="--", lw=1, label=f"fp32 ({fp['perplexity']:.2f})")
        line = [r for r in front if r in pts_all]
        ax.step([r["bits_per_weight"] for r in line], [r["perplexity"] for r in line], where="post", color="#444",
                lw=1, alpha=0.6, label="Pareto front (all rows)")
        for family, (marker, color) in styles.items():
            pts = [r for r in pts_all if r["family"] == family]
            if not pts:
                continue
            ax.scatter([r["bits_per_weight"] for r in pts], [r["perplexity"] for r in pts], marker=marker,
                       color=color, label=family, s=40, zorder=3)
            for r in pts:
                ax.annotate(r["label"].replace("sqllm ", "").replace("llama.cpp ", "").replace("bitsandbytes ", ""),
                            (r["bits_per_weight"], r["perplexity"]), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")
        ax.set_xlabel("bits/weight of the quantized linears")
        ax.grid(True, which="both", alpha=0.3)
    wide.set_yscale("log")
    wide.set_ylabel(f"WikiText-2 perplexity ({windows} windows of {SEQLEN})")
    wide.set_title(f"all rows below perplexity {PLOT_CAP:.0f} (log scale)")
    wide.legend(fontsize=8)
    zoom.set_title(f"{ZOOM_BITS[0]}-{ZOOM_BITS[1]} bits/weight (linear scale)")
    fig.suptitle("SmolLM2-135M, protocol P: sqllm and peers (lower left is better)")
    fig.tight_layout()
    fig.savefig(RESULTS / "peers.png", dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
