"""SqueezeLLM (Kim et al. 2023): sensitivity-weighted non-uniform LUTs plus a dense-and-sparse split.

* §3.2: each output channel gets its own lookup table of ``2**bits`` values, the centroids of a 1-D
  k-means weighted by the diagonal Fisher information (Eq. 4), so that the values the loss is most
  sensitive to are reproduced most closely.
* §4: a small fraction of values is kept exact in a sparse matrix: the most sensitive ones (largest
  Fisher values over the whole matrix) and the outliers (largest magnitudes among the rest). They get
  zero weight in k-means, so they no longer stretch the tables.

Every extracted value gets the dense code of its row's table entry nearest 0 (the cheapest place to
park it) and the sparse part stores ``original - entry``, so ``dense + sparse`` equals the original
bit for bit at every extracted position (checked, see :func:`_exact_sparse`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..codes import LUTCodes, QuantizedMatrix, SparseOutliers
from ..config import SqueezeLLMConfig
from ..errors import InvalidConfig
from .kmeans import nearest_codes, weighted_kmeans, weighted_kmeans_objective


def _percent_count(pct: float, total: int) -> int:
    """Number of values that ``pct`` percent of ``total`` stands for (rounded to nearest)."""
    return int(round(pct / 100.0 * total))


def _top_count(score: Tensor, count: int) -> Tensor:
    """Bool mask of exactly ``count`` largest entries of ``score`` (any shape).

    Ties at the threshold are broken by position (row-major), so the count is exact and deterministic
    even for bf16-valued weights, which repeat often.
    """
    flat = score.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count <= 0:
        return mask.view(score.shape)
    count = min(count, flat.numel())
    threshold = flat.kthvalue(flat.numel() - count + 1).values  # the count-th largest value
    above = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: count - int(above.sum())]
    mask |= above
    mask[ties] = True
    return mask.view(score.shape)


def _quantile(flat: Tensor, q: float) -> float:
    """Linear-interpolation quantile of a 1-D tensor (like ``torch.quantile``, which caps input size)."""
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    v_lo = float(flat.kthvalue(lo + 1).values)
    v_hi = float(flat.kthvalue(hi + 1).values)
    return v_lo + (pos - lo) * (v_hi - v_lo)


def iqr_threshold(w: Tensor, r: float) -> float:
    """``T = max(|Q1 - r IQR|, |Q3 + r IQR|)`` over all values of ``w`` (paper §4, outlier range)."""
    flat = w.flatten()
    q1, q3 = _quantile(flat, 0.25), _quantile(flat, 0.75)
    iqr = q3 - q1
    return max(abs(q1 - r * iqr), abs(q3 + r * iqr))


def extraction_masks(w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig) -> tuple[Tensor, Tensor]:
    """(sensitive, outliers) bool masks ``[out, in]``, disjoint.

    sensitive: the ``cfg.sensitive_pct`` % largest Fisher values of the matrix.
    outliers:  among the rest, ``|w| >= T`` with ``T`` removing ``cfg.outlier_pct`` % of the matrix by
               magnitude, or ``T`` from :func:`iqr_threshold` when ``cfg.outlier_range`` is set.
    """
    total = w.numel()
    sensitive = torch.zeros_like(w, dtype=torch.bool)
    if cfg.sensitive_pct > 0:
        assert fisher is not None  # checked by _check_inputs
        sensitive = _top_count(fisher, _percent_count(cfg.sensitive_pct, total))
    magnitude = w.abs().masked_fill(sensitive, -1.0)  # sensitive values are already out
    if cfg.outlier_range is not None:
        outliers = magnitude >= iqr_threshold(w, cfg.outlier_range)
    else:
        count = min(_percent_count(cfg.outlier_pct, total), total - int(sensitive.sum()))
        outliers = _top_count(magnitude, count)
    return sensitive, outliers


def _kmeans_weight(w: Tensor, fisher: Tensor | None, extracted: Tensor) -> Tensor:
    """k-means weights ``[out, in]``: Fisher (or 1), zero at extracted values.

    A row whose remaining Fisher is all zero is weighted uniformly over its remaining values, so the
    extracted ones still do not pull its centroids.
    """
    keep = (~extracted).float()
    weight = keep if fisher is None else fisher.float() * keep
    return torch.where(weight.sum(1, keepdim=True) > 0, weight, keep)


def _exact_sparse(w: Tensor, extracted: Tensor, lut: Tensor, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Park extracted values on their row's entry nearest 0; returns (lut, codes, zeroed rows).

    ``fl(entry + fl(w - entry)) == w`` holds unless ``|w|`` is far below ``|entry|`` (then ``w - entry``
    needs more bits than float32 has). In a row where that happens, the entry nearest 0 becomes exactly
    0 (it stays sorted: its neighbours are on either side of 0) and the row's codes are re-assigned.
    """
    zero_code = lut.abs().argmin(dim=1, keepdim=True)  # [out, 1]
    entry = lut.gather(1, zero_code)
    inexact = extracted & ((entry + (w - entry)) != w)
    zeroed = inexact.any(dim=1)
    if bool(zeroed.any()):
        lut = lut.clone()
        lut[zeroed] = lut[zeroed].scatter(1, zero_code[zeroed], 0.0)
        codes = codes.clone()
        codes[zeroed] = nearest_codes(w[zeroed], lut[zeroed])
    codes = torch.where(extracted, zero_code.to(codes.dtype), codes)
    return lut, codes, zeroed


