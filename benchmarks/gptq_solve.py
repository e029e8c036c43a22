"""The GPTQ solve of one linear at LLaMA-2-7B and 13B shapes: sqllm's against the textbook steps.

The solve of a large model is almost all dense linear algebra per linear (``benchmarks/scale.py``: 4411 of
the 7B GPTQ run's 4929 s). Three parts, timed on the same random Hessian and weight:

* the factor ``U`` with ``H^-1 = U^T U``: the textbook way (GPTQ's reference code) factors ``H``, forms
  ``H^-1`` (``cholesky_inverse``) and factors that again; sqllm factors the reversed ``H`` once and inverts
  the triangle (``hessian_inverse_factor``);
* the sweep: the reference code's layout (``textbook_sweep`` below: row-major columns, each block's
  later columns updated through a temporary product) or ``gptq_core`` (each block swept transposed, the
  later columns updated in place by the product); both are timed on the textbook factor, and how many
  of their roundings differ is reported;
* the reported ``tr(dW H dW^T)``: directly (``out * in**2`` multiply-adds) or from the sweep's own errors
  (``sweep_hessian_error``).

"textbook" = textbook factor + textbook sweep + direct error; "sqllm" = ``gptq_quantize`` as shipped. Both run in
one process, one after the other, per shape. The Hessian is ``2/n X^T X`` of 512 random tokens (the scale
runs' 2 x 256 calibration) with heavy-tailed column scales; the default damping 0.3 makes it definite.

    python benchmarks/gptq_solve.py               # 7B and 13B shapes, writes results/gptq_solve.{json,md}
    python benchmarks/gptq_solve.py --shapes 7b   # one model's shapes
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqllm.codes import num_groups
from sqllm.config import GPTQConfig
from sqllm.quant.gptq import (
    fix_dead_inputs,
    gptq_core,
    gptq_quantize,
    hessian_error,
    hessian_inverse_factor,
    nearest_codes,
)
from sqllm.quant.uniform import minmax_grid
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
# hidden, intermediate, blocks: every block has four hidden x hidden linears (no grouped KV at these
# sizes), gate and up (intermediate x hidden) and down (hidden x intermediate)
MODELS = {"7b": (4096, 11008, 32), "13b": (5120, 13824, 40)}
TOKENS = 512
CFG = GPTQConfig(bits=4, group_size=128)


def block_linears(hidden: int, inter: int) -> list[tuple[str, int, int, int, int]]:
    """(name, out, in, count per block, distinct inputs among them) of a LLaMA block's linears: q/k/v read
    one input and o another, gate/up one, down one. The engine factors each input's Hessian once."""
    return [("q/k/v/o", hidden, hidden, 4, 2), ("gate/up", inter, hidden, 2, 1), ("down", hidden, inter, 1, 1)]


