"""SmolLM2 under protocol P with the streamed engine, against the in-memory engine on the same settings.

1. ``sqllm quantize smollm2-135m --method squeezellm --bits 4`` (or ``--method squeezellm+``) with 32 x 2048 calibration windows in a
   child process: wall time, time per stage, peak RSS; then ``sqllm eval`` over the first 40 windows.
2. The same quantization in memory (``api.quantize``: whole-model Fisher, in-memory block loop), its
   packed tensors compared with the streamed output's, and its perplexity over the same 40 windows.

Writes ``benchmarks/results/smollm2_stream.{json,md}``; with ``--streamed-only`` only step 1 runs and
writes ``benchmarks/results/smollm2-P-<bits>bit.{json,md}`` (``smollm2-P-squeezellm-plus-<bits>bit`` for
SqueezeLLM+; stage by stage, with the load average).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import measured
from sqllm import api
from sqllm.formats.checkpoint import read_tensors
from sqllm.formats.layouts import pack_matrix
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"
CALIB = DATA / "wikitext-2" / "wiki.valid.tokens"
TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
P = {"nsamples": 32, "calib_seqlen": 2048, "seed": 0}
WINDOWS = 40


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/work/big/out"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", default="squeezellm", choices=["squeezellm", "squeezellm+"],
                   help="squeezellm+ needs --streamed-only (the in-memory comparison is SqueezeLLM's)")
    p.add_argument("--fisher-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--streamed-only", action="store_true",
                   help="skip the in-memory engine (step 2): time and evaluate `sqllm quantize` alone")
    a = p.parse_args()
    if a.method != "squeezellm" and not a.streamed_only:
        p.error(f"--method {a.method} needs --streamed-only")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"smollm2-{a.method.replace('+', '-plus')}-{a.bits}bit-P"
    cli = [sys.executable, "-m", "sqllm.cli"]
    load = os.getloadavg()[0]
    q = measured([*cli, "quantize", "smollm2-135m", "--method", a.method, "--bits", str(a.bits),
                  "--calib", str(CALIB), "--nsamples", str(P["nsamples"]), "--calib-seqlen", str(P["calib_seqlen"]),
                  "--fisher-dtype", a.fisher_dtype,
                  "--output", str(out), "--overwrite", "--json", str(out) + ".quantize.json"],
                 a.out / f"{out.name}.quantize.log")
    loads = [os.getloadavg()[0]]  # after the quantization, then after the evaluation
    summary = json.loads(Path(str(out) + ".quantize.json").read_text())
    e = measured([*cli, "eval", str(out), "--ppl", str(TEST), "--windows", str(WINDOWS), "--json",
                  str(out) + ".eval.json"], a.out / f"{out.name}.eval.log")
    loads.append(os.getloadavg()[0])
    streamed = {"quantize": q, "stages": summary["stages"], "bits_per_weight": summary["bits_per_weight"]["total"],
                "eval": e, "perplexity": json.loads(Path(str(out) + ".eval.json").read_text())["perplexity"]}
    print("streamed", streamed, flush=True)
    if a.streamed_only:
        write_streamed_only(a, summary, streamed, [load, *loads])
        return

    model, tok = api.load_model("smollm2-135m")
    start = time.perf_counter()
    result = api.quantize(model, tok, "squeezellm", bits=a.bits, calib=str(CALIB), **P)
    seconds = time.perf_counter() - start
    stored = read_tensors(out)
    packed = {k: v for name, qm in result.matrices.items()
              for k, v in pack_matrix(qm, f"{name}.", torch.float32).items()}
    equal = sum(torch.equal(stored[k], v) for k, v in packed.items())
    ppl = api.evaluate_perplexity(model, tok, str(TEST), windows=WINDOWS)["perplexity"]
    in_memory = {"seconds": seconds, "perplexity": ppl, "packed_tensors_equal": equal, "packed_tensors": len(packed)}
    print("in memory", in_memory, flush=True)

    doc = {"machine": machine_info(), "commit": git_commit(str(ROOT)), "load_average_at_start": load,
           "protocol": {"calibration": P, "eval_windows": WINDOWS, "bits": a.bits}, "streamed": streamed,
           "in_memory": in_memory}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_stream.json").write_text(json.dumps(doc, indent=2) + "\n")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in streamed["stages"].items())
    table = markdown_table(
        ["engine", "quantize s", "peak RSS GiB", "bits/weight", f"perplexity ({WINDOWS} windows)"],
        [["streamed (`sqllm quantize`)", f"{q['seconds']:.0f}", f"{q['peak_rss_mib'] / 1024:.2f}",
          f"{streamed['bits_per_weight']:.3f}", f"{streamed['perplexity']:.3f}"],
         ["in memory (`api.quantize`)", f"{seconds:.0f}", "", "", f"{ppl:.3f}"]])
    m = doc["machine"]
    md = (f"# SmolLM2 SqueezeLLM {a.bits}-bit under protocol P: streamed vs in-memory engine\n\n{table}\n\n"
          f"Streamed stages: {stages}. Packed tensors equal to the in-memory engine's: {equal} of {len(packed)}. "
          f"Calibration {P['nsamples']} x {P['calib_seqlen']} tokens of wiki.valid.tokens (seed 0); perplexity over "
          f"the first {WINDOWS} windows of 2048 tokens of wiki.test.raw. Machine: {machine_line(m)}"
          f", load average {load:.1f} at the start (shared machine). Commit {doc['commit']}.\n")
    (RESULTS / "smollm2_stream.md").write_text(md)
    print(md)


def write_streamed_only(a: argparse.Namespace, summary: dict, streamed: dict, loads: list[float]) -> None:
    """``benchmarks/results/smollm2-P-<bits>bit.{json,md}``: the whole `sqllm quantize` run, its stages and
    its perplexity, with the load average (1 min) at its start, after the quantization and after the eval."""
    name = f"smollm2-P-{'' if a.method == 'squeezellm' else 'squeezellm-plus-'}{a.bits}bit"
    doc = {"machine": machine_info(), "commit": git_commit(str(ROOT)), "load_average": loads,
           "protocol": {"calibration": P, "eval_windows": WINDOWS, "method": a.method, "bits": a.bits,
                        "fisher_dtype": a.fisher_dtype},
           **streamed, "summary": summary}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    q = streamed["quantize"]
    rows = [[stage, f"{sec:.1f}"] for stage, sec in streamed["stages"].items()]
    rows += [["whole `sqllm quantize` (wall, child process)", f"{q['seconds']:.1f}"]]
    m = doc["machine"]
    label = "SqueezeLLM" if a.method == "squeezellm" else "SqueezeLLM+"
    md = (f"# SmolLM2 {label} {a.bits}-bit under protocol P: `sqllm quantize` stage by stage\n\n"
          f"{markdown_table(['stage', 'seconds'], rows)}\n\n"
          f"Perplexity over the first {WINDOWS} windows of 2048 tokens of wiki.test.raw: "
          f"{streamed['perplexity']:.3f} ({streamed['bits_per_weight']:.3f} bits/weight). Calibration "
          f"{P['nsamples']} x {P['calib_seqlen']} tokens of wiki.valid.tokens (seed 0), `--fisher-dtype "
          f"{a.fisher_dtype}`; peak RSS {q['peak_rss_mib'] / 1024:.2f} GiB. Machine: {machine_line(m)}"
          f"; load average (1 min) {loads[0]:.1f} at the start, {loads[1]:.1f} after the "
          f"quantization, {loads[2]:.1f} after the eval (shared machine). Commit {doc['commit']}.\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
