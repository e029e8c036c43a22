"""Collect the perplexity tables of ppl.py, squeezellm.py and slim.py into one markdown table
(``results/summary.md``), the one the README shows.

    python benchmarks/summary.py
"""

from __future__ import annotations

import json

from common import RESULTS, markdown_table


def main() -> None:
    rows, seen = [], set()
    windows = set()
    for name in ("ppl", "squeezellm", "slim"):
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            if r["label"] in seen:
                continue
            seen.add(r["label"])
            windows.add(r["windows"])
            rows.append([r["label"], f"{r['bits_per_weight']:.3f}", f"{r['perplexity']:.2f}", f"results/{name}.md"])
    md = markdown_table(["SmolLM2-135M, WikiText-2 test", "bits/weight (linears)", "perplexity", "source"], rows)
    md += (f"\n\nPerplexity over the first {'/'.join(map(str, sorted(windows)))} windows of 2048 tokens "
           f"(GPTQ protocol); lower is better.\n")
    (RESULTS / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
