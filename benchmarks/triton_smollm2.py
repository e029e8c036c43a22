"""Whole packed SmolLM2-135M forwards through the Triton kernels against the pure-torch ops (issue 15's
acceptance check), for SqueezeLLM 3-bit + 0.45% sparse, SliM-LLM 2-bit g64 and GPTQ 4-bit g64.

    python benchmarks/triton_smollm2.py     # CUDA if present, else CPU tensors under Triton's interpreter

The checkpoints are made beforehand with the CLI and a small calibration (the check is about the
kernels, not quality); ``RECIPES`` lists the commands. Each is loaded as saved (``smollm2-135m``,
read from its GGUF file, computes in float32 with fp16 embeddings; tables and scales are float16), and
the logits of the first 1 and 16 tokens of the WikiText-2 test text are computed twice in one process with
``SQLLM_KERNELS=triton``: the ops' pure-torch implementation (:func:`sqllm.nn.kernels.torch_path`, what
``SQLLM_KERNELS=0`` runs) and the Triton implementations (:func:`sqllm.nn.kernels.triton_path`). Every
op call is counted on both sides, so a Triton forward that fell back to torch would show. The error is
relative per token position, ``|got_t - ref_t| / |ref_t|`` over the vocabulary, and its maximum over
positions must stay under 1e-3. Beside it, the same measure between float32 and float64 forwards of the
dequantized model shows how far float32 round-off alone moves that model's logits (low-bit models
amplify it: the SliM-LLM 2-bit one by far the most). Under the interpreter a forward takes tens of seconds to minutes.
Writes results/triton-smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sqllm.api import load_quantized
from sqllm.data import eval_tokens
from sqllm.nn.kernels import ops, torch_path, triton_path
from sqllm.nn.qlinear import QuantLinear
from sqllm.report import git_commit, machine_info, markdown_table

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = "--calib /work/shared/data/wikitext-2/wiki.valid.tokens --nsamples 4 --calib-seqlen 256"
# (label, checkpoint folder under --ckpt, the command that makes it)
RECIPES = [
    ("SqueezeLLM 3-bit + 0.45% sparse", "sq3-sparse",
     f"sqllm quantize smollm2-135m --method squeezellm --bits 3 --sensitive 0.05 --outliers 0.4 {CALIB}"),
    ("SliM-LLM 2-bit g64", "slim2-g64", f"sqllm quantize smollm2-135m --method slim --bits 2 --group-size 64 {CALIB}"),
    ("GPTQ 4-bit g64", "gptq4-g64", f"sqllm quantize smollm2-135m --method gptq --bits 4 --group-size 64 {CALIB}"),
]
OPS = ("lut_mm", "uniform_mm", "csr_mm")
TOKENS = (1, 16)
LIMIT = 1e-3


@contextlib.contextmanager
def counting(module: object, names: list[str], calls: Counter) -> Iterator[None]:
    """Within the block, each call of ``module.<name>`` adds one to ``calls[op]`` (``op`` the name
    without its ``_torch`` suffix); the attributes are restored on exit."""
    saved = {name: getattr(module, name) for name in names}

    def wrap(name: str):
        real = saved[name]
        return lambda *a: calls.update([name.removesuffix("_torch")]) or real(*a)

    try:
        for name in names:
            setattr(module, name, wrap(name))
        yield
    finally:
        for name, real in saved.items():
            setattr(module, name, real)


def forward(model: torch.nn.Module, ids: torch.Tensor, path: str) -> tuple[torch.Tensor, Counter, float]:
    """Logits ``[m, vocab]`` float32 through ``path`` ("torch" or "triton"), the op calls it made, seconds.
    The registrations name their functions when the block is entered, so the counters wrap first."""
    from sqllm.nn.kernels import triton_kernels

    calls: Counter = Counter()
    if path == "torch":
        scope = contextlib.ExitStack()
        scope.enter_context(counting(ops, [f"{op}_torch" for op in OPS], calls))
        scope.enter_context(torch_path())
    else:
        scope = contextlib.ExitStack()
        scope.enter_context(counting(triton_kernels, list(OPS), calls))
        scope.enter_context(triton_path())
    start = time.perf_counter()
    with scope, torch.no_grad():
        out = model(ids).logits[0].float()
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
    return out, calls, time.perf_counter() - start


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Errors of ``got`` against ``ref`` (``[m, vocab]``): per-position relative (max over positions),
    relative Frobenius over all, and the largest absolute difference."""
    diff = (got.double() - ref.double())
    per_position = diff.norm(dim=1) / ref.double().norm(dim=1)
    return dict(max_rel_error=float(per_position.max()), rel_error=float(diff.norm() / ref.double().norm()),
                max_abs_error=float(diff.abs().max()), max_abs_logit=float(ref.abs().max()))


