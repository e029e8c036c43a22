"""llama.cpp side by side with sqllm on SmolLM2-135M: speed at 2 threads and perplexity, in one run.

llama.cpp's own quantizer (through ``llama-cpp-python``, an optional benchmark dependency built from
source: ``pip install --no-binary llama-cpp-python llama-cpp-python``) turns an F32 GGUF of the same
weights sqllm starts from into Q4_0, Q4_K_M, Q3_K_M and IQ4_NL. The F32 GGUF is written here from the
bundled Q4_1 GGUF by dequantizing every tensor with ``gguf`` (``f32_gguf``): the exact values of sqllm's
fp32 model, so nobody re-quantizes Q4_1 blocks directly. Each format is measured next to sqllm packed
checkpoints of similar bits/weight (made with the ``sqllm`` CLI under ``--ckpt-dir`` when missing):

* prompt tokens/s (a 256-token prompt) and decode tokens/s (32 greedy tokens after an 8-token prompt,
  whose forward counts as in ``generate``), batch 1, ``--threads`` threads, best of ``--repeats`` rounds
  that each measure every model once (the machine is shared: a load swing then hits every row alike);
* perplexity with sqllm's protocol: the same token ids (SmolLM2's tokenizer, no BOS), non-overlapping
  2048-token windows of WikiText-2 test, logits from llama.cpp over each whole window;
* bits/weight of the quantized linears (the block matrices, as sqllm counts) and of the whole file.

    python benchmarks/llamacpp.py [--threads 2] [--windows 40] [--repeats 3]   # results/llamacpp.{json,md}
    python benchmarks/llamacpp.py --only sqllm --ppl-only --skip-missing      # perplexities ahead of the run

Perplexity is deterministic, so every result is cached in ``results/llamacpp-ppl.jsonl`` by the model's
file sizes and config, with its per-window NLLs: a later run over the same or fewer windows reads it
(the table names those rows), so a slow machine can score the models beside other work and keep the
speed rows of the final run. Each row is written out as soon as it is measured, and a row that fails
becomes one "not run" line with its reason.

The helpers (``f32_gguf``, ``quantize_gguf``, ``gguf_bits``, ``gguf_perplexity``) also serve
``benchmarks/peers.py``. sqllm rows run QuantLinear's default path: the compiled kernels where the CPU
has them, else the pure-torch tiled path (the table says which), so rerun after a kernel change.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common import EVAL_TEXT, RESULTS, ROOT, SEQLEN, WIKI_TEST, WIKI_VALID
from sqllm.models import cache_dir, resolve_alias
from sqllm.report import git_commit, machine_info, markdown_table

MODEL = "smollm2-135m"
# the matrices sqllm quantizes, by their GGUF names (token_embd and output stay out of "linears")
LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
# (label, llama.cpp file type, pure): the mixes a user picks with llama-quantize (issue 13)
SPEED_FORMATS = [
    ("Q4_0", "Q4_0", False),
    ("Q4_K_M", "Q4_K_M", False),
    ("Q3_K_M", "Q3_K_M", False),
    ("IQ4_NL", "IQ4_NL", False),
]
# (label, folder under --ckpt-dir, sqllm CLI arguments): packed checkpoints of bits/weight near the
# llama.cpp formats. sq4 and sq3s are the names other benchmarks make with these same arguments; GPTQ
# checkpoints share RTN's uniform g64 layout, so RTN's speed stands for theirs.
FEW = ["--calib", str(WIKI_VALID), "--nsamples", "8", "--calib-seqlen", "512"]
SQLLM_CHECKPOINTS = [
    ("sqllm RTN 4-bit g64", "rtn4-g64", ["--method", "rtn", "--bits", "4", "--group-size", "64"]),
    ("sqllm SqueezeLLM 4-bit", "sq4", ["--method", "squeezellm", "--bits", "4", *FEW]),
    ("sqllm RTN 3-bit g64", "rtn3-g64", ["--method", "rtn", "--bits", "3", "--group-size", "64"]),
    ("sqllm SqueezeLLM 3-bit 0.45%", "sq3s", ["--method", "squeezellm", "--bits", "3", "--outliers", "0.45", *FEW]),
]


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (None when ``llama_cpp`` imports)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); pip install --no-binary llama-cpp-python llama-cpp-python"
    return None


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


def f32_gguf() -> Path:
    """An F32 GGUF of SmolLM2 with every tensor of the bundled Q4_1 GGUF dequantized (same metadata).

    These are exactly the fp32 weights sqllm loads, so llama.cpp's quantizers start where sqllm does."""
    import gguf

    out = gguf_dir() / f"{MODEL}-f32.gguf"
    if out.is_file():
        return out
    src = gguf.GGUFReader(resolve_alias(MODEL))
    arch = src.fields["general.architecture"].contents()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    for key, fld in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer sets these itself
        if key == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = gguf.GGUFValueType(fld.types[0])
        sub = gguf.GGUFValueType(fld.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub)
    for t in src.tensors:
        # dequantize gives numpy order [ne1, ne0]; the writer records ggml order itself
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def quantize_gguf(ftype: str, *, pure: bool = False, token_embd: str | None = None,
                  threads: int = 2, folder: Path | None = None) -> tuple[Path, float]:
    """llama.cpp's quantizer on the F32 GGUF. Returns (path, seconds; 0 when the file was cached).

    ftype:      a llama.cpp file type name without ``LLAMA_FTYPE_MOSTLY_`` (Q4_0, Q4_K_M, Q3_K_S, IQ4_NL, ...)
    pure:       every quantized tensor gets the file type's base type (no per-tensor mix)
    token_embd: ggml type name for the token embedding (e.g. Q8_0, the bundled model's own) or None for
                llama.cpp's choice
    folder:     where the file goes (default: the GGUF cache folder, whose files are reused)
    """
    import llama_cpp

    name = f"{MODEL}-{ftype}{'-pure' if pure else ''}{'-emb' + token_embd if token_embd else ''}.gguf"
    out = (folder or gguf_dir()) / name
    if out.is_file():
        return out, 0.0
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.pure = pure
    if token_embd is not None:
        params.token_embedding_type = getattr(llama_cpp, f"GGML_TYPE_{token_embd}")
    tmp = out.with_suffix(".tmp")
    src = f32_gguf()
    start = time.perf_counter()
    with _quiet_stderr():  # the quantizer logs every tensor from C
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")
    os.replace(tmp, out)
    return out, seconds


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (C libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def gguf_bits(path: Path) -> dict[str, Any]:
    """Bits/weight of the block linears and of every tensor in a GGUF, and the linears' tensor types."""
    import gguf

    reader = gguf.GGUFReader(path)
    lin_bytes = lin_n = all_bytes = all_n = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        all_bytes += int(t.n_bytes)
        all_n += int(t.n_elements)
        if t.name.endswith(LINEAR_SUFFIXES):
            lin_bytes += int(t.n_bytes)
            lin_n += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        elif t.name == "token_embd.weight":
            types["token_embd " + t.tensor_type.name] = 1
    return {"linears": 8 * lin_bytes / lin_n, "file": 8 * all_bytes / all_n, "tensor_types": types,
            "file_bytes": path.stat().st_size}


def _llama(path: Path, threads: int, logits_all: bool) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=SEQLEN, n_batch=SEQLEN, n_ubatch=512,
                           n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)


