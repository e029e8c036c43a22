"""The one registry of quantization methods: the single place a method is declared.

A :class:`MethodSpec` names the method's config class (whose fields are its options, and the CLI's
flags), its pure solver, the statistics the engine must collect for it, and an optional block stage.
Everything else (the CLI's ``--method`` choices and flags, the "supported methods are ..." messages, the
engine's accumulators, whether calibration text is needed) is derived from here.

A solver is a pure function ``solve(w [out, in], stats, cfg) -> QuantizedMatrix`` from ``quant/``;
a block stage runs in the engine after a block's linears are solved (block-level training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from .codes import QuantizedMatrix
from .config import GPTQConfig, RTNConfig, SliMConfig, SliMPlusConfig, SqueezeLLMConfig, SqueezeLLMPlusConfig
from .errors import InvalidConfig

if TYPE_CHECKING:
    from .engine.loop import BlockStage
    from .quant.gptq import PreparedHessian


class Accumulator(Protocol):
    """Fed with a linear's inputs one batch at a time (``x: [..., in]``), then asked for its result."""

    def update(self, x: Tensor) -> None: ...

    def result(self) -> Tensor: ...


@dataclass(frozen=True)
class StatContext:
    """What an accumulator factory may use besides the layer's input width.

    input_rows: rows of calibration inputs a sampler keeps;  per_batch: rows it takes from each batch
    seed: the seed of this linear's sampling (the run's seed plus the linear's index in its group)
    """

    input_rows: int
    per_batch: int
    seed: int


@dataclass(frozen=True)
class LayerStatistic:
    """A statistic of one linear's calibration inputs, accumulated by the block loop's hooks.

    name: the :class:`LayerStats` field the result fills;  make: ``(in_features, ctx) -> Accumulator``
    shared: the result depends on the input stream alone, so linears fed the very same tensor (q/k/v,
            gate/up) share one accumulator instead of each repeating the work
    """

    name: str
    make: Callable[[int, StatContext], Accumulator]
    shared: bool = False


def _hessian(n_in: int, ctx: StatContext) -> Accumulator:
    from .engine.stats import HessianAccumulator

    return HessianAccumulator(n_in)


def _inputs(n_in: int, ctx: StatContext) -> Accumulator:
    from .engine.stats import InputSampler

    return InputSampler(ctx.input_rows, ctx.per_batch, seed=ctx.seed)


# H = 2/n * sum_t x_t x_t^T over calibration tokens, [in, in] float32 (GPTQ's layer Hessian)
HESSIAN = LayerStatistic("hessian", _hessian, shared=True)
# a seeded sample of calibration input rows, [n_tok, in] float32 (each linear draws with its own seed)
INPUTS = LayerStatistic("inputs", _inputs)


@dataclass
class LayerStats:
    """What the engine hands a solver for one linear layer (fields it did not collect are None).

    fisher: the diagonal Fisher ``sum over windows of grad(W)**2``, ``[out, in]`` float32, from the
    model-level gradient pass (SqueezeLLM §3.2)
    derived: what a solver computed from the shared statistics alone (e.g. GPTQ's prepared Hessian),
    one dict for every linear that reads the same input, so q/k/v and gate/up compute it once
    """

    name: str
    hessian: Tensor | None = None
    inputs: Tensor | None = None
    fisher: Tensor | None = None
    plan: Any = None  # what the method's model-wide plan decided for this linear (MethodSpec.plan)
    derived: dict[Any, Any] = field(default_factory=dict)


# ``(layers) -> {full linear name: decision}`` over ``(full name, w [out, in], fisher [out, in])`` of
# every linear, streamed one at a time
Planner = Callable[[Iterable[tuple[str, Tensor, Tensor]]], dict[str, Any]]


