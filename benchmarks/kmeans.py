"""Our batched weighted k-means against the reference approach, on SmolLM2 weight rows.

Reference: scikit-learn ``KMeans(n_clusters=2**b, init='k-means++', n_init=1, max_iter=50,
random_state=0)`` fitted per row on a 1-D column with ``sample_weight`` = the row's Fisher values,
which is what SqueezeLLM's reference code does. Ours: ``sqllm.quant.kmeans.weighted_kmeans`` on whole
matrices at once.

Measured, for 3 and 4 bits:
(a) the weighted k-means objective, ours / sklearn, on a sample of rows (the same rows, the same
    weights; centroids unrounded on both sides);
(b) time: sklearn per row on the sampled rows, extrapolated to every row of the k-means stage of
    SmolLM2 (30 blocks x 7 linears); ours measured on the full stage (or ``--blocks`` of it, scaled).

Fisher: a real one with ``--fisher FILE`` (from ``sqllm sensitivity``); otherwise a seeded synthetic
stand-in, ``w**2 * Gamma(0.5, 1)``: positive, heavy-tailed and growing with |w|, as squared
gradients are. The output says which was used.

    python benchmarks/kmeans.py               # full stage, writes results/kmeans.{json,md}
    python benchmarks/kmeans.py --blocks 2    # quick look (ours timed on 2 blocks, scaled x15)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqllm.models import resolve_model_path
from sqllm.quant.kmeans import weighted_kmeans, weighted_kmeans_objective
from sqllm.report import git_commit, machine_info, markdown_table

MODEL = "smollm2-135m"  # the bundled GGUF; sqllm converts it once to cached fp32 safetensors
RESULTS = ROOT / "benchmarks" / "results"
BLOCKS = 30
LINEARS = {  # name in the block -> rows (output channels) x columns (input features) of SmolLM2-135M
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SAMPLE_BLOCKS = (0, 7, 15, 22, 29)  # rows for the objective / sklearn timing come from these blocks
ROWS_PER_MATRIX = 8


def weights_path() -> Path:
    """SmolLM2-135M fp32 safetensors, converted from the bundled GGUF into sqllm's cache on first use."""
    return Path(resolve_model_path(MODEL)) / "model.safetensors"


