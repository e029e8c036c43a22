"""The ``torch.ops.sqllm`` operators that multiply activations by packed weights.

Each op has one contract, a pure-torch implementation that runs on any device (it unpacks and
dequantizes a few rows at a time with :mod:`sqllm.formats`, so the full weight never exists), a fake
(meta) implementation for ``torch.compile``, and an autograd formula for ``x``. Accelerated backends
register implementations of the same ops for their device: the compiled CPU kernels
(:mod:`sqllm.nn.kernels`) for ``"cpu"``; Triton (a separate module) for ``"cuda"``.

Contracts (``words(n, b) = ceil(n * b / 32)``, codes packed by :func:`sqllm.formats.bitpack.pack_codes`):

* ``lut_mm(x, qweight, lut, bits, n) -> [m, out] float32``: ``x [m, n]`` fp32/fp16/bf16, ``qweight
  [out, words(n, bits)] int32``, ``lut [out, 2**bits] float16``; ``x @ W^T`` with
  ``W[i, j] = lut[i, code[i, j]]``.
* ``uniform_mm(x, qweight, scales, zeros, group_ids, group_size, bits, n) -> [m, out] float32``:
  ``x [m, n]`` holds the part's columns (mixed precision: the gathered columns of one width's groups, in
  order), ``qweight [out, words(n, bits)] int32``, ``scales, zeros [out, n_groups_total] float16``,
  ``group_ids [ceil(n / group_size)] int64`` the column of ``scales``/``zeros`` each group of this part
  uses; ``W[i, j] = scales[i, g] * (code[i, j] - zeros[i, g])`` with ``g = group_ids[j // group_size]``.
* ``csr_mm(x, crow, col, val) -> [m, out] float32``: the sparse outliers (CSR, ``crow [out + 1] int32``,
  ``col [nnz] int32``, ``val [nnz]`` fp16/bf16/fp32) times ``x [m, in]``. An op rather than a torch
  sparse tensor so that ``torch.compile`` sees one opaque call and the CPU kernels can fuse nothing
  they do not own.

Every implementation accumulates in float32. The compiled CPU kernels multiply bf16 ``x`` of 9+ tokens
(prefill) by the weights rounded to bf16 where the CPU multiplies bf16 natively
(:mod:`sqllm.nn.kernels`): the reference's result up to bf16 round-off, as a bf16 model's own linears.
The first CPU call loads the compiled kernels (:func:`sqllm.nn.kernels.cpu_kernels`), which then serve
every later CPU call;
:func:`sqllm.nn.kernels.torch_path` or ``SQLLM_KERNELS=0`` keeps the pure-torch implementation.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from ...formats.bitpack import packed_words, unpack_codes

DECODE_TOKENS = 8  # up to this many rows of x count as decode (matrix-vector work)
DECODE_TILE = 1 << 18  # weight elements dequantized at once when decoding (1 MiB fp32, about an L2)
PREFILL_TILE = 1 << 21  # larger tiles when the matmul amortizes the dequantization


def check_codes(x: Tensor, qweight: Tensor, bits: int, n: int) -> None:
    """ValueError naming the value unless ``x [m, n]`` and ``qweight [out, words(n, bits)] int32`` agree."""
    if x.dim() != 2 or x.shape[1] != n or not x.is_floating_point():
        raise ValueError(f"x must be a float [m, {n}] tensor, got {x.dtype} {tuple(x.shape)}")
    words = packed_words(n, bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] != words:
        raise ValueError(
            f"qweight must be int32 [out, {words}] for {n} codes of {bits} bits, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )


def _check_lut(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int) -> None:
    check_codes(x, qweight, bits, n)
    if lut.dtype != torch.float16 or tuple(lut.shape) != (qweight.shape[0], 1 << bits):
        raise ValueError(f"lut must be float16 [{qweight.shape[0]}, {1 << bits}], got {lut.dtype} {tuple(lut.shape)}")


def _check_uniform(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int, bits: int, n: int
) -> None:
    check_codes(x, qweight, bits, n)
    out = qweight.shape[0]
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16 or t.dim() != 2 or t.shape[0] != out:
            raise ValueError(f"{name} must be float16 [{out}, n_groups], got {t.dtype} {tuple(t.shape)}")
    if scales.shape != zeros.shape:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} differ in shape")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be positive")
    groups = -(-n // group_size)
    if group_ids.dtype != torch.int64 or tuple(group_ids.shape) != (groups,):
        raise ValueError(f"group_ids must be int64 [{groups}], got {group_ids.dtype} {tuple(group_ids.shape)}")


def _tile_rows(m: int, n: int) -> int:
    return max(1, (DECODE_TILE if m <= DECODE_TOKENS else PREFILL_TILE) // max(n, 1))


def lut_rows(qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    """Dequantized rows of a LUT weight: ``[t, n]`` float32, bit for bit ``LUTCodes.dequantize``."""
    return torch.gather(lut.float(), 1, unpack_codes(qweight, bits, n).long())


def uniform_rows(qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int, bits: int,
                 n: int) -> Tensor:
    """Dequantized rows of a uniform part: ``[t, n]`` float32, bit for bit ``UniformCodes.dequantize``."""
    g = group_ids.index_select(0, torch.arange(n, device=group_ids.device) // group_size)
    codes = unpack_codes(qweight, bits, n).float()
    return scales.float().index_select(1, g) * (codes - zeros.float().index_select(1, g))


def _tiled_mm(x: Tensor, out: int, rows_fn) -> Tensor:
    """``x [m, n] @ W^T`` with ``W`` produced ``[t, n]`` at a time by ``rows_fn(start, stop)``: ``[m, out]`` f32."""
    m, n = x.shape
    xf = x.float()
    y = torch.empty(m, out, dtype=torch.float32, device=x.device)
    step = _tile_rows(m, n)
    for start in range(0, out, step):
        stop = min(start + step, out)
        y[:, start:stop] = xf @ rows_fn(start, stop).T
    return y


def lut_mm_torch(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    """Pure-torch ``lut_mm`` on any device, a tile of rows at a time: ``[m, out]`` float32."""
    _check_lut(x, qweight, lut, bits, n)
    return _tiled_mm(x, qweight.shape[0], lambda a, b: lut_rows(qweight[a:b], lut[a:b], bits, n))


def uniform_mm_torch(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
                     bits: int, n: int) -> Tensor:
    """Pure-torch ``uniform_mm`` on any device, a tile of rows at a time: ``[m, out]`` float32."""
    _check_uniform(x, qweight, scales, zeros, group_ids, group_size, bits, n)
    return _tiled_mm(
        x, qweight.shape[0],
        lambda a, b: uniform_rows(qweight[a:b], scales[a:b], zeros[a:b], group_ids, group_size, bits, n),
    )


def csr_mm_torch(x: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """Pure-torch ``csr_mm``: torch's CSR product in float32 (MKL on CPU): ``[m, out]`` float32."""
    out = crow.numel() - 1
    with warnings.catch_warnings():  # "sparse CSR is beta": we rely only on CSR @ dense
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = torch.sparse_csr_tensor(crow, col, val.float(), (out, x.shape[1]), check_invariants=False)
    # CSR @ x^T reads x's rows once per outlier row: over 10x faster than gathering columns for prefill.
    return (csr @ x.float().T).T.contiguous()


