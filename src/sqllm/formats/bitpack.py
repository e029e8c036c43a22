"""Pack b-bit codes (1..8 bits) into int32 words along the input dimension.

Layout of one row: code ``j`` occupies bits ``[j*b, (j+1)*b)`` of a bit stream, least significant bit
first, and stream bit ``k`` is bit ``k % 32`` of word ``k // 32``. A 3-bit code may therefore straddle two
words. Read as little-endian bytes the words are the same stream eight bits at a time, so both
directions work on *blocks* of ``lcm(b, 8)`` bits (1 byte for b in 1, 2, 4, 8; 3 bytes holding 8 3-bit
or 4 6-bit codes; ...) with uint8 arithmetic: a handful of contiguous byte operations instead of one
int32 shift per code, which is what eager torch on a CPU does fast.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_BITS, MAX_BITS = 1, 8


def packed_words(n: int, bits: int) -> int:
    """int32 words that hold ``n`` codes of ``bits`` bits: ``ceil(n * bits / 32)``."""
    return -(-n * bits // 32)


def block_shape(bits: int) -> tuple[int, int]:
    """``(bytes, codes)`` of the smallest byte-aligned block of ``bits``-bit codes."""
    _check_bits(bits)
    block_bits = math.lcm(bits, 8)
    return block_bits // 8, block_bits // bits


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} is outside the packable range {MIN_BITS}..{MAX_BITS}")


def _check_little_endian() -> None:
    # Reinterpreting int32 words as bytes gives the stream order only on little-endian hosts.
    if sys.byteorder != "little":
        raise NotImplementedError("sqllm bit packing needs a little-endian host")


def _slots(bits: int, codes_per_block: int) -> list[tuple[int, int, int]]:
    """For code k of a block: (k, byte it starts in, bit shift within that byte)."""
    return [(k, *divmod(k * bits, 8)) for k in range(codes_per_block)]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes: [out, n] uint8`` (each ``< 2**bits``) into ``[out, packed_words(n, bits)] int32``."""
    _check_little_endian()
    block_bytes, cpb = block_shape(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-d uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    out, n = codes.shape
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"codes hold {int(codes.max())}, which does not fit in {bits} bits")
    blocks = -(-n // cpb)
    # Planar [out, cpb, blocks]: code k of every block side by side, so each step is a contiguous op.
    c = F.pad(codes, (0, cpb * blocks - n)).view(out, blocks, cpb).transpose(1, 2).contiguous()
    planes = torch.zeros(out, block_bytes, blocks, dtype=torch.uint8, device=codes.device)
    for k, byte, shift in _slots(bits, cpb):
        # uint8 shifts drop the high bits, which are exactly the ones that spill into the next byte.
        planes[:, byte] |= c[:, k] << shift
        if shift + bits > 8:
            planes[:, byte + 1] |= c[:, k] >> (8 - shift)
    stream = planes.transpose(1, 2).reshape(out, blocks * block_bytes)
    # Whole blocks may overrun the words (by zero padding bytes only) or fall short of them.
    words = torch.zeros(out, 4 * packed_words(n, bits), dtype=torch.uint8, device=codes.device)
    used = min(words.shape[1], stream.shape[1])
    words[:, :used] = stream[:, :used]
    return words.view(torch.int32)


def unpack_planar(packed: Tensor, bits: int, n: int, pad_to: int = 0) -> Tensor:
    """Codes in block-planar order: ``[out, packed_words(n, bits)] int32`` -> ``[out, cpb, L] uint8``.

    ``cpb`` = codes per block (:func:`block_shape`), ``L = ceil(max(n, pad_to) / cpb)`` blocks; entry
    ``[i, k, m]`` is the code of column ``m * cpb + k``, and 0 for padding columns from ``n`` on. A
    compute path that permutes ``x`` to this order (:func:`planar_columns`) skips the interleave copy.
    """
    _check_little_endian()
    block_bytes, cpb = block_shape(bits)
    out, words = packed.shape
    if packed.dtype != torch.int32 or words != packed_words(n, bits):
        raise ValueError(
            f"packed must be int32 [out, {packed_words(n, bits)}] for {n} codes of {bits} bits, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    blocks = -(-max(n, pad_to) // cpb)
    stream = packed.contiguous().view(torch.uint8)
    extra = blocks * block_bytes - stream.shape[1]
    if extra:  # zero-pad, or crop bytes past the last code (a negative pad crops)
        stream = F.pad(stream, (0, extra))
    planes = stream.view(out, blocks, block_bytes).transpose(1, 2)
    if block_bytes > 1:
        planes = planes.contiguous()
    mask = (1 << bits) - 1
    fields = []
    for _, byte, shift in _slots(bits, cpb):
        code = torch.bitwise_right_shift(planes[:, byte], shift) if shift else planes[:, byte]
        if shift + bits > 8:
            code = code | torch.bitwise_left_shift(planes[:, byte + 1], 8 - shift)
        fields.append(code if shift + bits == 8 else code & mask)  # a byte's top field needs no mask
    # One stack of contiguous fields: writing each into a strided slice of the result is several
    # times slower in eager torch.
    codes = torch.stack(fields, dim=1)
    return codes


def planar_columns(bits: int, n: int, pad_to: int = 0) -> Tensor:
    """Column of each flattened position of :func:`unpack_planar`'s order: ``[cpb * L] int64``.

    Padding positions get column ``n`` (point them at a zero column).
    """
    _, cpb = block_shape(bits)
    blocks = -(-max(n, pad_to) // cpb)
    cols = torch.arange(cpb * blocks).view(blocks, cpb).T.reshape(-1)
    return cols.clamp(max=n)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``[out, packed_words(n, bits)] int32`` -> ``[out, n] uint8``."""
    out = packed.shape[0]
    return unpack_planar(packed, bits, n).transpose(1, 2).reshape(out, -1)[:, :n].contiguous()
