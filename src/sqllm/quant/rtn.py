"""Round-to-nearest (RTN): the calibration-free baseline."""

from __future__ import annotations

from torch import Tensor

from ..codes import QuantizedMatrix
from ..config import RTNConfig
from .uniform import quantize_groups_minmax


def rtn_quantize(w: Tensor, cfg: RTNConfig) -> QuantizedMatrix:
    """Quantize ``w: [out, in]`` with min-max uniform grids per output channel or per column group."""
    return QuantizedMatrix(dense=quantize_groups_minmax(w, cfg.bits, cfg.group_size, cfg.sym))
