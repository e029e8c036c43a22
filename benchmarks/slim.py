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

def configs(plus: bool = True, with_4bit: bool = False) -> list[tuple[str, str, dict]]:
    """(label, method, options) of every row."""
    rows = [(f"RTN {b}-bit g64", "rtn", dict(bits=b, group_size=G)) for b in (3, 2)]
    # SliM-LLM's claim is strongest at 2 bits: measure it first when CPU time is short.
    rows += [(f"GPTQ {b}-bit g64", "gptq", dict(bits=b, group_size=G, **SEQ, **CALIB)) for b in (2, 3)]
    rows += [(f"SliM-LLM {b}-bit g64", "slim", dict(bits=b, group_size=G, **SEQ, **CALIB)) for b in (2, 3)]
    if with_4bit:
        rows += [("RTN 4-bit g64", "rtn", dict(bits=4, group_size=G)),
                 ("GPTQ 4-bit g64", "gptq", dict(bits=4, group_size=G, **SEQ, **CALIB))]
    if plus:
        rows.append(("SliM-LLM+ 2-bit g64", "slim+", dict(bits=2, group_size=G, lwc_samples=16, **SEQ, **CALIB)))
    return rows


if __name__ == "__main__":
    rows = []
    for label, method, options in configs("--no-plus" not in sys.argv, "--with-4bit" in sys.argv):
        rows.append(run(label, method, **options))
        # rewritten after every row, so that an interrupted run still leaves its finished rows
        write_report("slim", "GPTQ and SliM-LLM: Hessian methods at group size 64", rows,
                     "SliM-LLM bits/weight counts its per-group bit map; 1-bit groups cost 1 bit plus their fp16 "
                     "scale and zero. Calibration windows are shared by every Hessian method.")
