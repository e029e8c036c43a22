"""Perplexity of SmolLM2-135M at full precision and with RTN (4/3-bit per channel, g128, g64; 2-bit g64).

    python benchmarks/ppl.py            # writes results/ppl.json and results/ppl.md
"""

from __future__ import annotations

from common import run, write_report

CONFIGS = [
    ("fp32 (dequantized Q4_1 GGUF)", None, {}),
    ("RTN 4-bit per channel", "rtn", {"bits": 4}),
    ("RTN 4-bit g128", "rtn", {"bits": 4, "group_size": 128}),
    ("RTN 4-bit g64", "rtn", {"bits": 4, "group_size": 64}),
    ("RTN 3-bit per channel", "rtn", {"bits": 3}),
    ("RTN 3-bit g128", "rtn", {"bits": 3, "group_size": 128}),
    ("RTN 3-bit g64", "rtn", {"bits": 3, "group_size": 64}),
    ("RTN 2-bit g64", "rtn", {"bits": 2, "group_size": 64}),
]

if __name__ == "__main__":
    rows = [run(label, method, **opts) for label, method, opts in CONFIGS]
    write_report("ppl", "Perplexity: full precision and RTN", rows,
                 "SmolLM2's weights already sit on a 4-bit block-32 grid (Q4_1), so 4-bit results flatter "
                 "every method; 576 = 4 x 128 + 64, so g128 has a partial last group.")
