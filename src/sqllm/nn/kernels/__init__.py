"""Kernels for packed weights: the ``torch.ops.sqllm`` ops (:mod:`.ops`) and their compiled CPU backend.

The CPU backend (``cpu_avx2.cpp``, with ``cpu_avx512.cpp`` appended: one library) needs an x86-64 CPU
with AVX2, FMA and F16C (read from ``torch.backends.cpu.get_cpu_capability()``; every AVX-512 CPU
qualifies) and a C++ compiler. The first CPU call of an op builds it with ``torch.utils.cpp_extension``
(a few minutes, once; cached by torch under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``, in a folder named after the sources' hash) and loads it; loading registers its C++
functions as the ops' CPU (and CPU autograd) implementations in the dispatcher, so later calls never
pass through Python. Where the CPU, the compiler or ``SQLLM_KERNELS=0`` rules it out, :func:`cpu_kernels`
returns None and the ops keep their pure-torch implementation. The C++ side takes every layout: the
vector readers serve LUT codes of 1..4 bits and uniform groups that are a multiple of 8 columns (or
cover the row), a scalar reader the rest.

Where the CPU also has AVX-512 F/BW/VL (checked at run time) and the compiler is GCC, decoding (1..8
tokens) of LUT codes of 1..4 bits, and of uniform codes of 1..4 bits in groups of a multiple of 64
columns (or one group per row), runs AVX-512 kernels; everything else runs the AVX2 kernels.
``SQLLM_KERNELS=avx2`` or :func:`cpu_isa` keeps the AVX2 kernels everywhere.

Prefill (9+ tokens) of bf16 x, where the CPU also has AVX-512 BF16 or AMX and AVX-512 is chosen,
dequantizes the weight into bf16 tiles and multiplies them with torch's bf16 matmul: the weights are
rounded to bf16 (the precision of a bf16 model's own linears), the output is the op's fp32. fp32 and fp16
x keep the fp32 path. The module's ``prefill_in_bf16()`` tells whether that path runs here;
``set_prefill(min_tokens, tile_bytes)`` sets its token threshold (never below 9) and tile size (values
<= 0 keep a setting) and returns the previous ones, for tests and benchmarks.

Importing this package also registers the Triton implementations for CUDA (:mod:`.triton_ops`, Triton
imported on first use); ``SQLLM_KERNELS=triton`` sends CPU tensors to them too (under
``TRITON_INTERPRET=1``), and keeps the compiled CPU kernels unloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

from . import ops, triton_ops  # triton_ops registers the CUDA implementations

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_avx2.cpp", "cpu_avx512.cpp")]
HEADERS = [Path(__file__).with_name("fma_sweep.h")]  # included by both sources (each width once)
FUNCTIONS = ["lut_mm", "uniform_mm", "csr_mm", "dense16_mm", "stream_sum", "isa", "set_isa", "set_prefill",
             "prefill_in_bf16"]
AVX2_CAPABILITIES = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AVX512_FP16")


def kernels_enabled() -> bool:
    """False when ``SQLLM_KERNELS`` is ``0`` (pure torch) or ``triton`` (Triton everywhere), or the CPU
    lacks AVX2 (torch's capability tells). ``SQLLM_KERNELS=avx2`` enables them without AVX-512."""
    if os.environ.get("SQLLM_KERNELS", "1") in ("0", "triton"):
        return False
    return torch.backends.cpu.get_cpu_capability() in AVX2_CAPABILITIES


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (logged once) when it cannot be used here."""
    if not kernels_enabled():
        return None
    from torch.utils.cpp_extension import load_inline

    source = "\n".join(path.read_text() for path in SOURCES)
    headers = "".join(path.read_text() for path in HEADERS)
    log.info("sqllm: building the CPU kernels (once; cached by torch)")
    try:
        module = load_inline(
            # One build folder per source version: checkouts of different versions on one machine
            # would otherwise rebuild over each other's module (and wait on each other's lock).
            name=f"sqllm_cpu_{hashlib.sha256((source + headers).encode()).hexdigest()[:12]}",
            cpp_sources=[source],  # the sources concatenated: one translation unit
            extra_include_paths=[str(HEADERS[0].parent)],
            functions=FUNCTIONS,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers, no ninja: the torch path still works
        log.warning("sqllm: CPU kernels unavailable (%s: %s); using the torch path", type(exc).__name__, exc)
        return None
    if os.environ.get("SQLLM_KERNELS") == "avx2":
        module.set_isa("avx2")
    global _loaded
    _loaded = module
    return module


_loaded: ModuleType | None = None  # what cpu_kernels() returned, once it returned a module


def kernels_registered() -> bool:
    """Whether the compiled kernels are the ops' CPU implementations (after their first CPU call)."""
    return _loaded is not None


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """Within this block the ops run their pure-torch implementation on CPU, whether or not the kernels
    are loaded (tests and benchmarks compare the two). A temporary registration overrides the CPU
    implementation and is removed on exit; other devices are unaffected."""
    with _cpu_implementations(ops.lut_mm_torch, ops.uniform_mm_torch, ops.csr_mm_torch):
        yield


@contextlib.contextmanager
def cpu_isa(name: str) -> Iterator[None]:
    """Within this block the compiled decode kernels use instruction set ``name`` (``"avx2"``, or
    ``"avx512"`` where the CPU has AVX-512 F/BW/VL; RuntimeError otherwise), in every thread; tests and
    benchmarks compare the two. Needs the compiled kernels (:func:`cpu_kernels`)."""
    module = cpu_kernels()
    if module is None:
        raise RuntimeError("the compiled CPU kernels are not loaded")
    previous = module.set_isa(name)
    try:
        yield
    finally:
        module.set_isa(previous)


@contextlib.contextmanager
def triton_path() -> Iterator[None]:
    """Within this block CPU calls of the ops go through :mod:`.triton_ops` (Triton's interpreter under
    ``SQLLM_KERNELS=triton``), whatever was loaded before: ``SQLLM_KERNELS`` itself is read when the
    kernels first load, so tests and benchmarks that switch back and forth in one process use this."""
    with _cpu_implementations(triton_ops.lut_mm, triton_ops.uniform_mm, triton_ops.csr_mm):
        yield


_overrides = 0  # open _cpu_implementations blocks; while any is open, calls must go through the dispatcher


def may_call_directly(x: torch.Tensor) -> bool:
    """Whether a product with ``x`` may call the compiled functions without the dispatcher: ``x`` on CPU,
    no gradient wanted (autograd needs the ops), and no ``torch.compile`` tracing (it needs them too)."""
    return x.is_cpu and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


def direct_kernels() -> ModuleType | None:
    """The compiled module when it is what the dispatcher would run for a CPU call of the ops: loaded,
    registered, and not overridden by :func:`torch_path` or :func:`triton_path`. Decode calls it directly
    (``QuantLinear``), which skips the few microseconds a ``torch.ops`` call spends boxing its arguments:
    at SmolLM2's size a decoded token makes 210 of them."""
    return None if _overrides else _loaded


@contextlib.contextmanager
def _cpu_implementations(lut_mm: Callable, uniform_mm: Callable, csr_mm: Callable) -> Iterator[None]:
    """A temporary registration of the ops' CPU implementations, removed on exit."""
    global _overrides
    with torch.library._scoped_library("sqllm", "IMPL") as lib, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")  # replacing the kernels is the point
        for name, fn in (("lut_mm", lut_mm), ("uniform_mm", uniform_mm), ("csr_mm", csr_mm)):
            lib.impl(name, fn, "CPU")
        _overrides += 1
        try:
            yield
        finally:
            _overrides -= 1
