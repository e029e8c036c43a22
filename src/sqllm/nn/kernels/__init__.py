"""Kernels for packed weights: the ``torch.ops.sqllm`` ops (:mod:`.ops`) and their compiled CPU backend.

The CPU backend (``cpu_avx2.cpp``) needs an x86-64 CPU with AVX2, FMA and F16C (read from
``torch.backends.cpu.get_cpu_capability()``; every AVX-512 CPU qualifies) and a C++ compiler. It is
built with ``torch.utils.cpp_extension`` on the first CPU call of an op (about a minute, once; cached
by torch under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, keyed by the source's
hash). Where the CPU, the compiler or ``SQLLM_KERNELS=0`` rules it out, :func:`cpu_kernels` returns
None and the ops run their pure-torch implementation, as they do for inputs the kernels do not take
(LUT codes wider than 4 bits, uniform groups that are not a multiple of 8 columns).

Importing this package registers the CPU implementations; building waits for the first call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from torch import Tensor

from . import ops

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_avx2.cpp")
FUNCTIONS = ["lut_mm", "uniform_mm", "csr_mm", "stream_sum"]
MAX_LUT_BITS = 4  # wider LUT codes run the torch implementation
CHUNK = 8  # uniform groups must be a multiple of this many columns, or cover the whole row
AVX2_CAPABILITIES = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AVX512_FP16")


def kernels_enabled() -> bool:
    """False when ``SQLLM_KERNELS=0`` or the CPU lacks AVX2 (torch's capability tells)."""
    if os.environ.get("SQLLM_KERNELS", "1") == "0":
        return False
    return torch.backends.cpu.get_cpu_capability() in AVX2_CAPABILITIES


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (logged once) when it cannot be used here."""
    if not kernels_enabled():
        return None
    from torch.utils.cpp_extension import load_inline

    log.info("sqllm: building the CPU kernels (once; cached by torch)")
    try:
        return load_inline(
            name="sqllm_cpu_avx2",
            cpp_sources=[SOURCE.read_text()],
            functions=FUNCTIONS,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers, no ninja: the torch path still works
        log.warning("sqllm: CPU kernels unavailable (%s: %s); using the torch path", type(exc).__name__, exc)
        return None


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """Within this block the ops run their pure-torch implementation on CPU (benchmarks and tests
    compare it with the kernels); other devices are unaffected."""
    with contextlib.ExitStack() as stack:
        for op in (ops.lut_mm, ops.uniform_mm, ops.csr_mm):
            stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield


def uniform_supported(group_size: int, n: int) -> bool:
    """Whether the compiled kernels take a uniform part of ``n`` columns in groups of ``group_size``."""
    return group_size % CHUNK == 0 or group_size >= n


# The CPU implementations: the compiled kernel where it applies, else the op's torch implementation.
# Input checks live in the C++ (a RuntimeError naming the value): the decode of a small layer takes
# tens of microseconds, so the Python side stays a few attribute lookups.


@ops.lut_mm.register_kernel("cpu")
def _lut_mm_cpu(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    k = cpu_kernels()
    if k is None or bits > MAX_LUT_BITS:
        return ops.lut_mm_torch(x, qweight, lut, bits, n)
    return k.lut_mm(x, qweight, lut, bits, n)


@ops.uniform_mm.register_kernel("cpu")
def _uniform_mm_cpu(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
                    bits: int, n: int) -> Tensor:
    k = cpu_kernels()
    if k is None or not uniform_supported(group_size, n):
        return ops.uniform_mm_torch(x, qweight, scales, zeros, group_ids, group_size, bits, n)
    return k.uniform_mm(x, qweight, scales, zeros, group_ids, group_size, bits, n)


@ops.csr_mm.register_kernel("cpu")
def _csr_mm_cpu(x: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    k = cpu_kernels()
    if k is None:
        return ops.csr_mm_torch(x, crow, col, val)
    return k.csr_mm(x, crow, col, val)
