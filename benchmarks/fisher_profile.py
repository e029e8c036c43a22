"""Where one window of SmolLM2's bf16 Fisher pass spends its time, against what this CPU can do.

The Fisher pass (forward and backward of 2048 tokens under bf16 autocast, squares summed in float32) is
almost all of ``sqllm quantize --method squeezellm`` on SmolLM2 under protocol P. This profiles one window
(``torch.profiler``, after a warm-up window), sorts the operators' own CPU time into matrix products,
attention (the fused causal SDPA kernel, forward and backward) and the rest, and sets each against
its arithmetic:

* matrix products: ``2 * out * in * L`` per linear for the forward, again for the input gradient
  (every linear but block 0's q/k/v, fed by the frozen embeddings) and for the weight gradient (the targets; the
  tied head has none), and the head's forward and input gradient;
* attention: ``4 * L^2 * d_head * heads / 2`` per block forward (causal half), ``2.5x`` that backward
  (recomputed scores and four products);
* a ceiling: the rate of one bf16 product of a 2048 x 576 by 576 x 1536 matrix (the MLP's shape),
  timed alone on the same threads.

Then, side by side on the same windows (alternating, so that the machine's drift hits both), the pass as
sqllm runs it, with the loss taken at the frozen head's input (``causal_lm_loss``), and with the model's
own forward and loss over the whole ``[L, vocab]`` logits; and the two passes' Fisher, compared.

    python benchmarks/fisher_profile.py              # writes results/fisher-profile.{json,md}
    python benchmarks/fisher_profile.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqllm.data import calibration_windows
from sqllm.engine.fisher import compute_fisher
from sqllm.models import linear_names, load_model
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
MODEL = "smollm2-135m"
SEQLEN = 2048
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")


def category(op: str) -> str:
    if "scaled_dot_product" in op:
        return "attention"
    return "matrix products" if op in MATMUL_OPS else "other"


def flops(model: torch.nn.Module, names: list[str], seqlen: int) -> dict[str, float]:
    """Multiply-adds x 2 of one window's forward and backward, by category (see the module docstring)."""
    cfg = model.config
    # block 0's q/k/v read the normed embeddings, which need no gradient: no input gradient for them
    first_block = {n for n in names if "layers.0." in n and n.split(".")[-1] in ("q_proj", "k_proj", "v_proj")}
    mm = 0.0
    for n in names:
        out, n_in = model.get_submodule(n).weight.shape
        per_pass = 2.0 * out * n_in * seqlen
        mm += per_pass * (2 if n in first_block else 3)  # forward, weight gradient, input gradient
    mm += 2 * (2.0 * cfg.vocab_size * cfg.hidden_size * seqlen)  # head: forward and input gradient
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn_fwd = 4.0 * seqlen**2 * head_dim * cfg.num_attention_heads / 2 * cfg.num_hidden_layers
    return {"matrix products": mm, "attention": attn_fwd * 3.5}