def _cpu_kernels_loaded_now(x: Tensor) -> bool:
    """On the first CPU call, load the compiled kernels; True when that just made them the ops' CPU
    implementation (the caller then calls the op again, which now dispatches to them)."""
    if x.device.type != "cpu":
        return False
    from . import cpu_kernels, kernels_registered

    return not kernels_registered() and cpu_kernels() is not None


def _triton_forced() -> bool:
    """``SQLLM_KERNELS=triton``: Triton serves every device, CPU tensors through its interpreter."""
    return os.environ.get("SQLLM_KERNELS") == "triton"


# The default implementations below serve every device without a registered one, and the CPU until the
# compiled kernels load (never under SQLLM_KERNELS=triton, which sends CPU calls to Triton instead).


@torch.library.custom_op("sqllm::lut_mm", mutates_args=())
def lut_mm(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    """``x [m, n] @ W^T`` for a LUT weight (module docstring): ``[m, out]`` float32."""
    if _triton_forced():
        from . import triton_ops

        return triton_ops.lut_mm(x, qweight, lut, bits, n)
    if _cpu_kernels_loaded_now(x):
        return torch.ops.sqllm.lut_mm.default(x, qweight, lut, bits, n)
    return lut_mm_torch(x, qweight, lut, bits, n)


@torch.library.custom_op("sqllm::uniform_mm", mutates_args=())
def uniform_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
               bits: int, n: int) -> Tensor:
    """``x [m, n] @ W^T`` for one uniform part (module docstring): ``[m, out]`` float32."""
    if _triton_forced():
        from . import triton_ops

        return triton_ops.uniform_mm(x, qweight, scales, zeros, group_ids, group_size, bits, n)
    if _cpu_kernels_loaded_now(x):
        return torch.ops.sqllm.uniform_mm.default(x, qweight, scales, zeros, group_ids, group_size, bits, n)
    return uniform_mm_torch(x, qweight, scales, zeros, group_ids, group_size, bits, n)


