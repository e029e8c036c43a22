"""The one registry of quantization methods: name -> config class, solver, statistics it needs.

The CLI's ``--method`` choices and every "supported methods are ..." message come from here.
A solver is a pure function ``solve(w [out, in], stats, cfg) -> QuantizedMatrix``; the engine
collects the statistics a method asks for and never does per-matrix math itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from .codes import QuantizedMatrix
from .config import GPTQConfig, RTNConfig, SliMConfig, SqueezeLLMConfig
from .errors import InvalidConfig

# Statistics the engine can collect per linear layer.
HESSIAN = "hessian"  # H = 2/n * sum_t x_t x_t^T over calibration tokens, [in, in] float32
INPUTS = "inputs"  # a seeded sample of calibration input rows, [n_tok, in] float32
FISHER = "fisher"  # diagonal Fisher: sum over windows of grad(W)**2, [out, in] float32 (model-level pass)


@dataclass
class LayerStats:
    """What the engine hands a solver for one linear layer (fields it did not collect are None)."""

    name: str
    hessian: Tensor | None = None
    inputs: Tensor | None = None
    fisher: Tensor | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    needs: frozenset[str]
    solve: Callable[[Tensor, LayerStats, Any], QuantizedMatrix]
    summary: str


def _rtn(w: Tensor, stats: LayerStats, cfg: RTNConfig) -> QuantizedMatrix:
    from .quant.rtn import rtn_quantize

    return rtn_quantize(w, cfg)


def _gptq(w: Tensor, stats: LayerStats, cfg: GPTQConfig) -> QuantizedMatrix:
    from .quant.gptq import gptq_quantize

    return gptq_quantize(w, stats.hessian, cfg, name=stats.name)


def _squeezellm(w: Tensor, stats: LayerStats, cfg: SqueezeLLMConfig) -> QuantizedMatrix:
    from .quant.squeezellm import squeezellm_quantize

    return squeezellm_quantize(w, stats.fisher, cfg)


def _slim(w: Tensor, stats: LayerStats, cfg: SliMConfig) -> QuantizedMatrix:
    from .quant.slim import slim_quantize

    return slim_quantize(w, stats.hessian, stats.inputs, cfg, name=stats.name)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("rtn", RTNConfig, frozenset(), _rtn, "round-to-nearest min-max, per channel or group"),
        MethodSpec("gptq", GPTQConfig, frozenset({HESSIAN}), _gptq, "GPTQ, Hessian error feedback"),
        MethodSpec(
            "squeezellm", SqueezeLLMConfig, frozenset({FISHER}), _squeezellm,
            "Fisher-weighted k-means LUTs + dense-and-sparse",
        ),
        MethodSpec("slim", SliMConfig, frozenset({HESSIAN, INPUTS}), _slim, "SliM-LLM mixed-precision groups"),
        MethodSpec(
            "slim+", SliMConfig, frozenset({HESSIAN, INPUTS}), _slim,
            "SliM-LLM + learnable weight clipping",
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidConfig(f"unknown method {name!r}; supported methods are {', '.join(METHODS)}") from None
