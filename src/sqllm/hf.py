"""transformers integration: ``import sqllm`` lets ``AutoModelForCausalLM.from_pretrained(dir)`` read a
packed sqllm checkpoint.

The quantizer swaps every quantized ``nn.Linear`` named in ``quantization_config.layers`` for a
QuantLinear with the one swap loop of :mod:`sqllm.nn.loader` before the weights are loaded; transformers
then fills the packed tensors by name. :func:`sqllm.api.load_quantized` does the same without
transformers' loader and with stricter checks.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "sqllm"


class SqllmConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a packed checkpoint, kept as written."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, **kwargs: Any):
        self.quant_method = METHOD
        self.layers = layers or {}
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SqllmHfQuantizer(HfQuantizer):
    """Loads pre-quantized sqllm checkpoints (quantizing through transformers is not supported)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        from .nn.loader import swap_quant_linears

        swap_quant_linears(model, self.quantization_config.layers)

    def update_dtype(self, dtype: Any) -> Any:
        """Compute in the dtype the model was quantized in; the 16-bit stored embeddings and head are
        widened to it on load (``sqllm.api.load_quantized`` keeps them 16-bit instead)."""
        import torch

        stored = (getattr(self.quantization_config, "dense16", None) or {}).get("compute_dtype")
        return getattr(torch, stored) if stored else dtype

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer under ``quant_method: "sqllm"`` (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(METHOD, SqllmConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(METHOD, SqllmHfQuantizer)
