"""Validated, frozen configuration of every quantization method.

A config is checked when it is built (errors name the field, the value and the allowed range), and
serializes to a plain dict with :func:`config_to_dict` for ``quantization_config`` in ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import InvalidConfig

CONFIG_VERSION = 1


def _check_range(name: str, value: float, lo: float, hi: float, fix: str = "") -> None:
    if not (lo <= value <= hi):
        raise InvalidConfig(f"{name}={value} is outside [{lo}, {hi}]{'; ' + fix if fix else ''}")


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and group_size < 1:
        raise InvalidConfig(
            f"group_size={group_size} must be >= 1 (or omitted / -1 for one group per output channel)"
        )


def normalize_group_size(group_size: int | None) -> int | None:
    """Map the command-line spellings of 'per output channel' (None, -1, 0 is rejected) to None."""
    return None if group_size is None or group_size == -1 else group_size


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest: min-max asymmetric uniform quantization per channel or per group."""

    bits: int
    group_size: int | None = None
    sym: bool = False

    def __post_init__(self) -> None:
        _check_range("bits", self.bits, 2, 8)
        _check_group_size(self.group_size)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al. 2022): Hessian-guided column-by-column rounding with error feedback."""

    bits: int
    group_size: int | None = None
    sym: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True

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

    bits: int
    sensitive_pct: float = 0.0
    outlier_pct: float = 0.0
    outlier_range: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise InvalidConfig(f"bits={self.bits} is not supported by squeezellm; choose 2, 3 or 4")
        _check_range("sensitive_pct", self.sensitive_pct, 0.0, 10.0, "pass a percentage, e.g. 0.05")
        _check_range("outlier_pct", self.outlier_pct, 0.0, 10.0, "pass a percentage, e.g. 0.4")
        if self.outlier_range is not None and self.outlier_range <= 0:
            raise InvalidConfig(f"outlier_range={self.outlier_range} must be > 0")
        if self.outlier_range is not None and self.outlier_pct > 0:
            raise InvalidConfig("give either outlier_pct or outlier_range, not both")


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
    lwc_*:             SliM-LLM+ learnable weight clipping (only used when ``lwc`` is True).
    """

    bits: int
    group_size: int = 64
    percdamp: float = 0.01
    blocksize: int = 128
    salience: str = "cholesky"
    sqc_grid: int = 101
    sqc_range: tuple[float, float] = (0.9, 1.1)
    sqc_salient_frac: float = 0.1
    sqc_salient_weight: float = 2.0
    true_sequential: bool = True
    lwc: bool = False
    lwc_epochs: int = 10
    lwc_lr: float = 5e-2  # OmniQuant trains at 1e-2 for far more steps; 10 epochs need more (SmolLM2: half the loss)
    lwc_samples: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (2, 3):
            raise InvalidConfig(f"bits={self.bits} is not supported by slim; choose 2 or 3")
        _check_group_size(self.group_size)
        _check_range("percdamp", self.percdamp, 0.0, 1.0)
        if self.blocksize < 1:
            raise InvalidConfig(f"blocksize={self.blocksize} must be >= 1")
        if self.salience not in ("cholesky", "inverse"):
            raise InvalidConfig(f"salience={self.salience!r}; choose 'cholesky' or 'inverse'")
        if self.sqc_grid < 1:
            raise InvalidConfig(f"sqc_grid={self.sqc_grid} must be >= 1")
        lo, hi = self.sqc_range
        if not (0 < lo <= 1 <= hi):
            raise InvalidConfig(f"sqc_range={self.sqc_range} must satisfy 0 < lo <= 1 <= hi")
        _check_range("sqc_salient_frac", self.sqc_salient_frac, 0.0, 1.0)
        if self.sqc_salient_weight < 1:
            raise InvalidConfig(f"sqc_salient_weight={self.sqc_salient_weight} must be >= 1")
        if self.lwc_epochs < 0:
            raise InvalidConfig(f"lwc_epochs={self.lwc_epochs} must be >= 0")


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
