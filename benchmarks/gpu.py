"""Triton kernels for packed weights against fp16 on LLaMA-2-7B-shaped layers, and end-to-end decode.

    python benchmarks/gpu.py                       # CUDA machine: results/gpu.{json,md}
    python benchmarks/gpu.py --tiny --out gpu-tiny # tiny shapes on CPU under Triton's interpreter (CI)

Per layer ``[out, in]`` (4096x4096: q/k/v/o, 11008x4096: gate/up, 4096x11008: down) and per packed layout,
the time of ``x @ W^T`` at decode batches 1, 4, 16 and a 512-token prefill, against fp16
``torch.matmul``; the ratio (fp16 time / packed time) and the achieved memory bandwidth (bytes of the
packed tensors, x and y over the time) against the device's peak. The packed product is the Triton
implementation of the ``torch.ops.sqllm`` ops (:mod:`sqllm.nn.kernels.triton_ops`, forced with
``SQLLM_KERNELS=triton``), parts and outliers composed as QuantLinear composes them. Packed tensors are
random bits with the layout's exact shapes (speed does not depend on the values). End to end: greedy
decode tokens/s of a random 7B-shaped LLaMA in fp16 and with every block linear replaced by a packed
QuantLinear, HF eager forward with KV cache, batch 1.

On CUDA, layer times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``: no launch
overhead); under the interpreter they are wall-clock seconds of one call and say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

# None of these imports Triton: the kernels module is imported on the first product, after main() has
# chosen the interpreter or not.
from sqllm.formats.layouts import LayerMeta, group_columns, tensor_specs, validate_tensors
from sqllm.nn.kernels import triton_ops, triton_path
from sqllm.nn.qlinear import QuantLinear, replace_linear
from sqllm.report import git_commit, machine_info, markdown_table


@dataclass(frozen=True)
class Layout:
    """A packed layout to time. mixed: ``((bits, share of groups), ...)`` for SliM-LLM mixed precision."""

    name: str
    kind: str
    bits: int
    group_size: int | None = None
    mixed: tuple[tuple[int, float], ...] | None = None
    sparse_pct: float = 0.0


LAYOUTS = [
    Layout("SqueezeLLM LUT 2-bit", "lut", 2),
    Layout("SqueezeLLM LUT 3-bit", "lut", 3),
    Layout("SqueezeLLM LUT 4-bit", "lut", 4),
    Layout("SqueezeLLM LUT 3-bit + 0.45% sparse", "lut", 3, sparse_pct=0.45),
    Layout("uniform 2-bit g64", "uniform", 2, 64),
    Layout("uniform 3-bit g128", "uniform", 3, 128),
    Layout("GPTQ uniform 4-bit g128", "uniform", 4, 128),
    Layout("uniform 8-bit g128", "uniform", 8, 128),
    Layout("SliM-LLM mixed 1/2/3-bit g128 (2-bit mean)", "uniform", 3, 128, mixed=((1, 0.25), (2, 0.5), (3, 0.25))),
]
E2E_LAYOUTS = ["SqueezeLLM LUT 3-bit", "GPTQ uniform 4-bit g128"]
FULL = dict(shapes=[(4096, 4096), (11008, 4096), (4096, 11008)], batches=[1, 4, 16], prefill=512,
            model=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
            prompt=16, steps=64, layouts=E2E_LAYOUTS)
# Under the interpreter: one small layer whose sides are not tile multiples, a 2-block model.
TINY = dict(shapes=[(48, 172)], batches=[1, 4, 16], prefill=32,
            model=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128),
            prompt=4, steps=2, layouts=E2E_LAYOUTS[:1])
BLOCK_LINEARS = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # per LLaMA-2-7B block


def random_packed(layout: Layout, out: int, n: int, device: torch.device, gen: torch.Generator):
    """``(LayerMeta, tensors)``: random packed tensors of ``layout`` for a ``[out, n]`` weight, checked
    against the layout table. Codes are random words; tables small random fp16; outliers evenly spread
    (one per ``n / nnz_row`` columns, at a random offset) with ``sparse_pct`` % of each row."""
    g = layout.group_size
    n_groups = -(-n // g) if g else 0
    group_bits = mixed_cols = None
    if layout.mixed:
        # Widths by share of groups, in a seeded random order; the mean width is the layout's name.
        counts = [round(share * n_groups) for _, share in layout.mixed]
        counts[-1] = n_groups - sum(counts[:-1])
        widths = torch.cat([torch.full((c,), b, dtype=torch.int64) for (b, _), c in zip(layout.mixed, counts)])
        group_bits = widths[torch.randperm(n_groups, generator=torch.Generator().manual_seed(0))]
        col_bits = group_bits.repeat_interleave(g)[:n]
        mixed_cols = tuple((b, int((col_bits == b).sum())) for b, _ in layout.mixed if int((col_bits == b).sum()))
    nnz_row = round(layout.sparse_pct / 100 * n)
    meta = LayerMeta(kind=layout.kind, shape=(out, n), bits=layout.bits, group_size=g, mixed_cols=mixed_cols,
                     nnz=nnz_row * out, sparse_dtype="float16" if nnz_row else None)
    t = {}
    for name, spec in tensor_specs(meta).items():
        if spec.dtype == torch.int32 and name.startswith("qweight"):
            t[name] = torch.randint(-2**31, 2**31, spec.shape, dtype=torch.int32, device=device, generator=gen)
    if layout.kind == "lut":
        t["lut"] = (torch.randn(out, 1 << layout.bits, device=device, generator=gen) * 0.02).half()
    else:
        t["scales"] = (torch.rand(out, n_groups, device=device, generator=gen) * 0.01 + 1e-3).half()
        t["zeros"] = torch.full((out, n_groups), (1 << layout.bits) / 2, device=device).half()
    if group_bits is not None:
        t["group_bits"] = group_bits.to(torch.int8).to(device)
    if nnz_row:
        stride = n // nnz_row
        t["sp_crow"] = (torch.arange(out + 1, device=device) * nnz_row).to(torch.int32)
        offsets = torch.randint(0, stride, (out, nnz_row), device=device, generator=gen)
        t["sp_col"] = (torch.arange(nnz_row, device=device) * stride + offsets).flatten().to(torch.int32)
        t["sp_val"] = (torch.randn(out * nnz_row, device=device, generator=gen) * 0.1).half()
    validate_tensors(t, "", meta)
    return meta, t


def packed_product(meta: LayerMeta, t: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``x [m, in] -> x @ W^T [m, out]`` float32 through the ops' Triton implementations; the index
    tensors of mixed-precision parts are built here, once, as QuantLinear caches them."""
    if meta.kind == "lut":
        dense = [lambda x: triton_ops.lut_mm(x, t["qweight"], t["lut"], meta.bits, meta.shape[1])]
    else:
        G = meta.group_size
        device = t["scales"].device
        if meta.mixed_cols is None:
            parts = [("qweight", meta.bits, None, torch.arange(meta.n_groups, device=device), meta.shape[1])]
        else:
            gb = t["group_bits"].long()
            parts = [(f"qweight_b{b}", b, group_columns(gb, G, meta.shape[1], b), torch.nonzero(gb == b).flatten(), c)
                     for b, c in meta.mixed_cols]
        dense = [
            lambda x, q=q, b=b, cols=cols, gid=gid, c=c: triton_ops.uniform_mm(
                x if cols is None else x[:, cols], t[q], t["scales"], t["zeros"], gid, G, b, c)
            for q, b, cols, gid, c in parts
        ]

    def product(x: Tensor) -> Tensor:
        y = dense[0](x)
        for f in dense[1:]:
            y = y + f(x)
        if meta.nnz:
            y = y + triton_ops.csr_mm(x, t["sp_crow"], t["sp_col"], t["sp_val"])
        return y

    return product


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call: CUDA-graph replays on CUDA; one call under the interpreter (nothing to warm)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=50) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_bandwidth(device: torch.device) -> float | None:
    """Peak DRAM bytes/s from the device properties (double data rate), None off CUDA."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    return 2 * p.memory_bus_width / 8 * p.memory_clock_rate * 1e3


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_rows(cfg: dict, device: torch.device, gen: torch.Generator) -> list[dict]:
    """One row per (shape, tokens, layout), the fp16 baseline first for each (shape, tokens)."""
    rows = []
    for out, n in cfg["shapes"]:
        w16 = (torch.randn(out, n, device=device, generator=gen) * 0.02).half()
        packed = [(layout, *random_packed(layout, out, n, device, gen)) for layout in LAYOUTS]
        for m in cfg["batches"] + [cfg["prefill"]]:
            x = torch.randn(m, n, device=device, generator=gen).half()
            y_bytes = m * out * 4
            base = seconds(lambda x=x, w16=w16: torch.matmul(x, w16.T), device)
            rows.append(dict(shape=[out, n], tokens=m, layout="fp16 torch.matmul", seconds=base,
                             bytes=nbytes(w16, x) + m * out * 2, ratio=1.0))
            for layout, meta, t in packed:
                product = packed_product(meta, t)
                s = seconds(lambda product=product, x=x: product(x), device)
                rows.append(dict(shape=[out, n], tokens=m, layout=layout.name, seconds=s,
                                 bytes=nbytes(x, *t.values()) + y_bytes, ratio=base / s))
            print(f"[{out}x{n}] m={m}: " + ", ".join(f"{r['layout']} {r['ratio']:.2f}x" for r in rows[-len(LAYOUTS):]),
                  flush=True)
    return rows


def linears_per_token(rows: list[dict], layers: int) -> list[dict]:
    """Batch-1 time of a whole 7B model's block linears (sum of the measured layers per block, times
    ``layers``), per layout, from the layer rows; empty unless every 7B shape was measured."""
    one = {(tuple(r["shape"]), r["layout"]): r["seconds"] for r in rows if r["tokens"] == 1}
    if {s for s, _ in one} != set(BLOCK_LINEARS):
        return []
    names = ["fp16 torch.matmul"] + [l.name for l in LAYOUTS]
    per = {name: layers * sum(k * one[(s, name)] for s, k in BLOCK_LINEARS.items()) for name in names}
    return [dict(layout=name, seconds=s, ratio=per["fp16 torch.matmul"] / s) for name, s in per.items()]


def random_llama(model_cfg: dict, device: torch.device):
    """A random LLaMA of ``model_cfg``'s shape in fp16 on ``device``."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**model_cfg, max_position_embeddings=4096)
    with torch.device(device):
        model = tf.LlamaForCausalLM._from_config(config, torch_dtype=torch.float16)
    return model.eval()


