"""QuantLinear modules computing with packed quantized weights, and the module swap."""

from .qlinear import DECODE_TOKENS, PATHS, QuantLinear, quant_linear_from_meta, replace_linear

__all__ = ["DECODE_TOKENS", "PATHS", "QuantLinear", "quant_linear_from_meta", "replace_linear"]
