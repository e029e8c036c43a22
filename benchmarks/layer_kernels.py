"""Layer benchmark of the packed-weight kernels against bf16 ``F.linear`` on LLaMA-2-7B-shaped layers.

    python benchmarks/layer_kernels.py [--threads 1 2] [--reps 15] [--no-prefill | --no-decode] [--out kernels]
    # writes results/NAME.{json,md}

For every layer shape (out x in: 4096x4096, 11008x4096, 4096x11008), format (LUT 3/4-bit, LUT 3-bit with
0.45% outliers, mixed-width LUT rows of 3 and 4 bits, SliM-LLM-style mixed 1/2/3-bit g64 averaging 2
bits, uniform 4-bit g128) and thread count, in one process: decode (1 token) and prefill (256 tokens)
through ``QuantLinear`` with bf16 activations, next to ``F.linear`` with a bf16 weight. Prefill runs the
kernels' bf16 path where the CPU multiplies bf16 natively (weights dequantized into bf16 tiles, torch's
bf16 matmul), as a bf16 model would. Every round times every variant once, in a
shuffled order, so load from other processes hits all variants alike; the table reports the minimum
(the least disturbed call: on a shared machine, preemption only ever adds time) and the median, and at
one thread also the calling thread's CPU time, which preemption does not inflate. Where the CPU has
AVX-512, decode also times every format with the AVX2 kernels forced (rows marked ``[AVX2]``, column
"x AVX2" = AVX2 time / default time). Achieved bandwidth counts the packed tensors (codes, tables or
scales, bit map, outliers) read once per call, and is compared with the machine's streaming read
bandwidth at the same thread count (a 256 MiB float32 buffer summed with AVX2 by the kernels' own
``stream_sum``); at one thread both come from CPU time, at two from the minimum wall time. Weights are
random: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqllm.codes import LUTCodes, QuantizedMatrix, SparseOutliers, UniformCodes, expand_groups, fp16_grid
from sqllm.nn import QuantLinear
from sqllm.nn.kernels import cpu_isa, cpu_kernels, kernels_enabled
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PREFILL = 256
FORMATS = ["LUT 3-bit", "LUT 4-bit", "LUT 3-bit + 0.45% sparse", "LUT rows 3/4-bit", "SliM mixed 2-bit g64",
           "uniform 4-bit g128"]
AVX2 = " [AVX2]"  # suffix of the variants timed with the AVX2 kernels forced


def random_matrix(fmt: str, out: int, n: int, g: torch.Generator) -> QuantizedMatrix:
    """Random codes of ``fmt`` for an ``[out, n]`` weight (tables fp16-representable, as stored)."""
    if fmt.startswith("LUT rows"):  # half the rows at each width; tables padded with +inf past a row's width
        row_bits = torch.tensor([3, 4])[torch.randint(0, 2, (out,), generator=g)]
        codes = (torch.rand(out, n, generator=g) * 2.0 ** row_bits[:, None]).floor().to(torch.uint8)
        lut = fp16_grid(torch.randn(out, 16, generator=g) * 0.02)
        lut[torch.arange(16) >= (1 << row_bits)[:, None]] = float("inf")
        return QuantizedMatrix(LUTCodes(codes, lut, 4, row_bits.long()), None)
    if fmt.startswith("LUT"):
        bits = int(fmt[4])
        codes = torch.randint(0, 1 << bits, (out, n), generator=g, dtype=torch.uint8)
        lut = fp16_grid(torch.randn(out, 1 << bits, generator=g) * 0.02)
        sparse = None
        if "sparse" in fmt:
            nnz = round(0.0045 * out * n)
            flat = torch.randperm(out * n, generator=g)[:nnz].sort().values
            values = (torch.randn(nnz, generator=g) * 0.1).half().float()
            sparse = SparseOutliers(rows=flat // n, cols=flat % n, values=values, shape=(out, n))
        return QuantizedMatrix(LUTCodes(codes, lut, bits), sparse)
    group_size = 64 if "g64" in fmt else 128
    n_groups = -(-n // group_size)
    if "mixed" in fmt:  # SliM-LLM's allocation at 2 bits: a quarter of the groups at 1 and at 3 bits
        group_bits = torch.tensor([1, 2, 2, 3])[torch.randint(0, 4, (n_groups,), generator=g)]
    else:
        group_bits = torch.full((n_groups,), 4)
    col_bits = expand_groups(group_bits, group_size, n)
    codes = (torch.rand(out, n, generator=g) * 2.0**col_bits).floor().to(torch.uint8)
    scales = fp16_grid(torch.rand(out, n_groups, generator=g) * 0.01 + 1e-4)
    zeros = fp16_grid(torch.rand(out, n_groups, generator=g) * 2.0 ** group_bits.float())
    return QuantizedMatrix(UniformCodes(codes, scales, zeros, group_bits, group_size), None)


def packed_bytes(module: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in module.packed_tensors().values())


def interleaved_times(
    fns: dict[str, Callable[[], object]], reps: int, seed: int = 0
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and this thread's CPU seconds of each function over ``reps`` rounds (after a
    warm-up); every round times every function once, in a shuffled order, so that the scheduler's
    periodic preemption on a shared machine cannot keep hitting the same function. At one thread the
    CPU time is the kernel's own cost, whatever the machine's load (preemption adds wall time only)."""
    for f in fns.values():
        f()
    order = random.Random(seed)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            t, c = time.perf_counter(), time.thread_time()
            fns[name]()
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - t)
    return wall, cpu