def matmul_ceiling(threads: int) -> float:
    """GFLOP/s of a bf16 [2048, 576] x [576, 1536] product, best of 20 after warm-up."""
    a = torch.randn(SEQLEN, 576, dtype=torch.bfloat16)
    b = torch.randn(576, 1536, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * SEQLEN * 576 * 1536 / best / 1e9


def loss_paths(model: torch.nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, Any]:
    """Seconds per window of the pass with the frozen-head loss and with the model's own loss, one window
    each in turn, and the relative L2 distance of their Fisher (per linear: mean and max)."""
    seconds: dict[str, list[float]] = {"frozen head": [], "model's own": []}
    fisher: dict[str, dict[str, torch.Tensor]] = {}
    for window in windows:
        for key, frozen in (("frozen head", True), ("model's own", False)):
            t0 = time.perf_counter()
            f = compute_fisher(model, names, window[None], amp=torch.bfloat16, progress=False,
                               frozen_head_loss=frozen)
            seconds[key].append(time.perf_counter() - t0)
            fisher[key] = {n: fisher[key][n] + f[n] for n in names} if key in fisher else f
    rel = [float((fisher["frozen head"][n] - fisher["model's own"][n]).norm() / fisher["model's own"][n].norm())
           for n in names]
    return {"windows": len(windows), "seconds": seconds, "rel_l2_mean": sum(rel) / len(rel), "rel_l2_max": max(rel)}


def run(threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, tok = load_model(MODEL)
    names = linear_names(model)
    windows = calibration_windows(tok, str(WIKI_VALID), 7, SEQLEN, 0)
    compute_fisher(model, names, windows[:1], amp=torch.bfloat16, progress=False)  # warm-up
    t0 = time.perf_counter()
    compute_fisher(model, names, windows[1:2], amp=torch.bfloat16, progress=False)
    window_s = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compute_fisher(model, names, windows[2:3], amp=torch.bfloat16, progress=False)
    seconds: dict[str, float] = {"matrix products": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        seconds[category(e.key)] += e.self_cpu_time_total / 1e6
    work = flops(model, names, SEQLEN)
    return {"threads": threads, "window_s": window_s, "profiled_s": sum(seconds.values()), "seconds": seconds,
            "gflop": {k: v / 1e9 for k, v in work.items()},
            "gflops_achieved": {k: work[k] / seconds[k] / 1e9 for k in work},
            "matmul_ceiling_gflops": matmul_ceiling(threads),
            "loss_paths": loss_paths(model, names, windows[3:7])}


def render_markdown(doc: dict[str, Any]) -> str:
    r, mach = doc["result"], doc["machine"]
    rows = [[k, f"{r['seconds'][k]:.2f}", f"{100 * r['seconds'][k] / r['profiled_s']:.0f}%",
             f"{r['gflop'][k]:.0f}" if k in r["gflop"] else "-",
             f"{r['gflops_achieved'][k]:.0f}" if k in r["gflops_achieved"] else "-"] for k in r["seconds"]]
    floor = r["gflop"]["matrix products"] / r["matmul_ceiling_gflops"]
    return "\n".join([
        "# One window of the bf16 Fisher pass on SmolLM2, by operator",
        "",
        f"{SEQLEN} tokens of wiki.valid.tokens, `compute_fisher(amp=bfloat16)`, {r['threads']} thread(s); "
        f"{machine_line(mach)}; load average at start {mach['loadavg_start']}, at end {mach['loadavg_end']} "
        f"(shared with other jobs). Commit {doc['git_commit']}.",
        "",
        markdown_table(["part", "seconds (profiled window)", "share", "GFLOP", "GFLOP/s"], rows),
        "",
        f"Window: {r['window_s']:.2f} s unprofiled, {r['profiled_s']:.2f} s of operator time profiled. A bf16 "
        f"product of the MLP's shape alone runs at {r['matmul_ceiling_gflops']:.0f} GFLOP/s on these threads; at "
        f"that rate the window's matrix products take {floor:.2f} s, {32 * floor:.0f} s for protocol P's 32 "
        f"windows, before attention ({r['gflops_achieved']['attention']:.0f} GFLOP/s in the fused kernel) "
        "and the rest.",
        *_floor_lines(r),
        *_loss_path_lines(r.get("loss_paths")),
    ]) + "\n"


def _floor_lines(r: dict[str, Any]) -> list[str]:
    """What protocol P's 32 windows cost at the least, with every product at the measured ceiling."""
    ceiling = r["matmul_ceiling_gflops"]
    # attention's products without the backward's recomputed scores: 3x the forward's, not 3.5x
    attention = r["gflop"]["attention"] * 3.0 / 3.5
    mm_s, att_s = r["gflop"]["matrix products"] / ceiling, attention / ceiling
    return ["", f"A floor for protocol P's 32 windows on these threads: the matrix products at the ceiling "
            f"({32 * mm_s:.0f} s) plus attention's products, none recomputed, at the same rate "
            f"({32 * att_s:.0f} s), {32 * (mm_s + att_s):.0f} s, before anything else (the element-wise rest "
            f"took {r['seconds']['other']:.2f} s of this window)."]


def _loss_path_lines(lp: dict[str, Any] | None) -> list[str]:
    if lp is None:
        return []
    rows = [[k, " / ".join(f"{t:.2f}" for t in v), f"{sum(v) / len(v):.2f}"] for k, v in lp["seconds"].items()]
    return ["", "## Loss at the head: frozen-head chunked loss against the model's own", "",
            markdown_table(["loss", f"s per window ({lp['windows']} windows, in turn)", "mean"], rows), "",
            f"Their Fisher over these windows (bf16 autocast both): relative L2 distance per linear, mean "
            f"{lp['rel_l2_mean']:.4f}, max {lp['rel_l2_max']:.4f}."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown-only", action="store_true", help="re-render the markdown from the JSON")
    a = p.parse_args()
    name = "fisher-profile" if a.threads == 1 else f"fisher-profile-{a.threads}threads"
    if a.markdown_only:
        (RESULTS / f"{name}.md").write_text(render_markdown(json.loads((RESULTS / f"{name}.json").read_text())))
        return
    machine = {**machine_info(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    result = run(a.threads)
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc = {"machine": machine, "git_commit": git_commit(), "model": MODEL, "result": result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(doc))


if __name__ == "__main__":
    main()
