"""transformers integration: ``import sqllm`` lets ``AutoModelForCausalLM.from_pretrained(dir)`` read a
packed sqllm checkpoint.

The quantizer swaps every quantized ``nn.Linear`` named in ``quantization_config.layers`` for a
QuantLinear with the one swap loop of :mod:`sqllm.nn.loader` before the weights are loaded; transformers
then fills the packed tensors by name, after the same strict checks as :func:`sqllm.api.load_quantized`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import CorruptCheckpoint

METHOD = "sqllm"


class SqllmConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of a packed checkpoint, kept as written."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, **kwargs: Any):
        self.quant_method = METHOD  # type: ignore[assignment]  # transformers types it as its own enum
        self.layers = layers or {}
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SqllmHfQuantizer(HfQuantizer):
    """Loads pre-quantized sqllm checkpoints (quantizing through transformers is not supported), as
    strictly as :func:`sqllm.nn.loader.load_packed`: the same format version check, shard names inside the
    folder, every expected tensor stored and nothing else, layouts checked, no NaN or infinity."""

    requires_calibration = True
    quantization_config: SqllmConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        from .formats.checkpoint import check_quantization_config

        check_quantization_config(quantization_config.to_dict(), "quantization_config")
        super().__init__(quantization_config, **kwargs)
        self._metas: dict[str, Any] = {}

    def _process_model_before_weight_loading(
        self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        from .formats.checkpoint import read_index, stored_names
        from .nn.loader import check_names, swap_quant_linears

        self._metas = swap_quant_linears(model, self.quantization_config.layers)
        files = [os.path.abspath(f) for f in checkpoint_files or []]
        name = str(getattr(model.config, "name_or_path", "") or "")
        folder = Path(name) if os.path.isdir(name) else Path(files[0]).parent if files else None
        if folder is None:
            raise CorruptCheckpoint("a packed sqllm checkpoint needs its safetensors shards")
        listed = {os.path.abspath(folder / f) for f in read_index(folder).values()}
        outside = sorted(set(files) - listed)
        if outside:
            raise CorruptCheckpoint(f"{outside[0]} is not a shard listed in {folder}'s index")
        check_names(model, stored_names(folder), str(folder))

    def update_dtype(self, dtype: Any) -> Any:
        """Compute in the dtype the model was quantized in; the 16-bit stored embeddings and head are
        widened to it on load (``sqllm.api.load_quantized`` keeps them 16-bit instead)."""
        import torch

        stored = (getattr(self.quantization_config, "dense16", None) or {}).get("compute_dtype")
        return getattr(torch, stored) if stored else dtype

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from .formats.layouts import validate_tensors
        from .nn.loader import check_finite

        where = str(getattr(model.config, "name_or_path", "") or "the checkpoint")
        for name, meta in self._metas.items():
            prefix = f"{name}."
            validate_tensors({prefix + k: v for k, v in model.get_submodule(name).state_dict().items()}, prefix, meta)
        check_finite(model.state_dict().items(), where)
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
