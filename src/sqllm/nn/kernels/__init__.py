"""Compiled CPU kernels for packed weights, built on first use with ``torch.utils.cpp_extension``.

The kernels need AVX-512 (read from ``torch.backends.cpu.get_cpu_capability()``) and a C++ compiler;
where either is missing, or ``SQLLM_KERNELS=0`` is set, :func:`cpu_kernels` returns None and QuantLinear
keeps its pure-torch path. The first build takes about a minute and is cached by torch (under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), keyed by the source's hash.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_avx512.cpp")
FUNCTIONS = ["lut_gemv", "uniform_gemv_", "lut_dequant", "uniform_dequant"]
MAX_BITS = 4
LANES = 16  # uniform kernels need group sizes that are a multiple of this


def kernels_enabled() -> bool:
    """False when ``SQLLM_KERNELS=0`` or the CPU lacks AVX-512."""
    if os.environ.get("SQLLM_KERNELS", "1") == "0":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (logged once) when it cannot be used here."""
    if not kernels_enabled():
        return None
    from torch.utils.cpp_extension import load_inline

    log.info("sqllm: building the CPU kernels (once; cached by torch)")
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mf16c", "-fopenmp"]
    try:
        return load_inline(
            name="sqllm_cpu_kernels",
            cpp_sources=[SOURCE.read_text()],
            functions=FUNCTIONS,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the torch path still works
        log.warning("sqllm: CPU kernels unavailable (%s: %s); using the torch path", type(exc).__name__, exc)
        return None
