"""Collect the results of the benchmarks into ``results/summary.md``, the tables the README shows: the
perplexity rows of ppl.py, squeezellm.py and slim.py (10 windows), the 40-window acceptance comparisons
of acceptance.py, and the inference rows of inference.py, each where its result file exists.

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
    md += acceptance() + inference()
    (RESULTS / "summary.md").write_text(md)
    print(md)


def acceptance() -> str:
    path = RESULTS / "acceptance.json"
    if not path.is_file():
        return ""
    doc = json.loads(path.read_text())
    rows = [[f"{v['better']} < {v['worse']}", f"{v['ppl_better']:.2f} < {v['ppl_worse']:.2f}",
             "yes" if v["holds"] else "**no**"] for v in doc["comparisons"]]
    fp = next(r for r in doc["rows"] if r["method"] == "fp32")
    return (f"\nThe issues' comparisons over the first {fp['windows']} windows (results/acceptance.md; "
            f"fp32: {fp['perplexity']:.2f}):\n\n" + markdown_table(["claim", "perplexity", "holds"], rows) + "\n")


def inference() -> str:
    """The quiet-machine run of inference.py at every core when there is one, else the default run."""
    path = next((p for p in (RESULTS / "inference-2threads.json", RESULTS / "inference.json") if p.is_file()), None)
    if path is None:
        return ""
    doc = json.loads(path.read_text())
    rows = [[r["label"], r["path"], f"{r['bits_per_weight']:.2f}", f"{r['disk_bytes'] / 2**20:.0f}",
             f"{r['peak_rss_mb']:.0f}", f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}"] for r in doc["rows"]]
    p = doc["protocol"]
    return (f"\nInference (results/{path.stem}.md; load average {doc['load_average']['before'][0]:.2f} at the start; prefill {p['prefill_tokens']} tokens, decode {p['decode_tokens']} "
            f"tokens at batch 1, {p['threads']} thread(s), {doc['machine']['cpu']}):\n\n"
            + markdown_table(["model", "compute path", "bits/weight", "disk MiB", "peak RSS MiB", "prefill tok/s",
                              "decode tok/s"], rows) + "\n")


if __name__ == "__main__":
    main()
