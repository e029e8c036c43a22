"""GPTQ and SliM-LLM (and SliM-LLM+) on SmolLM2-135M at group size 64, against RTN g64.

    python benchmarks/slim.py           # writes results/slim.json and results/slim.md
"""

from __future__ import annotations

import sys

from common import CALIB, run, write_report

# Each block is run twice (statistics, then quantized outputs) rather than once per sequential group:
# the CPU budget of this benchmark, applied to every Hessian method alike.
SEQ = {"true_sequential": False}
G = 64

if __name__ == "__main__":
    plus = "--no-plus" not in sys.argv
    rows = []
    for bits in (3, 2):
        rows.append(run(f"RTN {bits}-bit g64", "rtn", bits=bits, group_size=G))
        rows.append(run(f"GPTQ {bits}-bit g64", "gptq", bits=bits, group_size=G, **SEQ, **CALIB))
    # SliM-LLM's claim is strongest at 2 bits: measure it first when CPU time is short.
    for bits in (2, 3):
        rows.append(run(f"SliM-LLM {bits}-bit g64", "slim", bits=bits, group_size=G, **SEQ, **CALIB))
    if "--with-4bit" in sys.argv:
        rows.append(run("RTN 4-bit g64", "rtn", bits=4, group_size=G))
        rows.append(run("GPTQ 4-bit g64", "gptq", bits=4, group_size=G, **SEQ, **CALIB))
    if plus:
        rows.append(run("SliM-LLM+ 2-bit g64", "slim+", bits=2, group_size=G, lwc_samples=16, **SEQ, **CALIB))
    write_report("slim", "GPTQ and SliM-LLM: Hessian methods at group size 64", rows,
                 "SliM-LLM bits/weight counts its per-group bit map; 1-bit groups cost 1 bit plus their fp16 "
                 "scale and zero. Calibration windows are shared by every Hessian method.")