def read_bandwidth(reps: int) -> float:
    """Streaming read bandwidth in GB/s at the current torch thread count: from the calling thread's CPU
    time at one thread (as the kernels' bandwidth there), which preemption by other processes does not
    inflate; from wall time otherwise."""
    buffer = torch.ones(64 * 2**20)  # 256 MiB, touched so every page is real memory
    k = cpu_kernels()
    wall, cpu = interleaved_times({"read": lambda: k.stream_sum(buffer)}, reps)
    t = min(cpu["read"]) if torch.get_num_threads() == 1 else min(wall["read"])
    return buffer.numel() * 4 / t / 1e9


def forced_avx2(fn: Callable[[], object]) -> object:
    with cpu_isa("avx2"):
        return fn()


def measure_shape(out: int, n: int, threads_list: list[int], reps: int, g: torch.Generator,
                  prefill: bool = True, decode: bool = True) -> list[dict]:
    w_bf16 = (torch.randn(out, n, generator=g) * 0.02).bfloat16()
    modules = {fmt: QuantLinear.from_matrix(random_matrix(fmt, out, n, g), value_dtype=torch.float16)
               for fmt in FORMATS}
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth(10)
        phases = ([(1, "decode", reps)] if decode else []) + (
            [(PREFILL, f"prefill {PREFILL}", max(3, reps // 5))] if prefill else [])
        for tokens, label, rounds in phases:
            x = torch.randn(tokens, n, generator=g).bfloat16()
            fns: dict[str, Callable[[], object]] = {"bf16 F.linear": lambda x=x: F.linear(x, w_bf16)}
            fns |= {fmt: (lambda m=m, x=x: m(x)) for fmt, m in modules.items()}
            if tokens == 1 and cpu_kernels().isa() == "avx512":
                fns |= {fmt + AVX2: (lambda m=m, x=x: forced_avx2(lambda: m(x))) for fmt, m in modules.items()}
            with torch.inference_mode():
                times, cpu = interleaved_times(fns, rounds)
            base = min(times["bf16 F.linear"])
            for name, ts in times.items():
                s = min(ts)
                cpu_s = min(cpu[name]) if threads == 1 else None  # other threads' work is not this thread's
                fmt = name.removesuffix(AVX2)
                nbytes = 2 * out * n if name == "bf16 F.linear" else packed_bytes(modules[fmt])
                avx2 = times.get(fmt + AVX2) if name in modules else None
                rows.append({
                    "shape": f"{out}x{n}", "threads": threads, "phase": label, "tokens": tokens, "format": name,
                    "bits_per_weight": 16.0 if name == "bf16 F.linear" else modules[fmt].bits_per_weight(),
                    "ms": s * 1e3, "median_ms": statistics.median(ts) * 1e3, "speedup_vs_bf16": base / s,
                    "speedup_vs_avx2": None if avx2 is None else min(avx2) / s,
                    "median_speedup_vs_bf16": statistics.median(times["bf16 F.linear"]) / statistics.median(ts),
                    "cpu_ms": None if cpu_s is None else cpu_s * 1e3,
                    "cpu_speedup_vs_bf16": None if cpu_s is None else min(cpu["bf16 F.linear"]) / cpu_s,
                    "weight_gb_s": nbytes / (s if cpu_s is None else cpu_s) / 1e9, "read_bandwidth_gb_s": bandwidth,
                    "fraction_of_read_bandwidth": nbytes / (s if cpu_s is None else cpu_s) / 1e9 / bandwidth,
                })
            print(f"{out}x{n} {threads}t {label}: " + ", ".join(f"{k} {min(v) * 1e3:.2f} ms" for k, v in times.items()),
                  flush=True)
    return rows


def write(rows: list[dict], doc: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**doc, "rows": rows}, indent=2) + "\n")
    table = markdown_table(
        ["layer (out x in)", "threads", "phase", "format", "bits/weight", "ms (min)", "x bf16 (min)", "x AVX2 (min)",
         "ms (median)", "x bf16 (median)", "CPU ms", "x bf16 (CPU)", "weights GB/s", "of read bandwidth"],
        [[r["shape"], r["threads"], r["phase"], r["format"], f"{r['bits_per_weight']:.2f}", f"{r['ms']:.2f}",
          f"{r['speedup_vs_bf16']:.2f}", "-" if r.get("speedup_vs_avx2") is None else f"{r['speedup_vs_avx2']:.2f}",
          f"{r['median_ms']:.2f}", f"{r['median_speedup_vs_bf16']:.2f}",
          "-" if r["cpu_ms"] is None else f"{r['cpu_ms']:.2f}",
          "-" if r["cpu_speedup_vs_bf16"] is None else f"{r['cpu_speedup_vs_bf16']:.2f}",
          f"{r['weight_gb_s']:.1f}", f"{r['fraction_of_read_bandwidth']:.0%}"]
         for r in rows],
    )
    m = doc["machine"]
    bw = {t: v for t, v in doc["read_bandwidth_gb_s"].items()}
    md = (f"# Packed-weight kernels vs bf16 F.linear (LLaMA-2-7B layer shapes)\n\n{table}\n\n"
          f"Protocol: {doc['protocol']}\n\n"
          f"Streaming read bandwidth (GB/s) by threads: {bw}. Kernels: {doc['kernels']}.\n\n"
          f"Machine: {machine_line(m)}; load average "
          f"{doc['load_average']['before'][0]:.2f} before, {doc['load_average']['after'][0]:.2f} after "
          f"(other processes share the cores: compare rows of one run, not across runs). Commit {doc['commit']}.\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=15, help="decode rounds (prefill: a fifth, at least 3)")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma separated")
    ap.add_argument("--out", default="kernels")
    phase = ap.add_mutually_exclusive_group()
    phase.add_argument("--no-prefill", action="store_true", help="decode only (many rounds on a loaded machine)")
    phase.add_argument("--no-decode", action="store_true", help="prefill only")
    args = ap.parse_args()
    if cpu_kernels() is None:
        sys.exit("the compiled CPU kernels are unavailable here (no AVX2, no compiler, or SQLLM_KERNELS=0)")
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        out, n = (int(v) for v in shape.split("x"))
        rows += measure_shape(out, n, args.threads, args.reps, g, prefill=not args.no_prefill,
                              decode=not args.no_decode)
    bandwidth = {str(t): next(r["read_bandwidth_gb_s"] for r in rows if r["threads"] == t) for t in args.threads}
    prefill = "no prefill" if args.no_prefill else f"prefill = {PREFILL} tokens ({max(3, args.reps // 5)} rounds)"
    decode = "no decode" if args.no_decode else f"decode = 1 token ({args.reps} rounds)"
    doc = {
        "protocol": (f"QuantLinear forward with bf16 activations vs F.linear with a bf16 weight; {decode}, "
                     f"{prefill}; each round "
                     f"times every variant once in a shuffled order; speedups from the minimum wall time "
                     f"(median columns alongside; CPU ms = the calling thread's CPU time, 1 thread only); GB/s = "
                     f"packed bytes (bf16: 2 bytes/weight) per call / minimum time (CPU time at 1 thread, wall time "
                     f"at 2), as for the streaming read."),
        "kernels": (f"sqllm_cpu, {cpu_kernels().isa()} decode kernels (AVX2 rows alongside where AVX-512 runs), "
                    f"{'bf16' if cpu_kernels().prefill_in_bf16() else 'fp32'} prefill" if kernels_enabled() else "none"),
        "read_bandwidth_gb_s": bandwidth,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "machine": machine_info(), "commit": git_commit(str(ROOT)),
    }
    write(rows, doc, args.out)
