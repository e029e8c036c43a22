"""Validated, frozen configuration of every quantization method.

A config is checked when it is built (errors name the field, the value and the allowed range), and
serializes to a plain dict with :func:`config_to_dict` for ``quantization_config`` in ``config.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .codes import lut_row_bits
from .errors import InvalidConfig

CONFIG_VERSION = 1


def _check_range(name: str, value: float, lo: float, hi: float, fix: str = "") -> None:
    # ``not (lo <= v <= hi)`` also refuses NaN, which compares false with everything.
    if not (lo <= value <= hi):
        raise InvalidConfig(f"{name}={value} is outside [{lo}, {hi}]{'; ' + fix if fix else ''}")


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and group_size < 1:
        raise InvalidConfig(
            f"group_size={group_size} must be >= 1, or None (--group-size channel) for one group per output channel"
        )


def option(default: Any, help: str, *, flag: str | None = None, cli: bool = True) -> Any:
    """A config field that the CLI exposes as ``--field-name`` (or ``flag``) with ``help``.

    The CLI builds every method's flags from these fields (names, types, choices of ``Literal`` types),
    so a new method needs no CLI edit. ``cli=False`` keeps a field out of the command line.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli})


def required(help: str, *, flag: str | None = None) -> Any:
    """A config field without a default (the CLI makes its flag required)."""
    return field(metadata={"help": help, "flag": flag, "cli": True})