@dataclass(frozen=True)
class StageOptions:
    """What a block stage factory gets besides the config."""

    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """One quantization method.

    config_cls:  frozen dataclass of its options (``config.py``); its fields are the CLI flags
    solve:       ``(w [out, in] float32, LayerStats, cfg) -> QuantizedMatrix``, pure
    layer_stats: statistics of each linear's inputs the block loop collects before solving it
    fisher:      whether it needs the model-level diagonal Fisher
    block_stage: ``(cfg, StageOptions) -> BlockStage`` run after a block's linears are solved, with the
                 block's full-precision outputs (block-level training); None for none
    plan:        ``cfg -> Planner | None``: where the config asks for one, a pass over every linear's
                 weight and Fisher before any is solved, whose per-linear decisions reach the solver as
                 ``LayerStats.plan`` (a model-wide bit budget); needs the Fisher up front
    """

    name: str
    config_cls: type
    solve: Callable[[Tensor, LayerStats, Any], QuantizedMatrix]
    summary: str
    layer_stats: tuple[LayerStatistic, ...] = ()
    fisher: bool = False
    block_stage: Callable[[Any, StageOptions], BlockStage] | None = field(default=None)
    plan: Callable[[Any], Planner | None] | None = None

    @property
    def needs_windows(self) -> bool:
        """Whether the block loop must run the calibration windows through the blocks."""
        return bool(self.layer_stats) or self.block_stage is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether the method learns from calibration text (a Fisher file can stand in for Fisher-only ones)."""
        return self.needs_windows or self.fisher


def _rtn(w: Tensor, stats: LayerStats, cfg: RTNConfig) -> QuantizedMatrix:
    from .quant.rtn import rtn_quantize

    return rtn_quantize(w, cfg)


def _prepared_hessian(stats: LayerStats, percdamp: float, act_order: bool) -> PreparedHessian:
    """GPTQ's prepared Hessian of this linear's input, built by the first linear that reads it."""
    from .quant.gptq import prepare_hessian

    assert stats.hessian is not None
    key = ("prepared_hessian", percdamp, act_order)
    if key not in stats.derived:
        stats.derived[key] = prepare_hessian(stats.hessian, percdamp, act_order, stats.name)
    return stats.derived[key]


def _gptq(w: Tensor, stats: LayerStats, cfg: GPTQConfig) -> QuantizedMatrix:
    from .quant.gptq import gptq_quantize

    assert stats.hessian is not None
    prepared = _prepared_hessian(stats, cfg.percdamp, cfg.act_order)
    return gptq_quantize(w, stats.hessian, cfg, name=stats.name, prepared=prepared)


def _squeezellm(w: Tensor, stats: LayerStats, cfg: SqueezeLLMConfig) -> QuantizedMatrix:
    from .quant.squeezellm import squeezellm_quantize

    return squeezellm_quantize(w, stats.fisher, cfg, row_bits=stats.plan)


def _squeezellm_plus(w: Tensor, stats: LayerStats, cfg: SqueezeLLMPlusConfig) -> QuantizedMatrix:
    from .quant.squeezellm_plus import squeezellm_plus_quantize

    assert stats.fisher is not None and stats.hessian is not None
    return squeezellm_plus_quantize(w, stats.fisher, stats.hessian, cfg, row_bits=stats.plan)


def _row_bits_plan(cfg: SqueezeLLMConfig) -> Planner | None:
    """Mixed-precision tables: one bit budget over every row of every linear (quant.squeezellm)."""
    if not cfg.mixed:
        return None
    from .quant.squeezellm import plan_row_bits

    return lambda layers: plan_row_bits(layers, cfg)


def _slim(w: Tensor, stats: LayerStats, cfg: SliMConfig) -> QuantizedMatrix:
    from .quant.slim import slim_quantize

    assert stats.hessian is not None and stats.inputs is not None
    # SliM-LLM+'s clipping re-rounds the values SliM's error-compensated sweep rounded.
    return slim_quantize(w, stats.hessian, stats.inputs, cfg, name=stats.name,
                         keep_rounded=isinstance(cfg, SliMPlusConfig),
                         prepared=_prepared_hessian(stats, cfg.percdamp, False))


def _lwc_stage(cfg: SliMPlusConfig, opts: StageOptions) -> BlockStage:
    from .engine.refine import lwc_block_stage

    return lwc_block_stage(cfg, seed=opts.seed, progress=opts.progress)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("rtn", RTNConfig, _rtn, "round-to-nearest min-max, per channel or group"),
        MethodSpec("gptq", GPTQConfig, _gptq, "GPTQ, Hessian error feedback", layer_stats=(HESSIAN,)),
        MethodSpec("squeezellm", SqueezeLLMConfig, _squeezellm, "Fisher-weighted k-means LUTs + dense-and-sparse",
                   fisher=True, plan=_row_bits_plan),
        MethodSpec("squeezellm+", SqueezeLLMPlusConfig, _squeezellm_plus,
                   "SqueezeLLM's LUTs refined against the Fisher-weighted layer output error",
                   layer_stats=(HESSIAN,), fisher=True, plan=_row_bits_plan),
        MethodSpec("slim", SliMConfig, _slim, "SliM-LLM mixed-precision groups", layer_stats=(HESSIAN, INPUTS)),
        MethodSpec("slim+", SliMPlusConfig, _slim, "SliM-LLM + learnable weight clipping",
                   layer_stats=(HESSIAN, INPUTS), block_stage=_lwc_stage),
    )
}


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``, or InvalidConfig listing the supported ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidConfig(f"unknown method {name!r}; supported methods are {', '.join(METHODS)}") from None