def _check_inputs(w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig) -> None:
    if w.dim() != 2:
        raise InvalidConfig(f"squeezellm quantizes [out, in] matrices; got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise InvalidConfig("the weight matrix has NaN or infinite values; squeezellm cannot quantize it")
    if fisher is None:
        if cfg.sensitive_pct > 0:
            raise InvalidConfig(
                f"sensitive_pct={cfg.sensitive_pct} needs Fisher information; compute it "
                "(`sqllm sensitivity`) or set sensitive_pct=0"
            )
        return
    if fisher.shape != w.shape:
        raise InvalidConfig(f"Fisher shape {tuple(fisher.shape)} differs from the weight's {tuple(w.shape)}")
    if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
        raise InvalidConfig("Fisher information must be finite and >= 0 (a sum of squared gradients)")


def squeezellm_quantize(w: Tensor, fisher: Tensor | None, cfg: SqueezeLLMConfig) -> QuantizedMatrix:
    """Quantize ``w: [out, in]`` with Fisher ``fisher: [out, in]`` (None: unweighted k-means).

    Returns ``QuantizedMatrix(dense=LUTCodes(codes [out, in] uint8, lut [out, 2**bits] fp16-exact),
    sparse=SparseOutliers | None, info)``; ``info`` counts the extracted values (and their percentage of
    the matrix), the rows whose entry nearest 0 had to become 0, and the Fisher-weighted k-means
    objective over the non-extracted values.
    """
    _check_inputs(w, fisher, cfg)
    w = w.float()
    sensitive, outliers = extraction_masks(w, fisher, cfg)
    extracted = sensitive | outliers
    weight = _kmeans_weight(w, fisher, extracted)
    # Codes are assigned to the fp16-rounded table, so a stored fp16 LUT reproduces this matrix exactly.
    lut, codes = weighted_kmeans(w, weight, 2**cfg.bits, fp16=True)
    lut, codes, zeroed = _exact_sparse(w, extracted, lut, codes)
    sparse = None
    if bool(extracted.any()):
        rows, cols = extracted.nonzero(as_tuple=True)  # row-major: sorted by row, then column
        values = w[rows, cols] - lut[rows, codes[rows, cols].long()]
        sparse = SparseOutliers(rows=rows, cols=cols, values=values, shape=tuple(w.shape))
    total = w.numel()
    n_sensitive, n_outliers = int(sensitive.sum()), int(outliers.sum())
    info = {
        "sensitive": n_sensitive,
        "sensitive_pct": 100.0 * n_sensitive / total,
        "outliers": n_outliers,
        "outlier_pct": 100.0 * n_outliers / total,
        "zeroed_lut_rows": int(zeroed.sum()),
        "kmeans_objective": float(weighted_kmeans_objective(w, weight, lut, codes).sum()),
    }
    return QuantizedMatrix(dense=LUTCodes(codes=codes, lut=lut, bits=cfg.bits), sparse=sparse, info=info)