BITS_HELP = "bits per weight (the average, for mixed-precision methods)"
GROUP_HELP = "columns per group of input channels; 'channel' for one group per output channel"


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest: min-max asymmetric uniform quantization per channel or per group."""

    bits: int = required(BITS_HELP)
    group_size: int | None = option(None, GROUP_HELP)
    sym: bool = option(False, "symmetric grids (zero point in the middle)")

    def __post_init__(self) -> None:
        _check_range("bits", self.bits, 2, 8)
        _check_group_size(self.group_size)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al. 2022): Hessian-guided column-by-column rounding with error feedback."""

    bits: int = required(BITS_HELP)
    group_size: int | None = option(None, GROUP_HELP)
    sym: bool = option(False, "symmetric grids (zero point in the middle)")
    # 0.3, not the original GPTQ's 0.01 (pass --percdamp 0.01 for it): under protocol P at 3-bit g64 on
    # SmolLM2, 0.01 lost to RTN on text of another domain (SQLite docs 50.12 against RTN's 39.74); 0.1
    # and 0.3 beat RTN there (38.23, 38.19) and scored better in domain too (WikiText-2 58.13, 58.19
    # against 61.81); 1.0 was worse on both (75.07, 46.17): benchmarks/results/robustness.md
    percdamp: float = option(0.3, "Hessian damping, as a fraction of its mean diagonal")
    blocksize: int = option(128, "columns per GPTQ update block")
    act_order: bool = option(False, "quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = option(False, "fix every group's grid before the sweep (needed with act-order)")
    true_sequential: bool = option(True, "quantize a block's linears group by group, each seeing the "
                                         "quantized outputs of the ones before")

    def __post_init__(self) -> None:
        _check_range("bits", self.bits, 2, 8)
        _check_group_size(self.group_size)
        _check_range("percdamp", self.percdamp, 0.0, 1.0)
        if self.blocksize < 1:
            raise InvalidConfig(f"blocksize={self.blocksize} must be >= 1")
        if self.static_groups and self.group_size is None:
            raise InvalidConfig("static_groups needs a group_size; pass --group-size G or drop --static-groups")
        if self.act_order and self.group_size is not None and not self.static_groups:
            # groups fitted in act-order would hold scattered columns, not contiguous ones
            raise InvalidConfig(
                "act_order with group_size needs static_groups; pass --static-groups, or drop --act-order"
            )


@dataclass(frozen=True)
class SqueezeLLMConfig:
    """SqueezeLLM (Kim et al. 2023): Fisher-weighted per-channel k-means LUTs plus dense-and-sparse split.

    sensitive_pct: percent of each matrix's weights with the largest Fisher values kept exact (paper §4).
    outlier_pct:   percent of each matrix's weights, by magnitude, kept exact as outliers (ours).
    outlier_range: alternatively the paper's threshold ``T = max(|Q1 - r*IQR|, |Q3 + r*IQR|)`` with r given.
    """

    bits: int = required(BITS_HELP)
    sensitive_pct: float = option(0.0, "percent of most Fisher-sensitive weights kept exact", flag="--sensitive")
    outlier_pct: float = option(0.0, "percent of largest-magnitude weights kept exact", flag="--outliers")
    outlier_range: float | None = option(None, "outlier threshold factor r of the IQR rule")
    mixed: bool = option(False, "mixed-precision tables: each row gets 2, 3 or 4 bits by Fisher-weighted error, "
                                "averaging at most --bits bits per weight over all linears, tables included")

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise InvalidConfig(f"bits={self.bits} is not supported by squeezellm; choose 2, 3 or 4")
        if self.mixed and self.bits < 3:
            raise InvalidConfig(
                f"--mixed with --bits {self.bits}: the budget is below what 2-bit rows reach (2 bits per weight "
                "plus their tables); use --bits 3 or 4 with --mixed"
            )
        _check_range("sensitive_pct", self.sensitive_pct, 0.0, 10.0, "pass a percentage, e.g. 0.05")
        _check_range("outlier_pct", self.outlier_pct, 0.0, 10.0, "pass a percentage, e.g. 0.4")
        if self.outlier_range is not None and not (0 < self.outlier_range < math.inf):
            raise InvalidConfig(f"outlier_range={self.outlier_range} must be a finite number > 0, e.g. 1.5")
        if self.outlier_range is not None and self.outlier_pct > 0:
            raise InvalidConfig("give either outlier_pct or outlier_range, not both")

    def check_input_widths(self, in_features: Mapping[str, int]) -> None:
        """With ``mixed``, every linear's 2-bit rows (tables included) must fit the budget."""
        if not self.mixed:
            return
        short = sorted({f"{name.rsplit('.', 1)[-1]} (in={n})" for name, n in in_features.items()
                        if lut_row_bits(n, 2) > self.bits * n})
        if short:
            raise InvalidConfig(
                f"--mixed with --bits {self.bits} is below what 2-bit rows reach, tables included, for "
                f"{', '.join(short)}; raise --bits or drop --mixed"
            )


@dataclass(frozen=True)
class SqueezeLLMPlusConfig(SqueezeLLMConfig):
    """SqueezeLLM+ (ours): SqueezeLLM's tables and codes refined against the layer's output error under
    a Fisher-weighted input Hessian (``quant/squeezellm_plus.py``)."""

    iters: int = option(4, "refinement rounds, each a GPTQ sweep over the codes, then a least-squares table fit")
    percdamp: float = option(0.01, "Hessian damping, as a fraction of its mean diagonal")
    fisher_damp: float = option(0.01, "Fisher damping, as a fraction of each row's mean Fisher")
    true_sequential: bool = option(False, "quantize a block's linears group by group, each seeing the "
                                          "quantized outputs of the ones before")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0:
            raise InvalidConfig(f"iters={self.iters} must be >= 0")
        _check_range("percdamp", self.percdamp, 0.0, 1.0)
        _check_range("fisher_damp", self.fisher_damp, 0.0, 1.0)


@dataclass(frozen=True)
class SliMConfig:
    """SliM-LLM (Huang et al. 2024): salience-determined group bit allocation (SBA) and
    salience-weighted quantizer calibration (SQC) on top of GPTQ. ``bits`` is the average target.

    salience:          "cholesky" uses the diagonal of the Cholesky factor of H^-1 (as the reference
                       code), "inverse" the diagonal of H^-1 itself (as the paper's formula).
    sqc_grid/sqc_range: multipliers of each group-row's min-max range searched by SQC: 1 itself plus
                       ``sqc_grid`` points evenly over ``sqc_range`` (default 101 in [0.9, 1.1], as the
                       reference code).
    sqc_salient_frac/sqc_salient_weight: SQC minimizes a weighted squared error in which the
                       ``sqc_salient_frac`` most salient weights of the group (all rows) weigh
                       ``sqc_salient_weight`` and the rest 1; default: top 10% weigh 2. (The reference
                       code weighs |error|^2.4 and marks salient weights by z-score > 2.)
    """

    bits: int = required(BITS_HELP)
    group_size: int = option(64, GROUP_HELP)
    percdamp: float = option(0.01, "Hessian damping, as a fraction of its mean diagonal")
    blocksize: int = option(128, "columns per GPTQ update block")
    salience: Literal["cholesky", "inverse"] = option(
        "cholesky", "salience denominator: Cholesky factor of H^-1 (reference code) or H^-1 itself (paper)")
    sqc_grid: int = option(101, "SQC: range multipliers searched per group")
    sqc_range: tuple[float, float] = option((0.9, 1.1), "SQC: lowest and highest range multiplier")
    sqc_salient_frac: float = option(0.1, "SQC: fraction of each group's weights counted as salient")
    sqc_salient_weight: float = option(2.0, "SQC: weight of the salient weights' error")
    true_sequential: bool = option(True, "quantize a block's linears group by group, each seeing the "
                                         "quantized outputs of the ones before")

    def __post_init__(self) -> None:
        if self.bits not in (2, 3):
            raise InvalidConfig(f"bits={self.bits} is not supported by {self.method_name}; choose 2 or 3")
        if self.group_size is None:
            raise InvalidConfig(f"{self.method_name} allocates bits per group; pass --group-size G (e.g. 64)")
        _check_group_size(self.group_size)
        _check_range("percdamp", self.percdamp, 0.0, 1.0)
        if self.blocksize < 1:
            raise InvalidConfig(f"blocksize={self.blocksize} must be >= 1")
        if self.salience not in ("cholesky", "inverse"):
            raise InvalidConfig(f"salience={self.salience!r}; choose 'cholesky' or 'inverse'")
        if self.sqc_grid < 1:
            raise InvalidConfig(f"sqc_grid={self.sqc_grid} must be >= 1")
        lo, hi = self.sqc_range
        if not (0 < lo <= 1 <= hi < math.inf):
            raise InvalidConfig(f"sqc_range={self.sqc_range} must satisfy 0 < lo <= 1 <= hi")
        _check_range("sqc_salient_frac", self.sqc_salient_frac, 0.0, 1.0)
        _check_range("sqc_salient_weight", self.sqc_salient_weight, 1.0, math.inf)

    @property
    def method_name(self) -> str:
        return "slim"


@dataclass(frozen=True)
class SliMPlusConfig(SliMConfig):
    """SliM-LLM+: SliM-LLM followed by OmniQuant-style learnable weight clipping trained block by block
    (the block stage in ``engine/refine.py``)."""

    # OmniQuant trains at 1e-2 for far more steps; 10 epochs need more (SmolLM2: half the loss).
    lwc_epochs: int = option(10, "clipping training epochs per block")
    lwc_lr: float = option(5e-2, "clipping learning rate")
    lwc_samples: int = option(32, "calibration windows used for clipping training")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lwc_epochs < 0:
            raise InvalidConfig(f"lwc_epochs={self.lwc_epochs} must be >= 0")
        if not (0 < self.lwc_lr < math.inf):
            raise InvalidConfig(f"lwc_lr={self.lwc_lr} must be a finite number > 0; pass e.g. --lwc-lr 0.05")
        if self.lwc_samples < 1:
            raise InvalidConfig(f"lwc_samples={self.lwc_samples} must be >= 1; pass e.g. --lwc-samples 32")

    @property
    def method_name(self) -> str:
        return "slim+"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON form of a config (tuples become lists)."""
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; unknown keys are an error naming them."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InvalidConfig(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)
