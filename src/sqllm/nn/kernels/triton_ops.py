"""The Triton kernels (:mod:`.triton_kernels`) as the CUDA implementations of the ``torch.ops.sqllm`` ops.

Importing this module registers the CUDA implementations and imports no Triton: the kernels module is
imported on the first CUDA call. ``SQLLM_KERNELS`` picks what computes:

* unset (or any other value): Triton on CUDA tensors where Triton is installed, the ops' pure-torch
  implementation otherwise (CUDA without Triton logs one warning);
* ``0``: the pure-torch implementation everywhere;
* ``triton``: Triton on every device, including CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1``), and :class:`~sqllm.errors.InvalidConfig` when Triton is not installed.
  The CPU implementations route to :func:`lut_mm` and friends when :func:`forced` says so.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from ...errors import InvalidConfig
from . import ops

log = logging.getLogger(__name__)


def forced() -> bool:
    """True when ``SQLLM_KERNELS=triton`` asks for the Triton kernels on every device."""
    return os.environ.get("SQLLM_KERNELS") == "triton"


@functools.cache
def _triton_module() -> ModuleType | None:
    """The kernels module, or None (logged once) when Triton cannot be imported."""
    try:
        from . import triton_kernels
    except ImportError as exc:
        log.warning("sqllm: Triton kernels unavailable (%s); CUDA tensors use the torch implementation", exc)
        return None
    return triton_kernels


def kernels_for(device: torch.device) -> ModuleType | None:
    """The Triton kernels module if it should compute on ``device`` under ``SQLLM_KERNELS``, else None."""
    setting = os.environ.get("SQLLM_KERNELS", "1")
    if setting == "0":
        return None
    if setting == "triton":
        module = _triton_module()
        if module is None:
            raise InvalidConfig("SQLLM_KERNELS=triton needs Triton, which is not installed: pip install 'sqllm[gpu]'")
        return module
    return _triton_module() if device.type == "cuda" else None


def lut_mm(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    """``torch.ops.sqllm.lut_mm`` by Triton where :func:`kernels_for` allows, else by torch."""
    k = kernels_for(x.device)
    return ops.lut_mm_torch(x, qweight, lut, bits, n) if k is None else k.lut_mm(x, qweight, lut, bits, n)


def uniform_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
               bits: int, n: int) -> Tensor:
    """``torch.ops.sqllm.uniform_mm`` by Triton where :func:`kernels_for` allows, else by torch."""
    k = kernels_for(x.device)
    args = (x, qweight, scales, zeros, group_ids, group_size, bits, n)
    return ops.uniform_mm_torch(*args) if k is None else k.uniform_mm(*args)


def csr_mm(x: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """``torch.ops.sqllm.csr_mm`` by Triton where :func:`kernels_for` allows, else by torch."""
    k = kernels_for(x.device)
    return ops.csr_mm_torch(x, crow, col, val) if k is None else k.csr_mm(x, crow, col, val)


ops.lut_mm.register_kernel("cuda")(lut_mm)
ops.uniform_mm.register_kernel("cuda")(uniform_mm)
ops.csr_mm.register_kernel("cuda")(csr_mm)
