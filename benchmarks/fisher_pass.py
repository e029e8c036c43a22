"""The Fisher pass on SmolLM2: whole-model vs streamed, float32 vs bfloat16 autocast, side by side.

For each pass (all four by default, or those named with ``--passes``), the seconds per 2048-token window
(the same windows for all), and for the bf16 passes how far their Fisher tables are from the fp32 ones:
relative L2 distance per linear, and the overlap of the top ``SENSITIVE`` % positions (SqueezeLLM's
sensitive values). The whole-model pass is what ``sqllm quantize`` runs for a model that fits
``EngineOptions.resident_fisher_bytes`` (SmolLM2 does); larger models stream. Writes
``benchmarks/results/fisher_pass.{json,md}``.

    python benchmarks/fisher_pass.py --windows 2
    python benchmarks/fisher_pass.py --windows 2 --passes "whole-model fp32" "whole-model bf16"
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

from sqllm.data import calibration_windows
from sqllm.engine.fisher import compute_fisher, streamed_fisher_dict
from sqllm.engine.stream import StreamedModel
from sqllm.models import linear_names, load_model, resolve_model_path
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
SENSITIVE = 0.05
PASSES = ("whole-model fp32", "whole-model bf16", "streamed fp32", "streamed bf16")


def top_overlap(a: torch.Tensor, b: torch.Tensor, pct: float) -> float:
    """Fraction of the top ``pct`` % positions of ``a`` that are also in the top ``pct`` % of ``b``."""
    k = max(1, int(a.numel() * pct / 100))
    ia = set(torch.topk(a.flatten(), k).indices.tolist())
    ib = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(ia & ib) / k


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    rel = [float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref]
    overlap = [top_overlap(ref[n], got[n], SENSITIVE) for n in ref]
    return {"rel_l2_mean": sum(rel) / len(rel), "rel_l2_max": max(rel),
            "top_overlap_mean": sum(overlap) / len(overlap), "top_overlap_min": min(overlap)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    a = p.parse_args()
    path = resolve_model_path("smollm2-135m")
    model, tok = load_model(path)
    windows = calibration_windows(tok, str(WIKI_VALID), a.windows, a.seqlen, 0)
    names = linear_names(model)
    everything = {
        "whole-model fp32": lambda: compute_fisher(model, names, windows, progress=False),
        "whole-model bf16": lambda: compute_fisher(model, names, windows, amp=torch.bfloat16, progress=False),
        "streamed fp32": lambda: streamed_fisher_dict(StreamedModel(path), windows, progress=False),
        "streamed bf16": lambda: streamed_fisher_dict(StreamedModel(path), windows, amp=torch.bfloat16,
                                                      progress=False),
    }
    passes = {label: everything[label] for label in a.passes}
    load = os.getloadavg()[0]
    tables, rows = {}, []
    for label, run in passes.items():
        start = time.perf_counter()
        tables[label] = run()
        rows.append({"pass": label, "seconds_per_window": (time.perf_counter() - start) / a.windows})
        print(rows[-1], flush=True)
    for row in rows:
        ref = tables.get(row["pass"].replace("bf16", "fp32"))
        row.update(compare(ref, tables[row["pass"]]) if "bf16" in row["pass"] and ref is not None else {})
    both = "whole-model fp32" in tables and "streamed fp32" in tables
    same = compare(tables["whole-model fp32"], tables["streamed fp32"]) if both else None
    doc = {"machine": machine_info(), "commit": git_commit(str(ROOT)), "load_average_at_start": load,
           "load_average_at_end": os.getloadavg()[0],
           "protocol": {"model": "smollm2-135m", "windows": a.windows, "seqlen": a.seqlen,
                        "calibration": "wiki.valid.tokens, seed 0", "sensitive_pct": SENSITIVE},
           "rows": rows, "streamed_vs_whole_fp32": same}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fisher_pass.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown_table(
        ["pass", "s / window", "rel. L2 to fp32 (mean / max)", f"top {SENSITIVE}% overlap (mean / min)"],
        [[r["pass"], f"{r['seconds_per_window']:.1f}",
          f"{r['rel_l2_mean']:.4f} / {r['rel_l2_max']:.4f}" if "rel_l2_mean" in r else "",
          f"{r['top_overlap_mean']:.3f} / {r['top_overlap_min']:.3f}" if "rel_l2_mean" in r else ""]
         for r in rows])
    m = doc["machine"]
    streamed = (f" Streamed fp32 vs whole-model fp32: relative L2 {same['rel_l2_max']:.2e} at most (round-off)."
                if same is not None else "")
    md = (f"# Fisher pass on SmolLM2: whole-model vs streamed, fp32 vs bf16 autocast\n\n{table}\n\n"
          f"{a.windows} windows x {a.seqlen} tokens of wiki.valid.tokens, the same for every pass.{streamed} "
          f"Machine: {machine_line(m)} ({m['torch_threads']} threads), load average "
          f"{load:.1f} at the start, {doc['load_average_at_end']:.1f} at the end (shared machine). "
          f"Commit {doc['commit']}.\n")
    (RESULTS / "fisher_pass.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