def quantize_randomly(model: torch.nn.Module, layout: Layout, device: torch.device, gen: torch.Generator) -> None:
    """Replace every block linear by a QuantLinear holding random packed tensors of ``layout``."""
    names = [name for name, mod in model.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)]
    for name in names:
        linear = model.model.layers.get_submodule(name)
        meta, t = random_packed(layout, linear.out_features, linear.in_features, device, gen)
        q = QuantLinear(meta, None, device="meta")
        q.load_state_dict(t, assign=True)
        replace_linear(model.model.layers, name, q)


def decode_tok_s(model: torch.nn.Module, prompt: int, steps: int, device: torch.device) -> float:
    """Tokens/s of a greedy ``generate`` of ``steps`` tokens after a ``prompt``-token prompt at batch 1
    (KV cache, the prompt's prefill included, as ``sqllm bench`` measures)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.arange(prompt, device=device)[None] % model.config.vocab_size
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        sync()
    return (out.shape[1] - prompt) / (time.perf_counter() - start)


def e2e_rows(cfg: dict, device: torch.device, gen: torch.Generator) -> list[dict]:
    """fp16 then each packed layout of ``cfg['layouts']`` (one model, re-quantized each time)."""
    rows = []
    for name in ["fp16"] + cfg["layouts"]:
        model = random_llama(cfg["model"], device)
        if name != "fp16":
            quantize_randomly(model, next(l for l in LAYOUTS if l.name == name), device, gen)
        if device.type == "cuda":
            decode_tok_s(model, cfg["prompt"], 1, device)  # warm-up: compiles every kernel variant
            tok_s = decode_tok_s(model, cfg["prompt"], cfg["steps"], device)
        else:
            # The ops' CPU implementations are the compiled kernels once any caller in this process
            # loaded them (SQLLM_KERNELS is read then); the scoped registration sends them to Triton.
            with triton_path():
                tok_s = decode_tok_s(model, cfg["prompt"], cfg["steps"], device)
        block_bytes = sum(nbytes(*m.buffers()) + nbytes(*m.parameters(recurse=False))
                          for m in model.model.layers.modules() if not list(m.children()))
        rows.append(dict(model=name, decode_tok_s=tok_s, block_bytes=block_bytes))
        print(f"e2e {name}: {tok_s:.2f} tok/s", flush=True)
        del model
    for r in rows:
        r["ratio"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows


def markdown(doc: dict) -> str:
    peak = doc["peak_bandwidth_Bps"]
    unit = "s" if doc["interpreted"] else "µs"
    scale = 1.0 if doc["interpreted"] else 1e6
    layer = markdown_table(
        ["layer [out, in]", "tokens", "layout", f"time ({unit})", "fp16 / packed", "GB/s", "% of peak"],
        [[f"{r['shape'][0]}x{r['shape'][1]}", r["tokens"], r["layout"], f"{r['seconds'] * scale:.2f}",
          f"{r['ratio']:.2f}", f"{r['bytes'] / r['seconds'] / 1e9:.1f}",
          f"{100 * r['bytes'] / r['seconds'] / peak:.0f}" if peak else "-"] for r in doc["layers"]],
    )
    e2e = markdown_table(["model", "decode tok/s", "vs fp16", "block weights MiB"],
                         [[r["model"], f"{r['decode_tok_s']:.2f}", f"{r['ratio']:.2f}", f"{r['block_bytes'] / 2**20:.1f}"]
                          for r in doc["e2e"]])
    parts = [f"# Triton kernels vs fp16 ({doc['device']})\n"]
    if doc["interpreted"]:
        parts.append("**Tiny shapes under Triton's CPU interpreter: the times exercise the code path and say "
                     "nothing about GPU speed.**\n")
    parts += [f"## Layers\n\n{layer}\n"]
    if doc["linears_per_token"]:
        parts.append("## All block linears of a 7B model per decoded token (batch 1, from the layer times)\n\n" +
                     markdown_table(["layout", "ms/token", "fp16 / packed"],
                                    [[r["layout"], f"{r['seconds'] * 1e3:.3f}", f"{r['ratio']:.2f}"]
                                     for r in doc["linears_per_token"]]) + "\n")
    parts.append(f"## End to end\n\n{e2e}\n\n{doc['protocol']['e2e']}\n")
    m = doc["machine"]
    parts.append(f"Protocol: {doc['protocol']['layers']}\n\nMachine: {m['cpu']}, GPU {m['cuda']}, torch {m['torch']}, "
                 f"triton {doc['triton']}; load average {doc['load_average'][0]:.2f}. Commit {doc['commit']}.\n")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    ap.add_argument("--out", default=None, help="result files results/OUT.{json,md} (default gpu or gpu-tiny)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    args = ap.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, on their first use
    os.environ["SQLLM_KERNELS"] = "triton"  # the packed products must be Triton's (error if it is missing)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (or --tiny for the interpreter)")
    import triton

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = TINY if args.tiny else FULL
    gen = torch.Generator(device).manual_seed(0)
    load = os.getloadavg()
    layers = layer_rows(cfg, device, gen)
    doc = {
        "protocol": {
            "layers": (f"x @ W^T for layers {cfg['shapes']} at {cfg['batches']} tokens (decode) and "
                       f"{cfg['prefill']} (prefill); fp16 x; packed = Triton ops (output float32); "
                       + ("CUDA-graph replays (triton.testing.do_bench_cudagraph)" if not args.tiny
                          else "one interpreted call")),
            "e2e": (f"Random LLaMA {cfg['model']} in fp16; packed models replace every block linear "
                    f"(embeddings, lm_head stay fp16). {cfg['prompt']}-token prompt, then {cfg['steps']} "
                    "tokens generated greedily at batch 1 with HF's KV cache (prefill included), eager (no CUDA "
                    "graphs: per-token launch overhead counts for both)."),
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter",
        "interpreted": args.tiny,
        "peak_bandwidth_Bps": peak_bandwidth(device),
        "triton": triton.__version__,
        "layers": layers,
        "linears_per_token": linears_per_token(layers, cfg["model"]["num_hidden_layers"]),
        "e2e": e2e_rows(cfg, device, gen),
        "machine": machine_info(),
        "commit": git_commit(str(ROOT)),
        "load_average": load,
    }
    name = args.out or ("gpu-tiny" if args.tiny else "gpu")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.results / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
