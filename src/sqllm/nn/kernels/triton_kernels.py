"""Triton kernels for packed weights: LUT (SqueezeLLM) and uniform groups (GPTQ, RTN, SliM-LLM parts),
plus the CSR sparse outliers.

Importing this module imports Triton; ``import sqllm`` never does (:mod:`.triton_ops` imports this module
on the first call that needs it). On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported: Triton reads it when a kernel is defined),
which is how the tests check them without a GPU.

Every kernel reads the packed codes of :mod:`sqllm.formats.bitpack` directly: code ``j`` of a row is
stream bits ``[j*b, (j+1)*b)``, stream bit ``k`` is bit ``k % 32`` of word ``k // 32``; a code whose
bits straddle two words (3, 5, 6, 7 bits) is read from both through one 64-bit shift. The weight of
row ``i``, column ``j`` is then

* LUT:     ``lut[i, code]``
* uniform: ``scales[i, g] * (code - zeros[i, g])`` with ``g = group_ids[j // group_size]``

computed in float32 exactly as ``sqllm.codes`` dequantizes (bit for bit the reference weight).

Two product kernels share that weight reader:

* decode (``m <= DECODE_MAX`` rows of ``x``): each program owns a block of output rows and streams
  their packed words once, multiplying float32 weights by float32 activations (results within fp32
  round-off of ``x.float() @ W.T``). Long rows are split over several programs (split-K) whose
  partial sums are added in a fixed order, so results are deterministic.
* dot (more rows): tiles of weights are dequantized, rounded to ``x``'s dtype and fed to ``tl.dot``
  with float32 accumulation: ``x.float() @ W.to(x.dtype).float().T`` within fp32 round-off. Tensor
  cores multiply in x's dtype; for fp16/bf16 ``x`` this differs from the ops' float32-weight torch
  implementation by the weight's rounding to that dtype (no more than x's own). float32 ``x`` uses IEEE
  float32 products, exact as the torch implementation. Under the interpreter, which has no bf16
  arithmetic, bf16 ``x`` is multiplied in float32.

Tensors must be contiguous on one device; the wrappers make ``x`` contiguous and check the rest.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

DECODE_MAX = 4  # more tokens than this go through tl.dot tiles (tensor cores need 16 rows anyway)
_LUT, _UNIFORM = 0, 1
# The interpreter pays a large fixed cost per operation, per program and loop step, so under it the
# kernels take large tiles, which makes model-sized checks affordable. The kernels' own tests switch this off to run
# the GPU tiles (and with them partial and multiple blocks) on small shapes.
LARGE_INTERPRETER_TILES = True
# (BLOCK_N (rows), BLOCK_K (columns, or CSR entries)) per kernel; BLOCK_M follows from m (_tiles).
_GPU_TILES = {"decode1": (32, 128), "decode": (32, 64), "dot": (64, 64), "csr": (32, 32), "dequant": (32, 64)}
_LARGE_TILES = {"decode1": (256, 512), "decode": (256, 512), "dot": (256, 256), "csr": (256, 256),
                "dequant": (256, 512)}


@triton.jit
def _codes(q_ptr, stride_q, rows, cols, mask, BITS: tl.constexpr):
    """Codes of ``rows [BN] x cols [BK]`` (part-local columns): ``[BN, BK]`` int32, 0 where masked."""
    bit = cols * BITS
    word = bit >> 5
    shift = (bit & 31)[None, :]
    base = q_ptr + rows.to(tl.int64)[:, None] * stride_q + word[None, :]
    lo = tl.load(base, mask=mask, other=0)
    if 32 % BITS == 0:
        # The code lies inside one word; the arithmetic shift's sign bits fall outside the mask.
        codes = (lo >> shift) & ((1 << BITS) - 1)
    else:
        # A straddling code continues in the next word, which exists (the stream holds all its bits).
        spill = mask & (shift + BITS > 32)
        hi = tl.load(base + 1, mask=spill, other=0)
        both = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
        codes = ((both >> shift.to(tl.int64)) & ((1 << BITS) - 1)).to(tl.int32)
    return codes


@triton.jit
def _weights(q_ptr, t1_ptr, t2_ptr, gid_ptr, stride_q, stride_t, rows, row_mask, k0, cols, col_mask,
             KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized weights of ``rows [BN] x cols [BK]`` (``cols = k0 + arange(BK)``): ``[BN, BK]`` float32.

    KIND _LUT: t1 = lut [out, 2**BITS] fp16. KIND _UNIFORM: t1/t2 = scales/zeros [out, groups] fp16,
    gid = group_ids [ceil(n / GROUP)] int64. Masked entries are finite (0 or a table value).
    """
    mask = row_mask[:, None] & col_mask[None, :]
    codes = _codes(q_ptr, stride_q, rows, cols, mask, BITS)
    row_off = rows.to(tl.int64)[:, None] * stride_t
    if KIND == 0:
        w = tl.load(t1_ptr + row_off + codes, mask=mask, other=0.0).to(tl.float32)
    else:
        if GROUP % BLOCK_K == 0:
            # k0 is a multiple of BLOCK_K, so the whole tile lies in one group: one scale per row.
            g = tl.load(gid_ptr + k0 // GROUP)
            s = tl.load(t1_ptr + row_off + g, mask=row_mask[:, None], other=0.0).to(tl.float32)
            z = tl.load(t2_ptr + row_off + g, mask=row_mask[:, None], other=0.0).to(tl.float32)
        else:
            g = tl.load(gid_ptr + cols // GROUP, mask=col_mask, other=0)[None, :]
            s = tl.load(t1_ptr + row_off + g, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(t2_ptr + row_off + g, mask=mask, other=0.0).to(tl.float32)
        w = s * (codes.to(tl.float32) - z)  # the reference's order of operations: bit-exact weights
    return w


@triton.jit
def _decode_kernel(x_ptr, q_ptr, t1_ptr, t2_ptr, gid_ptr, y_ptr, M, OUT, N, K_SPLIT,
                   stride_xm, stride_q, stride_t, stride_ys, stride_ym,
                   KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, split s): ``y[s, :M, rows] = x[:, cols_s] @ W[rows, cols_s]^T`` in float32,
    ``cols_s = [s * K_SPLIT, (s + 1) * K_SPLIT)`` (K_SPLIT a multiple of BLOCK_K)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < OUT
    tokens = tl.arange(0, BLOCK_M)
    tok_mask = tokens < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(N, (split + 1) * K_SPLIT)
    for k0 in range(split * K_SPLIT, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        w = _weights(q_ptr, t1_ptr, t2_ptr, gid_ptr, stride_q, stride_t, rows, row_mask, k0, cols, col_mask,
                     KIND, BITS, GROUP, BLOCK_K)
        x = tl.load(x_ptr + tokens[:, None] * stride_xm + cols[None, :],
                    mask=tok_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = y_ptr + split * stride_ys + tokens[:, None] * stride_ym + rows[None, :]
    tl.store(out, acc, mask=tok_mask[:, None] & row_mask[None, :])


@triton.jit
def _dot_kernel(x_ptr, q_ptr, t1_ptr, t2_ptr, gid_ptr, y_ptr, M, OUT, N,
                stride_xm, stride_q, stride_t, stride_ym,
                KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, token block): ``y[tokens, rows] = x[tokens] @ W[rows]^T`` with the weight
    tiles rounded to x's dtype and float32 accumulation."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < OUT
    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_mask = tokens < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < N
        w = _weights(q_ptr, t1_ptr, t2_ptr, gid_ptr, stride_q, stride_t, rows, row_mask, k0, cols, col_mask,
                     KIND, BITS, GROUP, BLOCK_K)
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                    mask=tok_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    out = y_ptr + tokens.to(tl.int64)[:, None] * stride_ym + rows[None, :]
    tl.store(out, acc, mask=tok_mask[:, None] & row_mask[None, :])


@triton.jit
def _dequant_kernel(q_ptr, t1_ptr, t2_ptr, gid_ptr, w_ptr, OUT, N, stride_q, stride_t,
                    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column block): ``w[rows, cols]`` float32; KIND -1 writes the raw codes."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    row_mask = rows < OUT
    col_mask = cols < N
    if KIND < 0:
        w = _codes(q_ptr, stride_q, rows, cols, row_mask[:, None] & col_mask[None, :], BITS).to(tl.float32)
    else:
        w = _weights(q_ptr, t1_ptr, t2_ptr, gid_ptr, stride_q, stride_t, rows, row_mask, k0, cols, col_mask,
                     KIND, BITS, GROUP, BLOCK_K)
    tl.store(w_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], w,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _csr_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, y_ptr, M, OUT, stride_xm, stride_ym,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NZ: tl.constexpr):
    """Program (row block, token block): ``y[tokens, rows] = sum_k val[k] * x[tokens, col[k]]`` over the
    CSR entries of the rows, in float32. The block's entries are contiguous (rows are sorted), so the
    program walks them in chunks and routes each to its row by a product with a 0/1 membership matrix
    (BLOCK_M >= 16 for tl.dot)."""
    first = tl.program_id(0) * BLOCK_R
    rows = first + tl.arange(0, BLOCK_R)
    row_mask = rows < OUT
    tokens = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_mask = tokens < M
    row_start = tl.load(crow_ptr + rows, mask=row_mask, other=0)
    row_end = tl.load(crow_ptr + rows + 1, mask=row_mask, other=0)
    start = tl.load(crow_ptr + first)
    end = tl.load(crow_ptr + tl.minimum(first + BLOCK_R, OUT))
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_NZ):
        ks = k0 + tl.arange(0, BLOCK_NZ)
        k_mask = ks < end
        col = tl.load(col_ptr + ks, mask=k_mask, other=0)
        val = tl.load(val_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_xm + col[None, :],
                    mask=tok_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        terms = x * val[None, :]  # [BLOCK_M, BLOCK_NZ]
        member = ((ks[:, None] >= row_start[None, :]) & (ks[:, None] < row_end[None, :])).to(tl.float32)
        acc = tl.dot(terms, member, acc, input_precision="ieee")  # 0/1 weights: exact products
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * stride_ym + rows[None, :], acc,
             mask=tok_mask[:, None] & row_mask[None, :])


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_decode_kernel, triton.runtime.JITFunction)


def _check_device(*tensors: Tensor) -> torch.device:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"tensors are on different devices: {sorted({str(t.device) for t in tensors})}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); got {device}")
    return device


def _check_packed(qweight: Tensor, bits: int, n: int) -> None:
    words = -(-n * bits // 32)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 1..8")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] != words or not qweight.is_contiguous():
        raise ValueError(
            f"qweight must be contiguous int32 [out, {words}] for {n} codes of {bits} bits, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )


def _check_x(x: Tensor, n: int) -> Tensor:
    if x.dim() != 2 or x.shape[1] != n or not x.is_floating_point():
        raise ValueError(f"x must be a float [m, {n}] matrix, got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


def _tiles(kernel: str, m: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)`` of ``kernel`` for ``m`` rows of x (see LARGE_INTERPRETER_TILES).

    Decode takes the next power of two of m rows (one token gets longer row segments in the same
    registers); tl.dot tiles need at least 16.
    """
    table = _LARGE_TILES if LARGE_INTERPRETER_TILES and interpreting() else _GPU_TILES
    if kernel == "decode":
        return (triton.next_power_of_2(m), *table["decode1" if m == 1 else "decode"])
    return (16 if m <= 16 else 64, *table[kernel])


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(device: torch.device, row_blocks: int, n: int, block_k: int) -> int:
    """Columns per split-K program (a multiple of ``block_k``): enough programs to fill every SM twice,
    but at least four tiles each. Under the interpreter one program per row block (fastest)."""
    tiles = -(-n // block_k)
    if device.type != "cuda":
        return tiles * block_k
    splits = max(1, min(-(-2 * _sm_count(device.index or 0) // row_blocks), tiles // 4))
    return -(-tiles // splits) * block_k


def _dot_dtype(x: Tensor) -> Tensor:
    """The interpreter has no bfloat16 arithmetic: there bf16 activations run through float32 tiles."""
    return x.float() if x.dtype == torch.bfloat16 and interpreting() else x


def _matmul(x: Tensor, qweight: Tensor, t1: Tensor, t2: Tensor, gid: Tensor, kind: int, bits: int,
            group: int, n: int, split_k: int | None) -> Tensor:
    """``x [m, n] @ W^T`` -> ``[m, out]`` float32, decode or dot kernel by ``m`` (see the module doc)."""
    m, out = x.shape[0], qweight.shape[0]
    device = x.device
    if m == 0 or out == 0:
        return torch.zeros(m, out, dtype=torch.float32, device=device)
    if m <= DECODE_MAX:
        block_m, block_n, block_k = _tiles("decode", m)
        row_blocks = triton.cdiv(out, block_n)
        k_split = split_k or _split_k(device, row_blocks, n, block_k)
        if k_split % block_k:
            raise ValueError(f"split_k={k_split} must be a multiple of {block_k}")
        splits = triton.cdiv(n, k_split)
        y = torch.empty(splits, m, out, dtype=torch.float32, device=device)
        _decode_kernel[(row_blocks, splits)](
            x, qweight, t1, t2, gid, y, m, out, n, k_split,
            x.stride(0), qweight.stride(0), t1.stride(0), y.stride(0), y.stride(1),
            KIND=kind, BITS=bits, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
        return y[0] if splits == 1 else y.sum(0)
    x = _dot_dtype(x)
    block_m, block_n, block_k = _tiles("dot", m)
    y = torch.empty(m, out, dtype=torch.float32, device=device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for fp16/bf16 inputs
    _dot_kernel[(triton.cdiv(out, block_n), triton.cdiv(m, block_m))](
        x, qweight, t1, t2, gid, y, m, out, n,
        x.stride(0), qweight.stride(0), t1.stride(0), y.stride(0),
        KIND=kind, BITS=bits, GROUP=group, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y


def _check_lut(qweight: Tensor, lut: Tensor, bits: int, n: int) -> None:
    _check_packed(qweight, bits, n)
    if lut.dtype != torch.float16 or tuple(lut.shape) != (qweight.shape[0], 1 << bits) or not lut.is_contiguous():
        raise ValueError(f"lut must be contiguous float16 [{qweight.shape[0]}, {1 << bits}], got "
                         f"{lut.dtype} {tuple(lut.shape)}")


def _check_uniform(qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
                   bits: int, n: int) -> None:
    _check_packed(qweight, bits, n)
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be positive")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16 or t.dim() != 2 or t.shape[0] != qweight.shape[0] or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float16 [{qweight.shape[0]}, groups], got "
                             f"{t.dtype} {tuple(t.shape)}")
    if scales.shape != zeros.shape:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} differ in shape")
    groups = math.ceil(n / group_size)
    if group_ids.dtype != torch.int64 or tuple(group_ids.shape) != (groups,):
        raise ValueError(f"group_ids must be int64 [{groups}] for {n} columns in groups of {group_size}, "
                         f"got {group_ids.dtype} {tuple(group_ids.shape)}")


def lut_mm(x: Tensor, qweight: Tensor, lut: Tensor, bits: int, n: int, split_k: int | None = None) -> Tensor:
    """``x @ W^T`` with ``W[i, j] = lut[i, code[i, j]]``.

    x: [m, n] float; qweight: [out, ceil(n * bits / 32)] int32 (bitpack layout); lut: [out, 2**bits]
    float16. Returns [m, out] float32. ``split_k``: columns per decode program (a multiple of the
    decode tile; default chosen from the device), for tests of the split path.
    """
    _check_lut(qweight, lut, bits, n)
    x = _check_x(x, n)
    _check_device(x, qweight, lut)
    return _matmul(x, qweight, lut, lut, qweight, _LUT, bits, 1, n, split_k)


def uniform_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
               bits: int, n: int, split_k: int | None = None) -> Tensor:
    """``x @ W^T`` with ``W[i, j] = scales[i, g] * (code[i, j] - zeros[i, g])``, ``g = group_ids[j // group_size]``.

    x: [m, n] float, the part's columns; qweight: [out, ceil(n * bits / 32)] int32; scales, zeros:
    [out, n_groups_total] float16 (all groups of the matrix; a mixed-precision part indexes its own
    through group_ids: [ceil(n / group_size)] int64). Returns [m, out] float32.
    """
    _check_uniform(qweight, scales, zeros, group_ids, group_size, bits, n)
    x = _check_x(x, n)
    _check_device(x, qweight, scales, zeros, group_ids)
    return _matmul(x, qweight, scales, zeros, group_ids, _UNIFORM, bits, group_size, n, split_k)


def csr_mm(x: Tensor, sp_crow: Tensor, sp_col: Tensor, sp_val: Tensor) -> Tensor:
    """The sparse outliers times ``x``: ``x @ S^T`` -> ``[m, out]`` float32.

    x: [m, in] float; sp_crow: [out + 1] int32; sp_col: [nnz] int32; sp_val: [nnz] float (fp16, bf16 or
    fp32; multiplied in float32).
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [m, in] matrix, got {x.dtype} {tuple(x.shape)}")
    if sp_crow.dtype != torch.int32 or sp_crow.dim() != 1 or sp_crow.numel() < 1:
        raise ValueError(f"sp_crow must be int32 [out + 1], got {sp_crow.dtype} {tuple(sp_crow.shape)}")
    if sp_col.dtype != torch.int32 or sp_col.dim() != 1 or sp_col.shape != sp_val.shape:
        raise ValueError(f"sp_col must be int32 [nnz] like sp_val, got {sp_col.dtype} {tuple(sp_col.shape)} "
                         f"and {tuple(sp_val.shape)}")
    x = x.contiguous()
    _check_device(x, sp_crow, sp_col, sp_val)
    m, out = x.shape[0], sp_crow.numel() - 1
    if m == 0 or out == 0 or sp_val.numel() == 0:
        return torch.zeros(m, out, dtype=torch.float32, device=x.device)
    y = torch.empty(m, out, dtype=torch.float32, device=x.device)
    block_m, block_r, block_nz = _tiles("csr", m)
    _csr_kernel[(triton.cdiv(out, block_r), triton.cdiv(m, block_m))](
        x, sp_crow, sp_col, sp_val.contiguous(), y, m, out, x.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_NZ=block_nz,
    )
    return y


def _dequant(qweight: Tensor, t1: Tensor, t2: Tensor, gid: Tensor, kind: int, bits: int, group: int,
             n: int) -> Tensor:
    out = qweight.shape[0]
    w = torch.empty(out, n, dtype=torch.float32, device=qweight.device)
    if out and n:
        _, block_n, block_k = _tiles("dequant", 0)
        _dequant_kernel[(triton.cdiv(out, block_n), triton.cdiv(n, block_k))](
            qweight, t1, t2, gid, w, out, n, qweight.stride(0), t1.stride(0),
            KIND=kind, BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return w


def unpack_codes(qweight: Tensor, bits: int, n: int) -> Tensor:
    """The kernels' code reader on its own: ``[out, ceil(n * bits / 32)] int32`` -> ``[out, n] uint8``
    (same result as :func:`sqllm.formats.bitpack.unpack_codes`)."""
    _check_packed(qweight, bits, n)
    _check_device(qweight)
    return _dequant(qweight, qweight, qweight, qweight, -1, bits, 1, n).to(torch.uint8)


def lut_dequant(qweight: Tensor, lut: Tensor, bits: int, n: int) -> Tensor:
    """The weight :func:`lut_mm` multiplies by: ``[out, n]`` float32 (shapes as there)."""
    _check_lut(qweight, lut, bits, n)
    _check_device(qweight, lut)
    return _dequant(qweight, lut, lut, qweight, _LUT, bits, 1, n)


def uniform_dequant(qweight: Tensor, scales: Tensor, zeros: Tensor, group_ids: Tensor, group_size: int,
                    bits: int, n: int) -> Tensor:
    """The weight :func:`uniform_mm` multiplies by: ``[out, n]`` float32 (shapes as there)."""
    _check_uniform(qweight, scales, zeros, group_ids, group_size, bits, n)
    _check_device(qweight, scales, zeros, group_ids)
    return _dequant(qweight, scales, zeros, group_ids, _UNIFORM, bits, group_size, n)
