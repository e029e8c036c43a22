"""Tables, JSON and run metadata: the only place (with the CLI) that prints."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from typing import Any

import torch


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(markdown_table(headers, rows))


def print_summary(summary: dict[str, Any]) -> None:
    """One table of a quantization run's bits per weight by part."""
    bpw = summary.get("bits_per_weight", {})
    rows = [[k, f"{v:.4f}"] for k, v in bpw.items()]
    print(f"{summary['method']}: {summary['linears']} linears, {summary['weights']:,} weights, "
          f"{summary['seconds']:.1f} s" + (f" -> {summary['output']}" if "output" in summary else ""))
    dense16 = summary.get("dense16") or {}
    if dense16.get("tensors"):
        print(f"kept dense in {dense16['dtype']}: {', '.join(dense16['tensors'])}")
    if "sparse_values" in summary:
        print(f"sparse: {summary['sparse_values']:,} values ({summary['sparse_pct']:.3f}%)")
    print_table(["part", "bits/weight"], rows)


def print_stages(summary: dict[str, Any]) -> None:
    """Wall time per stage and peak memory of a run (``summary["stages"]``, ``peak_rss_mib``)."""
    stages = summary.get("stages") or {}
    rows = [[k, f"{v:.1f}"] for k, v in stages.items()] + [["total", f"{summary.get('seconds', 0.0):.1f}"]]
    print_table(["stage", "seconds"], rows)
    line = f"peak memory: {summary.get('peak_rss_mib', 0.0) / 1024:.2f} GiB resident"
    if "peak_cuda_mib" in summary:
        line += f", {summary['peak_cuda_mib'] / 1024:.2f} GiB on the GPU"
    print(line)


def git_commit(path: str | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=path, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True, cwd=path)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_line(m: dict[str, Any]) -> str:
    """``"<cpu>, <cores> cores, torch <version>"`` of a :func:`machine_info` record, for result notes."""
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"


def machine_info() -> dict[str, Any]:
    """What a benchmark result needs to be read correctly: machine, threads, library versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_bench(res: dict[str, Any]) -> None:
    """One row per measured model of ``sqllm bench``: size, memory and speed."""
    rows = []
    for r in res["rows"]:
        bpw = r.get("bits_per_weight", {}).get("total")
        rows.append([
            r["model"], r.get("method", r["dtype"]), f"{bpw:.3f}" if bpw else "-",
            f"{r['disk_bytes'] / 2**20:.1f}" if r.get("disk_bytes") else "-",
            f"{r['peak_rss_mb']:.0f}", f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
        ])
    print_table(["model", "kind", "bits/weight", "disk MiB", "peak RSS MiB", "prefill tok/s", "decode tok/s"], rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_zeroshot(model_label: str, results: dict[str, Any]) -> None:
    """One markdown row per task: accuracy and normalized accuracy with their standard errors."""
    rows = [
        [model_label, task, _fmt(m.get("acc")), _fmt(m.get("acc_stderr")), _fmt(m.get("acc_norm")),
         _fmt(m.get("acc_norm_stderr")), m.get("samples", "-")]
        for task, m in results["tasks"].items()
    ]
    print_table(["model", "task", "acc", "acc stderr", "acc_norm", "acc_norm stderr", "samples"], rows)