def layouts(model: torch.nn.Module) -> dict:
    """What the packed linears hold: their count, the code widths of their parts (per kind), the
    outliers' total and share of the weights."""
    metas = [m.meta for m in model.modules() if isinstance(m, QuantLinear)]
    widths: dict[str, set[int]] = {}
    for meta in metas:
        parts = meta.mixed_cols or meta.mixed_rows or ((meta.bits, 0),)
        widths.setdefault(meta.kind, set()).update(b for b, _ in parts)
    nnz, weights = sum(m.nnz for m in metas), sum(m.shape[0] * m.shape[1] for m in metas)
    return dict(linears=len(metas), widths={k: sorted(v) for k, v in widths.items()}, outliers=nnz,
                outlier_pct=100 * nnz / weights)


def roundoff_floor(model: torch.nn.Module, tokens: torch.Tensor, counts: tuple[int, ...]) -> dict[int, float]:
    """Per token count, the max per-position relative error of a float32 forward against a float64 one,
    both with the dequantized weights (plain matmuls): how much float32 round-off alone moves this
    model's logits, the scale any two correct float32 paths may differ by. Leaves the model in float64
    with dense weights (call it last)."""
    for q in model.modules():
        if isinstance(q, QuantLinear):
            q.cache_dense_weight(torch.float32)
    with torch.no_grad():
        fp32 = {m: model(tokens[:, :m]).logits[0] for m in counts}
        model.double()  # the dense weights follow x's dtype in QuantLinear.forward
        return {m: compare(fp32[m], model(tokens[:, :m]).logits[0])["max_rel_error"] for m in counts}


def check(ckpt: Path, label: str, tokens: torch.Tensor, device: str) -> list[dict]:
    """One row per token count for the checkpoint at ``ckpt``."""
    model, _ = load_quantized(ckpt, device=device)
    # The activations' dtype is the norms' (the loader keeps it; embeddings may be stored in fp16).
    dtype = str(model.model.norm.weight.dtype).removeprefix("torch.")
    held = layouts(model)
    rows = []
    for m in TOKENS:
        ids = tokens[:, :m].to(device)
        ref, ref_calls, torch_s = forward(model, ids, "torch")
        got, triton_calls, triton_s = forward(model, ids, "triton")
        if triton_calls != ref_calls or not triton_calls:
            raise RuntimeError(f"{label}: the Triton forward made {dict(triton_calls)} op calls, torch "
                               f"{dict(ref_calls)}; some products did not go through Triton")
        err = compare(got, ref)
        rows.append(dict(model=label, checkpoint=str(ckpt), tokens=m, dtype=dtype, layouts=held, **err,
                         holds=err["max_rel_error"] < LIMIT, triton_calls=dict(triton_calls),
                         torch_seconds=torch_s, triton_seconds=triton_s))
        print({k: v for k, v in rows[-1].items() if k not in ("checkpoint", "layouts")}, flush=True)
    floors = roundoff_floor(model, tokens.to(device), TOKENS)
    for r in rows:
        r["fp32_vs_fp64_max_rel_error"] = floors[r["tokens"]]
    print({"fp32 vs fp64": floors}, flush=True)
    return rows


def describe(held: dict) -> str:
    """``layouts()`` in a few words: "210: LUT 3-bit, 0.45% outliers"."""
    kinds = "; ".join(f"{'LUT' if k == 'lut' else 'uniform'} {'/'.join(map(str, b))}-bit"
                      for k, b in held["widths"].items())
    return f"{held['linears']}: {kinds}" + (f", {held['outlier_pct']:.2f}% outliers" if held["outliers"] else "")