def synthetic_fisher(w: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded stand-in for a diagonal Fisher ``[out, in]``: ``w**2 * Gamma(0.5, 1)``."""
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (w.double() ** 2 * z**2 / 2).float()  # Gamma(0.5, 1) = z^2 / 2 for standard normal z


def sklearn_fit(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Centroids of the reference per-row fit (sorted)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=50, random_state=0)
    km.fit(x[:, None], sample_weight=w)
    return np.sort(km.cluster_centers_[:, 0])


def objective(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> float:
    """Weighted SSE of nearest-centroid assignment, float64."""
    return float((w * ((x[:, None] - c[None, :]) ** 2).min(axis=1)).sum())


def load_matrix(f: Any, block: int, name: str, fisher_file: Any | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = f.get_tensor(f"model.layers.{block}.{name}.weight").float()
    if fisher_file is not None:
        return w, fisher_file.get_tensor(f"model.layers.{block}.{name}").float()
    return w, synthetic_fisher(w, seed=block * 100 + list(LINEARS).index(name))


def run(bits_list: list[int], blocks: int, fisher_path: str | None, threads: int) -> dict[str, Any]:
    """Results per bit width with ``threads`` intra-op threads for torch and for sklearn's OpenMP."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        return _run(bits_list, blocks, fisher_path)


def _run(bits_list: list[int], blocks: int, fisher_path: str | None) -> dict[str, Any]:
    f = safe_open(str(weights_path()), framework="pt")
    ff = safe_open(fisher_path, framework="pt") if fisher_path else None
    total_rows = {name: BLOCKS * rows for name, (rows, _) in LINEARS.items()}
    results: dict[str, Any] = {}
    w, fisher = load_matrix(f, 0, "self_attn.k_proj", ff)  # warm-up: imports, thread pools, allocator
    sklearn_fit(w[0].double().numpy(), fisher[0].double().numpy(), 8)
    weighted_kmeans(w, fisher, 8)
    for bits in bits_list:
        k = 2**bits
        # (b) ours on every matrix of the first `blocks` blocks; (a) objective rows from SAMPLE_BLOCKS.
        ours_seconds = ours_cpu = 0.0
        ours_obj: list[float] = []
        sk_obj: list[float] = []
        sk_seconds: dict[int, list[float]] = {576: [], 1536: []}
        sk_cpu: dict[int, list[float]] = {576: [], 1536: []}
        for block in sorted(set(range(blocks)) | set(SAMPLE_BLOCKS)):
            for name in LINEARS:
                w, fisher = load_matrix(f, block, name, ff)
                t, tc = time.perf_counter(), time.thread_time()
                c, codes = weighted_kmeans(w, fisher, k)
                dt, dc = time.perf_counter() - t, time.thread_time() - tc
                if block < blocks:
                    ours_seconds += dt
                    ours_cpu += dc
                if block not in SAMPLE_BLOCKS:
                    continue
                rows = torch.linspace(0, w.shape[0] - 1, ROWS_PER_MATRIX).long()
                per_row = weighted_kmeans_objective(w[rows], fisher[rows], c[rows], codes[rows])
                for i, r in enumerate(rows.tolist()):
                    x, wr = w[r].double().numpy(), fisher[r].double().numpy()
                    t, tc = time.perf_counter(), time.thread_time()
                    centers = sklearn_fit(x, wr, k)
                    sk_seconds[w.shape[1]].append(time.perf_counter() - t)
                    sk_cpu[w.shape[1]].append(time.thread_time() - tc)
                    sk_obj.append(objective(x, wr, centers))
                    ours_obj.append(float(per_row[i]))
        ratio = np.array(ours_obj) / np.array(sk_obj)
        sk_ms = {f"{n}_cols": 1e3 * float(np.mean(v)) for n, v in sk_seconds.items()}
        sk_stage = sum(total_rows[name] * sk_ms[f"{cols}_cols"] / 1e3 for name, (_, cols) in LINEARS.items())
        ours_stage = ours_seconds * BLOCKS / blocks
        sk_cpu_ms = {f"{n}_cols": 1e3 * float(np.mean(v)) for n, v in sk_cpu.items()}
        sk_cpu_stage = sum(total_rows[name] * sk_cpu_ms[f"{cols}_cols"] / 1e3 for name, (_, cols) in LINEARS.items())
        ours_cpu_stage = ours_cpu * BLOCKS / blocks
        results[f"{bits}bit"] = {
            "k": k,
            "objective_ratio": {
                "rows": int(ratio.size), "mean": float(ratio.mean()), "median": float(np.median(ratio)),
                "worst": float(ratio.max()), "best": float(ratio.min()), "p99": float(np.quantile(ratio, 0.99)),
                "rows_ours_not_worse": float((ratio <= 1 + 1e-9).mean()),
            },
            "sklearn_ms_per_row": sk_ms,
            "sklearn_stage_seconds_extrapolated": sk_stage,
            "ours_stage_seconds": ours_stage,
            "ours_blocks_timed": blocks,
            "ours_ms_per_row": 1e3 * ours_stage / sum(total_rows.values()),
            "speedup": sk_stage / ours_stage,
            # The same on the calling thread's CPU time (both run on it at one thread): unlike wall
            # clock, it does not grow with the waits for a core on a loaded machine.
            "sklearn_cpu_ms_per_row": sk_cpu_ms,
            "sklearn_stage_cpu_seconds_extrapolated": sk_cpu_stage,
            "ours_stage_cpu_seconds": ours_cpu_stage,
            "speedup_cpu": sk_cpu_stage / ours_cpu_stage,
        }
        print(f"{torch.get_num_threads()} threads, {bits} bits: ratio mean {ratio.mean():.4f} worst {ratio.max():.4f}; sklearn stage "
              f"{sk_stage:.0f} s (extrapolated), ours {ours_stage:.1f} s -> {sk_stage / ours_stage:.1f}x; CPU time "
              f"{sk_cpu_stage:.0f} s / {ours_cpu_stage:.1f} s -> {sk_cpu_stage / ours_cpu_stage:.1f}x", flush=True)
    return results


def _table_row(threads: str, bits: str, r: dict[str, Any]) -> list[Any]:
    o, ms = r["objective_ratio"], r["sklearn_ms_per_row"]
    return [
        threads.split("_")[0], bits, o["rows"], f"{o['mean']:.4f}", f"{o['median']:.4f}", f"{o['worst']:.4f}",
        f"{100 * o['rows_ours_not_worse']:.0f}%", f"{ms['576_cols']:.2f} / {ms['1536_cols']:.2f}",
        f"{r['sklearn_stage_seconds_extrapolated']:.0f}", f"{r['ours_stage_seconds']:.1f}", f"{r['speedup']:.1f}x",
        f"{r['speedup_cpu']:.1f}x" if "speedup_cpu" in r else "-",
    ]


def write(results: dict[str, Any], protocol: dict[str, Any], machine: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"protocol": protocol, "machine": machine, "git_commit": git_commit(), "results": results}
    (RESULTS / "kmeans.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "kmeans.md").write_text(render_markdown(doc))


def render_markdown(doc: dict[str, Any]) -> str:
    """The markdown report of a results document (``kmeans.json``)."""
    protocol, machine, results = doc["protocol"], doc["machine"], doc["results"]
    header = ["threads", "bits", "rows", "ratio mean", "ratio median", "ratio worst", "ours <= sklearn",
              "sklearn ms/row (576 / 1536 cols)", "sklearn stage s (extrap.)", "ours stage s", "speedup",
              "speedup (CPU time)"]
    rows = [_table_row(threads, key, r) for threads, per_bits in results.items() for key, r in per_bits.items()]
    lines = [
        "# Weighted k-means: ours vs scikit-learn (SmolLM2-135M rows)",
        "",
        f"Fisher: {protocol['fisher']}. Load average at start {machine['loadavg_start']}, at end "
        f"{machine['loadavg_end']} ({machine['cores']} cores, shared with other jobs). "
        f"Commit {doc['git_commit']}.",
        "",
        markdown_table(header, rows),
        "",
        "ratio = our weighted objective / sklearn's on the same rows (below 1: ours is better).",
        protocol["timing"] + ".",
    ]
    sk = {t: [r["sklearn_ms_per_row"]["576_cols"] for r in per_bits.values()] for t, per_bits in results.items()}
    if "1_threads" in sk and len(sk) > 1:
        slowest = max((t for t in sk if t != "1_threads"), key=lambda t: max(sk[t]))
        lines += [
            "",
            f"With {slowest.split('_')[0]} threads sklearn took up to {max(sk[slowest]):.1f} ms per 576-column "
            f"row against {max(sk['1_threads']):.1f} ms with 1 thread: on a loaded machine its OpenMP "
            "threads wait for cores held by other processes. The 1-thread rows are the like-for-like "
            "comparison.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--blocks", type=int, default=BLOCKS, help="blocks whose matrices time our solver")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="intra-op threads for torch and sklearn, one full run per value; 1 (the default) is "
                        "the like-for-like comparison, as our solver runs on one thread whatever the setting")
    p.add_argument("--fisher", help="Fisher safetensors file from `sqllm sensitivity` (default: synthetic)")
    p.add_argument("--markdown-only", action="store_true", help="re-render kmeans.md from kmeans.json")
    a = p.parse_args()
    if a.markdown_only:
        doc = json.loads((RESULTS / "kmeans.json").read_text())
        (RESULTS / "kmeans.md").write_text(render_markdown(doc))
        return
    machine = {**machine_info(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    protocol = {
        "model": str(weights_path()),
        "fisher": f"real, from {a.fisher}" if a.fisher else
                  "synthetic stand-in w**2 * Gamma(0.5, 1), seeded per matrix (no Fisher file given)",
        "reference": "sklearn KMeans(n_clusters=2**b, init='k-means++', n_init=1, max_iter=50, random_state=0), "
                     "per row, 1-D column, sample_weight = Fisher row",
        "ours": "sqllm.quant.kmeans.weighted_kmeans(w, fisher, 2**b) on whole matrices, defaults",
        "objective_rows": f"{ROWS_PER_MATRIX} evenly spaced rows of each of the 7 linears of blocks "
                          f"{list(SAMPLE_BLOCKS)}; centroids unrounded on both sides",
        "timing": f"sklearn timed per row on the sampled rows and extrapolated to all {BLOCKS} x 7 matrices "
                  f"({BLOCKS * sum(r for r, _ in LINEARS.values())} rows); ours timed on every matrix of "
                  f"the first {a.blocks} blocks" + ("" if a.blocks == BLOCKS else f", scaled x{BLOCKS / a.blocks:g}")
                  + "; wall clock (time.perf_counter), and the calling thread's CPU time (time.thread_time, "
                  "which waits for a core on a loaded machine do not inflate) for the last column; torch and "
                  "sklearn (threadpoolctl) get the same thread count; our solver runs on one thread whatever "
                  "the setting",
    }
    results = {f"{t}_threads": run(a.bits, a.blocks, a.fisher, t) for t in a.threads}
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    write(results, protocol, machine)


if __name__ == "__main__":
    main()
