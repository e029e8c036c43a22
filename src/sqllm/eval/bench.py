"""Inference benchmark of a checkpoint: size on disk, bits per weight, peak memory, prefill and decode speed.

Each model is measured in a fresh subprocess so that its peak resident memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from pathlib import Path
from queue import Empty
from typing import Any, Callable

import torch

from ..report import machine_info


def disk_bytes(path: str) -> int | None:
    """Bytes of the weight files of a model folder (None for a non-folder spec)."""
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def _module_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Resident bytes of the quantized linears (their buffers and parameters) and of the whole model."""
    from ..nn import QuantLinear

    q = sum(
        sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))
        for m in model.modules() if isinstance(m, QuantLinear)
    )
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {"quantized_linear_bytes": q, "model_bytes": total}


Loader = Callable[..., tuple[torch.nn.Module, Any]]


def _measure(load: Loader, spec: str, dtype: str, prefill: int, decode: int, threads: int, queue: Any) -> None:
    """Runs in a subprocess: load ``spec`` with ``load(spec, dtype=...)``, time a prefill and a greedy
    decode, report peak RSS."""
    try:
        torch.set_num_threads(threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        t0 = time.perf_counter()
        model, _ = load(spec, dtype=getattr(torch, dtype))
        load_s = time.perf_counter() - t0
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            model(ids[:, :16], use_cache=False)  # warm-up
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            prefill_s = time.perf_counter() - t0
            prompt = ids[:, :8]
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                                 pad_token_id=0)
            decode_s = time.perf_counter() - t0
        res = {
            "model": spec, "dtype": dtype, "load_s": load_s,
            "prefill_tokens": prefill, "prefill_tok_s": prefill / prefill_s,
            "decode_tokens": int(out.shape[1] - prompt.shape[1]), "decode_tok_s": (out.shape[1] - prompt.shape[1]) / decode_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **_module_bytes(model),
        }
        queue.put(res)
    except Exception as exc:  # reported by the parent, which owns the error message
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure(load: Loader, spec: str, *, dtype: str = "float32", prefill: int = 512, decode: int = 32,
            threads: int | None = None) -> dict[str, Any]:
    """Measure one model, loaded by the picklable ``load`` (e.g. :func:`sqllm.api.load_model`), in a fresh
    process (spawned, so the parent's memory does not count)."""
    from ..errors import SqllmError

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(load, spec, dtype, prefill, decode, threads or torch.get_num_threads(), queue))
    proc.start()
    while True:  # a child that dies without reporting (killed, crashed) must not hang the parent
        try:
            res = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                raise SqllmError(f"benchmark of {spec!r} failed: its process exited with code {proc.exitcode}")
    proc.join()
    if "error" in res:
        raise SqllmError(f"benchmark of {spec!r} failed: {res['error']}")
    return res


def bench_checkpoint(load: Loader, path: str, *, baseline: str | None = None, prefill: int = 512,
                     decode: int = 32, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, Any]:
    """Size, bits per weight and speed of ``path``, next to ``baseline`` in each of ``dtypes``."""
    from ..formats.checkpoint import is_packed_checkpoint

    rows = []
    qrow = measure(load, path, prefill=prefill, decode=decode)
    qrow["disk_bytes"] = disk_bytes(path)
    if is_packed_checkpoint(path):
        qc = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        qrow["method"] = qc["method"]
        qrow["bits_per_weight"] = qc["bits_per_weight"]
        qrow["packed_linear_bytes"] = packed_linear_bytes(path)
    rows.append(qrow)
    if baseline:
        from ..models import resolve_model_path

        base_path = resolve_model_path(baseline)
        for dt in dtypes:
            r = measure(load, base_path, dtype=dt, prefill=prefill, decode=decode)
            r["disk_bytes"] = disk_bytes(base_path)
            rows.append(r)
    return {"machine": machine_info(), "rows": rows}


def packed_linear_bytes(path: str) -> int:
    """Bytes of the quantized linears' tensors as stored (codes, LUT or scales/zeros, bit map, sparse)."""
    from ..formats.checkpoint import read_quantization_config, read_tensors

    qc = read_quantization_config(Path(path))
    prefixes = tuple(f"{name}." for name in qc["layers"])
    tensors = read_tensors(Path(path))
    return sum(t.numel() * t.element_size() for k, t in tensors.items()
               if k.startswith(prefixes) and not k.endswith(".bias"))