@torch.library.custom_op("sqllm::csr_mm", mutates_args=())
def csr_mm(x: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """Sparse outliers (CSR) times ``x [m, in]``: ``[m, out]`` float32."""
    if _triton_forced():
        from . import triton_ops

        return triton_ops.csr_mm(x, crow, col, val)
    if _cpu_kernels_loaded_now(x):
        return torch.ops.sqllm.csr_mm.default(x, crow, col, val)
    return csr_mm_torch(x, crow, col, val)


def _fake_out(x: Tensor, rows: int) -> Tensor:
    return x.new_empty((x.shape[0], rows), dtype=torch.float32)


@lut_mm.register_fake
def _(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    return _fake_out(x, qweight.shape[0])


@uniform_mm.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int, bits: int,
      n: int) -> Tensor:
    return _fake_out(x, qweight.shape[0])


@csr_mm.register_fake
def _(x: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    return _fake_out(x, crow.shape[0] - 1)


# Gradients flow to x only (the packed tensors are integers and fp16 tables that nothing trains here):
# dL/dx = dL/dy @ W, with W dequantized whole by the same pure-torch code.


def _setup(ctx, inputs, output) -> None:
    ctx.inputs = inputs[1:]
    ctx.x_dtype = inputs[0].dtype


def _lut_backward(ctx, grad: Tensor):
    qweight, lut, bits, n = ctx.inputs
    return (grad @ lut_rows(qweight, lut, bits, n)).to(ctx.x_dtype), None, None, None, None


def _uniform_backward(ctx, grad: Tensor):
    w = uniform_rows(*ctx.inputs)
    return (grad @ w).to(ctx.x_dtype), *([None] * 7)


def _csr_backward(ctx, grad: Tensor):
    crow, col, val = ctx.inputs
    counts = torch.diff(crow.long())
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)
    contrib = grad.T.index_select(0, rows) * val.float()[:, None]  # [nnz, m]
    n = ctx.n_in
    gx = grad.new_zeros(n, grad.shape[0]).index_add_(0, col.long(), contrib)
    return gx.T.to(ctx.x_dtype), None, None, None


def _csr_setup(ctx, inputs, output) -> None:
    _setup(ctx, inputs, output)
    ctx.n_in = inputs[0].shape[1]


lut_mm.register_autograd(_lut_backward, setup_context=_setup)
uniform_mm.register_autograd(_uniform_backward, setup_context=_setup)
csr_mm.register_autograd(_csr_backward, setup_context=_csr_setup)