def gguf_perplexity(path: Path, tokens: torch.Tensor, windows: int, threads: int = 2) -> dict[str, Any]:
    """sqllm's perplexity protocol run by llama.cpp: ``tokens: [1, T]``, the first ``windows``
    non-overlapping windows of 2048, mean next-token NLL per window from llama.cpp's logits."""
    llm = _llama(path, threads, logits_all=True)
    n = min(windows, tokens.shape[1] // SEQLEN)
    nll = []
    start = time.perf_counter()
    for i in range(n):
        window = tokens[0, i * SEQLEN:(i + 1) * SEQLEN]
        llm.reset()
        llm.eval(window.tolist())
        logits = torch.from_numpy(np.asarray(llm.scores[: SEQLEN - 1], dtype=np.float32))
        nll.append(float(F.cross_entropy(logits, window[1:], reduction="mean")))
    del llm
    return {"perplexity": float(np.exp(np.mean(nll))), "windows": n, "window_nll": nll,
            "eval_seconds": time.perf_counter() - start}


def gguf_speed(path: Path, threads: int, prompt: int, decode: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` prompt tokens/s (``prompt`` tokens) and decode tokens/s, batch 1, from
    llama.cpp's own evaluation loop.

    Decode is timed as sqllm's bench times ``generate``: an 8-token prompt, then greedy steps until
    ``decode`` tokens exist (the prompt's forward yields the first, so ``decode - 1`` single-token
    forwards follow), all inside the clock."""
    import llama_cpp

    llm = _llama(path, threads, logits_all=False)
    ids = torch.randint(0, llm.n_vocab(), (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    vocab = llm.n_vocab()
    best = {"prompt_tok_s": 0.0, "decode_tok_s": 0.0}
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best["prompt_tok_s"] = max(best["prompt_tok_s"], prompt / (time.perf_counter() - t))
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:8])
        for step in range(decode):
            # the logits of the last evaluated position (llama-cpp-python keeps only those without logits_all)
            last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            if step < decode - 1:
                llm.eval([int(last.argmax())])
        best["decode_tok_s"] = max(best["decode_tok_s"], decode / (time.perf_counter() - t))
    del llm
    return best


# --- sqllm rows ------------------------------------------------------------------------------------------

def sqllm_checkpoint(folder: Path, args: list[str]) -> tuple[Path, float | None]:
    """The packed checkpoint at ``folder``, made with the CLI when missing. Returns (path, CLI seconds or None)."""
    if (folder / "config.json").is_file():
        return folder, None
    cmd = [sys.executable, "-m", "sqllm.cli", "quantize", MODEL, *args, "--output", str(folder)]
    print("+", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return folder, time.perf_counter() - start


def sqllm_perplexity(folder: Path, windows: int) -> dict[str, Any]:
    """Perplexity of a packed checkpoint (its linears run on their cached dequantized weights, bit for bit
    the packed values, so the number does not depend on the compute path)."""
    from sqllm.api import evaluate_perplexity, load_quantized
    from sqllm.nn import QuantLinear

    model, tok = load_quantized(folder)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_dense_weight(torch.float32)
    res = evaluate_perplexity(model, tok, str(WIKI_TEST), seqlen=SEQLEN, windows=windows, progress=False)
    return {"perplexity": res["perplexity"], "windows": res["windows"], "window_nll": res["window_nll"]}


def sqllm_speed(folder: Path, threads: int, prompt: int, decode: int, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` prefill and decode tokens/s of a checkpoint in a fresh process (sqllm's bench)."""
    from sqllm.api import load_model
    from sqllm.eval.bench import measure

    runs = [measure(load_model, str(folder), prefill=prompt, decode=decode, threads=threads) for _ in range(repeats)]
    return {"prompt_tok_s": max(r["prefill_tok_s"] for r in runs), "decode_tok_s": max(r["decode_tok_s"] for r in runs)}


def sqllm_compute_path() -> str:
    from sqllm.nn.kernels import kernels_enabled

    return "compiled kernels" if kernels_enabled() else "pure-torch tiled path (no kernels for this CPU)"


# --- the benchmark ---------------------------------------------------------------------------------------

PPL_CACHE = RESULTS / "llamacpp-ppl.jsonl"


def _fingerprint(path: Path) -> str:
    """What identifies a model's weights on disk: the sizes of its weight files and its config.json (a
    deterministic quantizer remakes the same bytes, so a remade file keeps its cached perplexity)."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    parts = [f"{f.name}:{f.stat().st_size}" for f in files]
    if path.is_dir():
        parts.append((path / "config.json").read_text())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cached_perplexity(path: Path, windows: int, compute: Any) -> dict[str, Any]:
    """``compute()`` for the model at ``path``, or the result of an earlier run on the same weights over at
    least ``windows`` windows from ``PPL_CACHE``, cut to its first ``windows`` (perplexity is deterministic;
    only speed must come from the run itself)."""
    key = {"path": str(path), "fingerprint": _fingerprint(path), "eval_text": EVAL_TEXT}
    if PPL_CACHE.is_file():
        for line in PPL_CACHE.read_text().splitlines():
            rec = json.loads(line)
            if rec["key"] == key and rec["result"]["windows"] >= windows:
                nll = rec["result"]["window_nll"][:windows]
                return {**rec["result"], "perplexity": float(np.exp(np.mean(nll))), "windows": windows,
                        "window_nll": nll, "ppl_from_cache": True}
    res = compute()
    with PPL_CACHE.open("a") as f:
        f.write(json.dumps({"key": key, "result": res, "loadavg": os.getloadavg()}) + "\n")
    return {**res, "ppl_from_cache": False}


Row = tuple[dict[str, Any], Callable[[], dict[str, float]]]  # a table row and one speed measurement of it


def gguf_row(label: str, ftype: str, pure: bool, tokens: torch.Tensor, args: argparse.Namespace) -> Row:
    """One llama.cpp row: quantize (or the F32 start point when ``ftype`` is F32), size, perplexity."""
    path, qsec = (f32_gguf(), 0.0) if ftype == "F32" else quantize_gguf(ftype, pure=pure, threads=args.threads)
    row = {"label": label, "engine": "llama.cpp", "path": str(path), "quant_seconds": qsec, **gguf_bits(path)}
    row.update(cached_perplexity(path, args.windows, lambda: gguf_perplexity(path, tokens, args.windows, args.threads)))
    return row, lambda: gguf_speed(path, args.threads, args.prompt, args.decode, 1)


def sqllm_row(label: str, folder: Path, cli_args: list[str], args: argparse.Namespace) -> Row:
    """One sqllm row: the packed checkpoint (made when missing), size, perplexity."""
    folder, made = sqllm_checkpoint(folder, cli_args)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    row = {"label": label, "engine": f"sqllm ({sqllm_compute_path()})", "path": str(folder),
           "quant_seconds": made, "linears": qc["bits_per_weight"]["total"], "file": None,
           "tensor_types": {"layout": f"{qc['method']} {qc['bits']}-bit, "
                            + (f"g{qc['group_size']}" if qc.get("group_size") else "LUT per row")
                            + (f", {qc['sparse_pct']:.2f}% sparse fp16" if qc.get("sparse_pct") else "")},
           "file_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
    windows = args.sqllm_windows or args.windows
    row.update(cached_perplexity(folder, windows, lambda: sqllm_perplexity(folder, windows)))
    return row, lambda: sqllm_speed(folder, args.threads, args.prompt, args.decode, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows of 2048 tokens for perplexity")
    ap.add_argument("--sqllm-windows", type=int, default=None,
                    help="windows for the sqllm rows when fewer than --windows fit the time (the table says so)")
    ap.add_argument("--repeats", type=int, default=3, help="speed runs per model; the best is reported")
    ap.add_argument("--ckpt-dir", default="/work/ckpt", help="where sqllm checkpoints are found or made")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip-missing", action="store_true", help="skip sqllm checkpoints that do not exist yet")
    ap.add_argument("--formats", nargs="+", default=["F32"] + [f for _, f, _ in SPEED_FORMATS],
                    help="llama.cpp file types to run (F32: the unquantized start point, run last)")
    ap.add_argument("--fisher", default=None,
                    help="Fisher file SqueezeLLM checkpoints are made with (e.g. protocol P's, 32 x 2048 tokens, "
                         "from `sqllm sensitivity`) instead of one from 8 x 512 tokens")
    ap.add_argument("--only", choices=["all", "llamacpp", "sqllm"], default="all", help="which engine's rows to run")
    ap.add_argument("--ppl-only", action="store_true",
                    help=f"only compute (and cache in {PPL_CACHE.name}) perplexities; no speed, no result files")
    args = ap.parse_args()
    missing = llama_cpp_missing()
    torch.set_num_threads(args.threads)
    from sqllm.data import eval_tokens
    from sqllm.models import load_model

    load_start = os.getloadavg()
    _, tok = load_model(MODEL)
    tokens = eval_tokens(tok, str(WIKI_TEST))
    rows: list[dict[str, Any]] = []
    failed: list[str] = []  # one line per format that could not run, with the reason
    ckpt = Path(args.ckpt_dir)
    gguf_jobs: list[tuple[str, Any]] = []
    for label, ftype, pure in SPEED_FORMATS + [("F32 (start point)", "F32", False)] if args.only != "sqllm" else []:
        if ftype not in args.formats:
            continue
        if missing:
            failed.append(f"llama.cpp {label}: {missing}")
            continue
        gguf_jobs.append((f"llama.cpp {label}", lambda label=label, ftype=ftype, pure=pure:
                          gguf_row(f"llama.cpp {label}", ftype, pure, tokens, args)))
    sqllm_jobs: list[tuple[str, Any]] = []
    for label, name, cli_args in SQLLM_CHECKPOINTS if args.only != "llamacpp" else []:
        if args.fisher and "squeezellm" in cli_args:
            cli_args = [a for a in cli_args if a not in FEW] + ["--sensitivity-file", args.fisher]
        if args.skip_missing and not (ckpt / name / "config.json").is_file():
            failed.append(f"{label}: {ckpt / name} does not exist yet (--skip-missing)")
            continue
        sqllm_jobs.append((label, lambda label=label, name=name, cli_args=cli_args:
                           sqllm_row(label, ckpt / name, cli_args, args)))
    # the F32 start point (last in gguf_jobs when asked for) runs after everything else: the slowest
    # llama.cpp row, a reference rather than a contender
    f32 = [job for job in gguf_jobs if job[0].endswith("(start point)")]
    jobs = [job for job in gguf_jobs if job not in f32] + sqllm_jobs + f32
    speeds: list[Callable[[], dict[str, float]]] = []
    for label, job in jobs:  # first every model's file and perplexity, no clock involved
        try:
            row, speed = job()
        except Exception as exc:  # the table reports the format as not run, with this reason, and goes on
            failed.append(f"{label}: {type(exc).__name__}: {exc}")
            print(failed[-1], flush=True)
            continue
        rows.append({**row, "prompt_tok_s": 0.0, "decode_tok_s": 0.0, "speed_rounds": []})
        speeds.append(speed)
        print(f"{row['label']}: {row['linears']:.3f} b/w, ppl {row['perplexity']:.2f} ({row['windows']} windows)",
              flush=True)
    if args.ppl_only:
        return
    # then the speed in rounds, every model once per round: a load swing on the shared machine hits
    # every row alike instead of whichever model it happened to fall on, and each row keeps its best round
    for rnd in range(args.repeats):
        for row, speed in zip(rows, speeds):
            res = {**speed(), "loadavg_1min": os.getloadavg()[0]}
            row["speed_rounds"].append(res)
            row["prompt_tok_s"] = max(row["prompt_tok_s"], res["prompt_tok_s"])
            row["decode_tok_s"] = max(row["decode_tok_s"], res["decode_tok_s"])
            print(f"round {rnd + 1} {row['label']}: prompt {res['prompt_tok_s']:.0f} tok/s, decode "
                  f"{res['decode_tok_s']:.1f} tok/s, load {res['loadavg_1min']:.1f}", flush=True)
        write(rows, failed, args, load_start, final=rnd == args.repeats - 1)  # a cut-short run keeps its rounds


def _types_cell(row: dict[str, Any]) -> str:
    """The linears' GGUF tensor types with counts (llama.cpp) or the sqllm method."""
    types = row.get("tensor_types", {})
    if "layout" in types:
        return str(types["layout"])
    return ", ".join(f"{k} x{v}" if not k.startswith("token_embd") else k for k, v in sorted(types.items()))


def write(rows: list[dict[str, Any]], failed: list[str], args: argparse.Namespace,
          load_start: tuple[float, float, float], final: bool = False) -> None:
    machine = {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except ImportError:  # the llama.cpp rows are then listed as not run
        llama_version = "(not installed)"

    doc = {"protocol": {"threads": args.threads, "prompt_tokens": args.prompt, "decode_tokens": args.decode,
                        "repeats": args.repeats, "squeezellm_fisher": args.fisher, "ppl": f"first {args.windows} windows of {SEQLEN} tokens of "
                        f"{WIKI_TEST.name}, GPTQ protocol, no BOS, sqllm's token ids for both engines"},
           "llama_cpp_python": llama_version, "machine": machine, "commit": git_commit(str(ROOT)),
           "complete": final, "rows": rows, "not_run": failed}
    (RESULTS / "llamacpp.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    table = markdown_table(
        ["model", "engine", "bits/weight (linears)", "linear tensor types", "file MiB", "WikiText-2 ppl",
         "ppl windows", f"prompt tok/s ({args.prompt})", "decode tok/s", "load avg (1 min) per speed round"],
        [[r["label"], r["engine"], f"{r['linears']:.3f}", _types_cell(r), f"{r['file_bytes'] / 2**20:.0f}",
          f"{r['perplexity']:.2f}", r["windows"], f"{r['prompt_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
          " / ".join(f"{x['loadavg_1min']:.1f}" for x in r["speed_rounds"])] for r in rows])
    not_run = "".join(f"- {line}\n" for line in failed)
    cached = [r["label"] for r in rows if r.get("ppl_from_cache")]
    fisher_note = (f"from {args.fisher} (protocol P's: 32 x 2048 WikiText-2 validation tokens)" if args.fisher
                   else "from 8 x 512 WikiText-2 validation tokens (protocol P calibrates on 32 x 2048: the "
                        "README's protocol-P table is the reference for sqllm's quality)")
    md = (f"# llama.cpp and sqllm on SmolLM2-135M, {args.threads} threads\n\n{table}\n\n"
          + (f"Not run:\n\n{not_run}\n" if failed else "")
          + ("" if final else "(partial: the run had not finished when this was written)\n\n")
          + f"Speed: batch 1, {args.threads} threads, prompt of {args.prompt} random tokens, {args.decode} greedy "
          f"decode tokens after an 8-token prompt (the prompt's forward counts, as in `generate`), best of "
          f"{args.repeats} rounds (each round measures every row once, in table order); llama.cpp through llama-cpp-python {llama_version} (built from source for this "
          f"CPU, `-DGGML_NATIVE=ON`), sqllm through transformers' generate (`sqllm.eval.bench.measure`, a fresh "
          f"process per run). Perplexity: {doc['protocol']['ppl']} (protocol P's evaluation; the ppl windows "
          f"column says where fewer were scored"
          + (f"; the perplexities of {', '.join(cached)} were computed by an earlier run of this script (`--ppl-only`, "
             f"or a run cut short) on the same files and read from `{PPL_CACHE.name}`" if cached else "")
          + f"). llama.cpp formats are made by llama.cpp's quantizer (no "
          f"importance matrix) from an F32 GGUF holding the dequantized weights of the bundled Q4_1 GGUF (the "
          f"same fp32 weights sqllm quantizes); token embedding and output tensors follow each format's own "
          f"mix (sqllm keeps the tied embedding in fp16, so its files are larger at equal linear bits/weight). "
          f"SmolLM2-135M's hidden size, 576, is not a multiple of 256, so the K-quant mixes store the matrices "
          f"with 576-wide rows (q, k, v, gate, up) in a fallback type; the tensor types column lists what each "
          f"file holds. sqllm checkpoints: made with the `sqllm quantize` CLI; SqueezeLLM's Fisher {fisher_note}; GPTQ and SliM-LLM share RTN's uniform g64 layout and decode at "
          f"its speed.\n\n"
          f"Machine: {machine['cpu']}, {machine['cores']} cores, load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.1f}' for x in load_start)} at the start and "
          f"{', '.join(f'{x:.1f}' for x in machine['loadavg_end'])} at the end (a shared machine: compare "
          f"rows of this table only, and read the load column beside each row). "
          f"Commit {doc['commit']}.\n")
    (RESULTS / "llamacpp.md").write_text(md)
    if final:
        print(md)


if __name__ == "__main__":
    main()