def markdown(doc: dict) -> str:
    p = doc["protocol"]
    where = "CPU tensors, Triton interpreter" if p["interpreted"] else p["device"]
    table = markdown_table(
        ["model", "packed linears", "tokens", "max rel. error (per position)", "rel. error (all)", "max abs error",
         "max abs logit", f"< {LIMIT:g}", "fp32 vs fp64 (dense)", "Triton op calls", "torch s", "Triton s"],
        [[r["model"], describe(r["layouts"]), r["tokens"], f"{r['max_rel_error']:.2e}", f"{r['rel_error']:.2e}",
          f"{r['max_abs_error']:.2e}", f"{r['max_abs_logit']:.1f}", "yes" if r["holds"] else "NO",
          f"{r['fp32_vs_fp64_max_rel_error']:.2e}",
          ", ".join(f"{k} {v}" for k, v in sorted(r["triton_calls"].items())),
          f"{r['torch_seconds']:.2f}", f"{r['triton_seconds']:.1f}"] for r in doc["rows"]])
    recipes = "\n".join(f"- {label}: `{cmd} --output {p['checkpoints']}/{folder}`" for label, folder, cmd in RECIPES)
    return (f"# Packed SmolLM2-135M forwards: Triton kernels vs the torch ops ({where})\n\n{table}\n\n"
            f"Protocol: {p['compare']}; limit {LIMIT:g} on the largest per-position relative error. "
            f"'fp32 vs fp64 (dense)': {p['floor']}. "
            f"Tokens: {p['tokens']}. Activations in {', '.join(sorted({r['dtype'] for r in doc['rows']}))}. "
            f"Seconds are wall time of one forward "
            f"(the interpreter's, which says nothing about GPU speed). Checkpoints (small calibration: this "
            f"checks the kernels, not quality):\n{recipes}\n\n"
            f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, torch {doc['machine']['torch']}, "
            f"Triton {doc['triton']}; load average {doc['load_average'][0]:.2f} at the start. "
            f"Total {doc['seconds']:.0f} s. Commit {doc['commit']}.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, default=Path("/work/ckpt"), help="folder of the checkpoints (see RECIPES)")
    ap.add_argument("--out", default="triton-smollm2", help="result files results/OUT.{json,md}")
    args = ap.parse_args()
    missing = [(folder, cmd) for _, folder, cmd in RECIPES if not (args.ckpt / folder).is_dir()]
    if missing:
        folder, cmd = missing[0]
        print(f"error: no checkpoint {args.ckpt / folder}; make it with: {cmd} --output {args.ckpt / folder}",
              file=sys.stderr)
        sys.exit(2)
    if not WIKI_TEST.is_file():
        print(f"error: no evaluation text at {WIKI_TEST}", file=sys.stderr)
        sys.exit(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Triton computes on every device (CPU tensors through the interpreter, read when the kernels module
    # is imported, which happens on the first Triton product below).
    os.environ["SQLLM_KERNELS"] = "triton"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    from transformers import AutoTokenizer

    load = os.getloadavg()
    start = time.perf_counter()
    tokens = eval_tokens(AutoTokenizer.from_pretrained(args.ckpt / RECIPES[0][1]), str(WIKI_TEST))
    rows = [row for label, folder, _ in RECIPES for row in check(args.ckpt / folder, label, tokens, device)]
    doc = dict(protocol=dict(tokens=f"first {list(TOKENS)} tokens of {WIKI_TEST.name}",
                             compare=("logits through the Triton implementations (kernels.triton_path) vs the "
                                      "ops' pure-torch implementation (kernels.torch_path, = SQLLM_KERNELS=0), "
                                      "one process; error per position |got - ref| / |ref| over the vocabulary"),
                             floor=("the same error measure between float32 and float64 forwards of the model "
                                    "with its dequantized weights: what float32 round-off alone does to its logits"),
                             limit=LIMIT, device=device, interpreted=device == "cpu", checkpoints=str(args.ckpt)),
               rows=rows, holds=all(r["holds"] for r in rows), seconds=time.perf_counter() - start,
               triton=triton.__version__, machine=machine_info(), commit=git_commit(str(ROOT)), load_average=load)
    results = ROOT / "benchmarks" / "results"
    (results / f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (results / f"{args.out}.md").write_text(markdown(doc))
    print(markdown(doc))
    sys.exit(0 if doc["holds"] else 1)


if __name__ == "__main__":
    main()
