"""Inference cost of packed SmolLM2-135M checkpoints against fp32 and bf16: bits per weight, size on disk,
peak resident memory, resident bytes of the quantized linears against their packed size, prefill and
decode tokens/s.

    python benchmarks/inference.py [--threads N] [--rounds R] [--out NAME]   # writes results/NAME.{json,md,png}
    python benchmarks/inference.py --checkpoint "SqueezeLLM 3-bit=DIR" ...     # measure existing packed folders

Packed rows run QuantLinear's ops with their registered CPU implementation (the compiled AVX2 kernels
where the CPU and compiler allow); one extra row runs SqueezeLLM 4-bit with ``SQLLM_KERNELS=0`` (the
pure-torch implementation of the ops) to show what the kernels buy, and one loads SqueezeLLM 3-bit with
``dtype=bfloat16`` (bf16 activations, norms and head: the bf16 prefill path of the kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from common import CALIB, MODEL, RESULTS, ROOT, WIKI_VALID
from sqllm import api
from sqllm.api import quantize, save_quantized
from sqllm.eval.bench import disk_bytes, measure, packed_linear_bytes
from sqllm.models import cache_dir, load_model, resolve_model_path
from sqllm.nn.kernels import cpu_kernels
from sqllm.report import git_commit, machine_info, machine_line, markdown_table

PREFILL, DECODE = 256, 32
TORCH_PATH_ROW = "SqueezeLLM 4-bit"  # also measured with the kernels off
BF16_ROW = "SqueezeLLM 3-bit"  # also loaded with dtype=bfloat16 (bf16 activations: the bf16 prefill path)
CHECKPOINTS = [
    ("SqueezeLLM 4-bit", "squeezellm", dict(bits=4)),
    ("SqueezeLLM 4-bit 0.45%", "squeezellm", dict(bits=4, sensitive_pct=0.05, outlier_pct=0.40)),
    ("SqueezeLLM 3-bit", "squeezellm", dict(bits=3)),
    ("SqueezeLLM 3-bit 0.45%", "squeezellm", dict(bits=3, sensitive_pct=0.05, outlier_pct=0.40)),
    ("SliM-LLM 2-bit g64", "slim", dict(bits=2, group_size=64, true_sequential=False, **CALIB)),
]


def checkpoint(label: str, method: str, options: dict) -> str:
    from squeezellm import fisher_file

    path = cache_dir() / "bench" / label.replace(" ", "_").replace("%", "pct")
    if not (path / "config.json").is_file():
        model, tok = load_model(MODEL)
        extra = {"fisher": fisher_file()} if method == "squeezellm" else {"calib": str(WIKI_VALID)}
        result = quantize(model, tok, method, **options, **extra)
        save_quantized(model, tok, result, path, overwrite=True)
    return str(path)


def plot(rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = [r["label"] + (" [torch path]" if "SQLLM_KERNELS" in r["path"] else "") for r in rows]
    for ax, key, title in zip(axes, ["decode_tok_s", "prefill_tok_s", "peak_rss_mb"],
                              ["decode tokens/s (batch 1)", f"prefill tokens/s ({PREFILL} tokens)", "peak RSS MiB"]):
        ax.barh(labels, [r[key] for r in rows], color=["#888" if "fp" in l or "bf16" in l else "#2a7" for l in labels])
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


def embedding_dtype(path: str) -> str:
    """Stored dtype of the token embeddings (tied with lm_head in SmolLM2) of a safetensors folder."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if "model.embed_tokens.weight" in st.keys():
                return str(st.get_slice("model.embed_tokens.weight").get_dtype())
    return "unknown"


