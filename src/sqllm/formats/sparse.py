"""Sparse outliers stored as CSR tensors: ``crow [out+1] int32``, ``col [nnz] int32``, ``val [nnz]``.

CSR rather than COO because the row pointers cost ``out + 1`` int32 instead of ``nnz``, and a reader
can check every invariant (monotone pointers, columns in range and strictly increasing within a row)
with a few vectorized comparisons.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..codes import SparseOutliers
from ..errors import CorruptCheckpoint


def coo_to_csr(sp: SparseOutliers, value_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``sp`` (COO, sorted by row then column, no duplicates) -> ``(crow, col, val)``.

    crow: [out + 1] int32;  col: [nnz] int32;  val: [nnz] ``value_dtype``.
    Raises ValueError when ``sp`` is unsorted, has duplicates or out-of-range indices, or when its values
    are not exactly representable in ``value_dtype`` (the stored model would then differ from the
    in-memory one).
    """
    out, n_in = sp.shape
    rows, cols = sp.rows.long(), sp.cols.long()
    if sp.nnz and (rows.min() < 0 or rows.max() >= out or cols.min() < 0 or cols.max() >= n_in):
        raise ValueError(f"sparse outlier indices fall outside the matrix shape {sp.shape}")
    key = rows * n_in + cols
    if not bool((key[1:] > key[:-1]).all()):
        raise ValueError("sparse outliers must be sorted by row then column, without duplicates")
    val = sp.values.to(value_dtype)
    if not torch.equal(val.to(sp.values.dtype), sp.values):
        raise ValueError(
            f"sparse outlier values are not exactly representable in {value_dtype}; "
            "store them in float32 or round them in the quantizer"
        )
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    return crow.to(torch.int32), cols.to(torch.int32), val


def csr_rows(crow: Tensor) -> Tensor:
    """Row index of every stored entry: ``crow [out+1]`` -> ``[nnz] int64``."""
    counts = torch.diff(crow.long())
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def csr_to_coo(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> SparseOutliers:
    """Inverse of :func:`coo_to_csr`; values come back as float32 (exactly)."""
    return SparseOutliers(rows=csr_rows(crow), cols=col.long(), values=val.float(), shape=shape)


def check_csr(crow: Tensor, col: Tensor, n_in: int, names: tuple[str, str] = ("sp_crow", "sp_col")) -> None:
    """Raise CorruptCheckpoint, naming the tensor, unless ``(crow [out+1], col [nnz])`` is valid CSR.

    Shapes and dtypes are the caller's check (``layouts``); this checks the contents.
    """
    crow_name, col_name = names
    c = crow.long()
    if int(c[0]) != 0 or int(c[-1]) != col.numel():
        raise CorruptCheckpoint(
            f"{crow_name} must run from 0 to nnz={col.numel()}, runs from {int(c[0])} to {int(c[-1])}"
        )
    if bool((c[1:] < c[:-1]).any()):
        raise CorruptCheckpoint(f"{crow_name} decreases; CSR row pointers must be non-decreasing")
    k = col.long()
    if col.numel() and (int(k.min()) < 0 or int(k.max()) >= n_in):
        raise CorruptCheckpoint(f"{col_name} holds column indices outside [0, {n_in})")
    rows = csr_rows(crow)
    same_row = rows[1:] == rows[:-1]
    if bool((same_row & (k[1:] <= k[:-1])).any()):
        raise CorruptCheckpoint(f"{col_name} is not strictly increasing within a row (unsorted or duplicate)")
