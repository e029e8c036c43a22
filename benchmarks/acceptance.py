"""The issues' acceptance comparisons at their full protocol: the first 40 windows of 2048 tokens.

The per-benchmark tables (ppl.py, squeezellm.py, slim.py) use 10 windows to fit this 2-core machine;
this script re-runs only the rows the issues compare, over 40 windows, and states each comparison with
its verdict:

* SqueezeLLM 4-bit and 3-bit dense-only below RTN per channel at the same bits; 3-bit 0.45% below
  3-bit dense-only (SqueezeLLM issue);
* SliM-LLM 2-bit below GPTQ 2-bit, SliM-LLM+ 2-bit below SliM-LLM 2-bit (SliM-LLM issues).

    python benchmarks/acceptance.py     # writes results/acceptance.{json,md}; cached runs are reused
"""

from __future__ import annotations

import json

import slim
import squeezellm
from common import PROTOCOL, RESULTS, ROOT, run
from sqllm.report import git_commit, machine_info, markdown_table

WINDOWS = 40
COMPARISONS = [  # (better, worse): the first must have the lower perplexity
    ("SqueezeLLM 4-bit dense-only", "RTN 4-bit per channel"),
    ("SqueezeLLM 3-bit dense-only", "RTN 3-bit per channel"),
    ("SqueezeLLM 3-bit 0.45% sparse", "SqueezeLLM 3-bit dense-only"),
    ("SliM-LLM 2-bit g64", "GPTQ 2-bit g64"),
    ("SliM-LLM+ 2-bit g64", "SliM-LLM 2-bit g64"),
]


def main() -> None:
    catalogue = {label: (method, opts) for label, method, opts in squeezellm.configs() + slim.configs()}
    catalogue["fp32 (dequantized Q4_1 GGUF)"] = (None, {})
    labels = ["fp32 (dequantized Q4_1 GGUF)"] + list(dict.fromkeys(l for pair in COMPARISONS for l in pair))
    rows = {}
    for label in labels:
        method, opts = catalogue[label]
        rows[label] = run(label, method, windows=WINDOWS, **opts)
    verdicts = [
        {"better": a, "worse": b, "ppl_better": rows[a]["perplexity"], "ppl_worse": rows[b]["perplexity"],
         "holds": rows[a]["perplexity"] < rows[b]["perplexity"]}
        for a, b in COMPARISONS
    ]
    protocol = {**PROTOCOL, "eval": PROTOCOL["eval"].replace("first 10 windows", f"first {WINDOWS} windows")}
    doc = {"protocol": protocol, "machine": machine_info(), "commit": git_commit(str(ROOT)),
           "rows": list(rows.values()), "comparisons": verdicts}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "acceptance.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    table = markdown_table(["configuration", "bits/weight", f"perplexity ({WINDOWS} windows)"],
                           [[r["label"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.3f}"] for r in rows.values()])
    checks = markdown_table(["claim", "perplexities", "holds"],
                            [[f"{v['better']} < {v['worse']}", f"{v['ppl_better']:.3f} < {v['ppl_worse']:.3f}",
                              "yes" if v["holds"] else "**no**"] for v in verdicts])
    md = (f"# Acceptance comparisons over {WINDOWS} windows\n\n{table}\n\n{checks}\n\n"
          f"Protocol: {protocol['eval']}; calibration: {protocol['calibration']}.\n"
          f"Commit {doc['commit']}.\n")
    (RESULTS / "acceptance.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