def packed_row(label: str, path: str, threads: int, dtype: str = "float32") -> dict:
    r = measure(api.load_model, path, dtype=dtype, prefill=PREFILL, decode=DECODE, threads=threads)
    qc = json.loads(open(f"{path}/config.json").read())["quantization_config"]
    return {"label": label, **r, "disk_bytes": disk_bytes(path), "bits_per_weight": qc["bits_per_weight"]["total"],
            "bits_by_part": qc["bits_per_weight"], "packed_linear_bytes": packed_linear_bytes(path),
            "embedding_dtype": embedding_dtype(path)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every measurement")
    ap.add_argument("--out", default="inference", help="name of the result files under results/")
    ap.add_argument("--rounds", type=int, default=1, help="measure every row this many times (shuffled); keep the best")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                    help="measure an existing packed folder as row LABEL (then only the given rows are measured)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    base = resolve_model_path(MODEL)
    given = dict(c.split("=", 1) for c in args.checkpoint)
    unknown = set(given) - {label for label, _, _ in CHECKPOINTS}
    if unknown:
        ap.error(f"--checkpoint labels {sorted(unknown)} are not rows; rows are {[c[0] for c in CHECKPOINTS]}")
    module = cpu_kernels()
    kernel_path = f"{module.isa().upper()} kernels" if module is not None else "torch (no AVX2)"
    jobs: list[tuple[str, dict]] = [(label, {"dtype": dtype}) for dtype, label in (("float32", "fp32"), ("bfloat16", "bf16"))]
    for label, method, options in CHECKPOINTS:
        if given and label not in given:
            continue
        path = given.get(label) or checkpoint(label, method, options)
        jobs.append((label, {"path": path, "kernels": True}))
        if label == TORCH_PATH_ROW:
            jobs.append((label, {"path": path, "kernels": False}))
        if label == BF16_ROW:
            jobs.append((label, {"path": path, "kernels": True, "compute": "bfloat16"}))
    best: dict[int, dict] = {}
    order = random.Random(0)
    for _ in range(args.rounds):  # every round measures every row, in a shuffled order; keep each row's best
        for i in order.sample(range(len(jobs)), len(jobs)):
            label, job = jobs[i]
            if "dtype" in job:
                r = measure(api.load_model, base, dtype=job["dtype"], prefill=PREFILL, decode=DECODE, threads=args.threads)
                row = {"label": label, **r, "disk_bytes": disk_bytes(base),
                       "bits_per_weight": 32 if job["dtype"] == "float32" else 16, "path": "torch",
                       "embedding_dtype": job["dtype"]}
            else:
                if not job["kernels"]:
                    os.environ["SQLLM_KERNELS"] = "0"  # read by the spawned child
                compute = job.get("compute", "float32")
                row = {**packed_row(label, job["path"], args.threads, compute),
                       "path": (kernel_path if job["kernels"] else "torch (SQLLM_KERNELS=0)")
                       + (", bf16 activations" if compute == "bfloat16" else "")}
                os.environ.pop("SQLLM_KERNELS", None)
            print(label, row["path"], {k: row[k] for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb")}, flush=True)
            if i not in best or row["decode_tok_s"] > best[i]["decode_tok_s"]:
                best[i] = row
    rows = [best[i] for i in range(len(jobs))]
    doc = {"protocol": {"model": MODEL, "prefill_tokens": PREFILL, "decode_tokens": DECODE, "threads": args.threads,
                        "measure": "each model in a fresh process; one warm-up, then one timed prefill and "
                                   "one greedy generate of DECODE tokens with KV cache; every row measured "
                                   f"{args.rounds} time(s) in shuffled rounds, the best decode kept",
                        "checkpoints": {label: job.get("path") for label, job in jobs if "path" in job}},
           "load_average": {"before": load_before, "after": os.getloadavg()},
           "machine": machine_info(), "commit": git_commit(str(ROOT)), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    table = markdown_table(
        ["model", "compute path", "bits/weight (linears)", "embeddings + head", "disk MiB", "peak RSS MiB",
         "quantized linears resident / packed", "prefill tok/s", "decode tok/s"],
        [[r["label"], r["path"], f"{r['bits_per_weight']:.3f}", r["embedding_dtype"], f"{r['disk_bytes'] / 2**20:.1f}",
          f"{r['peak_rss_mb']:.0f}",
          f"{r['quantized_linear_bytes'] / r['packed_linear_bytes']:.3f}" if r.get("packed_linear_bytes") else "-",
          f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}"] for r in rows],
    )
    m = doc["machine"]
    md = (f"# Inference: packed checkpoints vs fp32 / bf16\n\n{table}\n\n"
          f"Protocol: {doc['protocol']['measure']}; prefill {PREFILL} tokens, decode {DECODE} tokens, batch 1. "
          f"Embeddings and lm_head are tied (28M of the 135M parameters); their stored dtype is a column.\n\n"
          f"Machine: {machine_line(m)}, {args.threads} thread(s) per measurement; "
          f"load average {load_before[0]:.2f} before, {doc['load_average']['after'][0]:.2f} after. "
          f"Commit {doc['commit']}.\n")
    (RESULTS / f"{args.out}.md").write_text(md)
    plot(rows, args.out)
    print(md)
