"""QuantLinear modules computing with packed quantized weights, and the module swap."""

from .qlinear import QuantLinear, quant_linear_from_meta, replace_linear

__all__ = ["QuantLinear", "quant_linear_from_meta", "replace_linear"]