def layer(out: int, n_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[out, in]`` and Hessian ``[in, in]`` (``2/n X^T X`` of ``TOKENS`` rows, uneven columns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, n_in, generator=g) * torch.rand(n_in, generator=g).pow(3).mul(4).add(0.1)
    return torch.randn(out, n_in, generator=g) * 0.02, 2 / TOKENS * x.T @ x


def textbook_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """GPTQ's reference steps: ``chol(H + damp I)``, its inverse, then the upper factor of that inverse."""
    damped = h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def textbook_sweep(w: torch.Tensor, u: torch.Tensor, group_size: int, bits: int, sym: bool) -> torch.Tensor:
    """GPTQ's Algorithm 1 laid out as the reference code lays it out: blocks of 128 columns swept in the
    row-major weight, each column's error spread over the block by a rank-one product, then the later
    columns updated by a product and a subtraction. Grids as ``gptq_core`` fits them (min-max, fitted on
    the updated weights when a group starts). Returns the dequantized weight ``[out, in]``."""
    w = w.clone()
    q = torch.empty_like(w)
    maxq = 2**bits - 1
    for b0 in range(0, w.shape[1], 128):
        b1 = min(b0 + 128, w.shape[1])
        w1, err1 = w[:, b0:b1].clone(), torch.empty(w.shape[0], b1 - b0)
        for i in range(b1 - b0):
            if (b0 + i) % group_size == 0:  # groups of 128 start with blocks: w holds their updated weights
                scale, zero = minmax_grid(w[:, b0 + i:b0 + i + group_size], bits, sym)
            q[:, b0 + i] = scale * (nearest_codes(w1[:, i], scale, zero, maxq) - zero)
            err1[:, i] = (w1[:, i] - q[:, b0 + i]) / u[b0 + i, b0 + i]
            w1[:, i:] -= err1[:, i:i + 1] @ u[b0 + i:b0 + i + 1, b0 + i:b1]
        w[:, b1:] -= err1 @ u[b0:b1, b1:]
    return q


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(out: int, n_in: int, seed: int) -> dict[str, Any]:
    """Seconds of each part, both ways, on one random layer, and how far the two ways' results differ."""
    w, h = layer(out, n_in, seed)
    h1, dead = fix_dead_inputs(h)
    w1 = w.clone()
    w1[:, dead] = 0
    bits = torch.full((num_groups(n_in, CFG.group_size),), CFG.bits)

    def fit(wg: torch.Tensor, b: int, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return minmax_grid(wg, b, CFG.sym)

    u_ref, t_factor_ref = timed(lambda: textbook_factor(h1, CFG.percdamp))
    q_ref, t_sweep_ref = timed(lambda: textbook_sweep(w1, u_ref, CFG.group_size, CFG.bits, CFG.sym))
    (_, q_core, _), t_sweep = timed(lambda: gptq_core(w1, u_ref, CFG.group_size, bits, fit))
    err_ref, t_error_ref = timed(lambda: hessian_error(w, q_ref, h))
    (u, _), t_factor = timed(lambda: hessian_inverse_factor(h1, CFG.percdamp))
    qm, t_total = timed(lambda: gptq_quantize(w, h, CFG))
    return {
        "out": out, "in": n_in,
        "textbook_s": {"factor": t_factor_ref, "sweep": t_sweep_ref, "error": t_error_ref,
                       "total": t_factor_ref + t_sweep_ref + t_error_ref},
        "sqllm_s": {"factor": t_factor, "sweep": t_sweep, "total": t_total},
        "sweep_codes_differing": float((q_core != q_ref).float().mean()),
        "factor_max_rel_diff": float((u - u_ref).abs().max() / u_ref.abs().max()),
        "codes_differing": float((qm.dequantize() != q_ref).float().mean()),
        "error_rel_diff": abs(qm.info["hessian_error"] - err_ref) / err_ref,
    }


def run(models: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for m in models:
        hidden, inter, blocks = MODELS[m]
        rows = []
        for i, (name, out, n_in, count, inputs) in enumerate(block_linears(hidden, inter)):
            r = {"linear": name, "count": count, "inputs": inputs, **measure(out, n_in, seed=i)}
            print(m, name, json.dumps(r), flush=True)
            rows.append(r)
        per_block = {k: sum(r[side]["total"] * r["count"] for r in rows)
                     for k, side in (("textbook", "textbook_s"), ("sqllm", "sqllm_s"))}
        # linears that read one input share its factor (sqllm.methods._prepared_hessian)
        per_block["sqllm_shared"] = per_block["sqllm"] - sum(
            (r["count"] - r["inputs"]) * r["sqllm_s"]["factor"] for r in rows)
        results[m] = {"blocks": blocks, "linears": rows, "per_block_s": per_block,
                      "model_s": {k: v * blocks for k, v in per_block.items()}}
    return results


def _sweep_diff(doc: dict[str, Any]) -> str:
    """The range over the measured linears of the share of roundings the two sweeps alone disagree on."""
    shares = [r["sweep_codes_differing"] for res in doc["results"].values() for r in res["linears"]]
    return "none of them" if max(shares) == 0 else f"{100 * min(shares):.3f}% to {100 * max(shares):.3f}% of them"


def render_markdown(doc: dict[str, Any]) -> str:
    header = ["model", "linear (out x in)", "per block", "factor s, textbook / sqllm", "sweep s, textbook / sqllm",
              "error s", "total s, textbook / sqllm", "speedup", "codes differing", "error rel. diff"]
    rows = []
    for m, res in doc["results"].items():
        for r in res["linears"]:
            tb, sq = r["textbook_s"], r["sqllm_s"]
            rows.append([m, f"{r['linear']} ({r['out']} x {r['in']})", r["count"],
                         f"{tb['factor']:.1f} / {sq['factor']:.1f}", f"{tb['sweep']:.1f} / {sq['sweep']:.1f}",
                         f"{tb['error']:.1f}",
                         f"{tb['total']:.1f} / {sq['total']:.1f}", f"{tb['total'] / sq['total']:.2f}x",
                         f"{100 * r['codes_differing']:.3f}%", f"{r['error_rel_diff']:.1e}"])
        pb, ms = res["per_block_s"], res["model_s"]
        rows.append([m, f"**whole model** ({res['blocks']} blocks)", "", "", "", "",
                     f"**{ms['textbook']:.0f} / {ms['sqllm']:.0f}**", f"**{pb['textbook'] / pb['sqllm']:.2f}x**",
                     "", ""])
        rows.append([m, "**whole model, factors shared** by linears of one input", "", "", "", "",
                     f"**{ms['textbook']:.0f} / {ms['sqllm_shared']:.0f}**",
                     f"**{pb['textbook'] / pb['sqllm_shared']:.2f}x**", "", ""])
    mach = doc["machine"]
    return "\n".join([
        "# GPTQ solve per linear: textbook steps against sqllm's",
        "",
        f"4-bit g128, damping 0.3, one random layer per shape (Hessian of {TOKENS} tokens). One thread; "
        f"{machine_line(mach)}; load average at start {mach['loadavg_start']}, at end {mach['loadavg_end']} "
        f"(shared with other jobs). Commit {doc['git_commit']}.",
        "",
        markdown_table(header, rows),
        "",
        "textbook: chol(H + damp I), cholesky_inverse, upper chol of the inverse; the sweep; the direct "
        "tr(dW H dW^T), as GPTQ's reference code lays them out. sqllm: one chol of the reversed H and a "
        "triangular inverse; gptq_core's sweep (transposed blocks, later columns updated in place); the error "
        "from the sweep's fed-back errors. Both sweeps are timed on the textbook factor; sqllm's total is "
        "`gptq_quantize` end to end. 'codes differing': dequantized weights that differ between the two ways "
        "(float32 round-off moves a few roundings; the two sweeps alone differ in "
        f"{_sweep_diff(doc)}). Whole model: per-block total times blocks, solve stage only "
        "(statistics, loading and writing not included); with factors shared, q/k/v use one factor and "
        "gate/up one (four per block instead of seven), as `sqllm quantize` does, so sqllm's factor time of "
        "those linears is counted once per input.",
    ]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--markdown-only", action="store_true", help="re-render gptq_solve.md from gptq_solve.json")
    a = p.parse_args()
    if a.markdown_only:
        (RESULTS / "gptq_solve.md").write_text(render_markdown(json.loads((RESULTS / "gptq_solve.json").read_text())))
        return
    torch.set_num_threads(1)
    machine = {**machine_info(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    results = run(a.shapes)
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc = {"machine": machine, "git_commit": git_commit(), "config": str(CFG), "tokens": TOKENS,
           "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "gptq_solve" if a.shapes == list(MODELS) else f"gptq_solve-{'-'.join(a.shapes)}"
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(doc))


if __name__ == "__main__":
    main()
