"""The one loader of packed sqllm checkpoints.

``api.load_quantized``, ``api.load_model`` on a packed folder and the transformers quantizer
(``sqllm.hf``) all come here: a skeleton on the meta device, every quantized ``nn.Linear`` swapped for
an empty QuantLinear built from its layer meta (:func:`swap_quant_linears`, the one swap loop), then the
stored tensors assigned after every one of them is checked against the layout table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CorruptCheckpoint
from ..formats.checkpoint import read_quantization_config, read_tensors
from ..formats.layouts import LayerMeta, validate_tensors
from .dense16 import use_dense16
from .qlinear import QuantLinear, replace_linear


def swap_quant_linears(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> dict[str, LayerMeta]:
    """Replace each ``nn.Linear`` named in ``layers`` (name -> JSON layer meta) by an empty QuantLinear on
    the meta device; returns the parsed metas. A name the model lacks is a CorruptCheckpoint."""
    metas = {}
    for name, meta_dict in layers.items():
        meta = LayerMeta.from_dict(meta_dict, where=name)
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CorruptCheckpoint(f"quantized layer {name!r} does not exist in this model's architecture") from None
        if not isinstance(linear, nn.Linear):
            raise CorruptCheckpoint(f"quantized layer {name!r} is a {type(linear).__name__}, not a linear layer")
        if (linear.out_features, linear.in_features) != tuple(meta.shape):
            raise CorruptCheckpoint(
                f"quantized layer {name!r} is {list(meta.shape)} in quantization_config but "
                f"[{linear.out_features}, {linear.in_features}] in config.json's architecture"
            )
        bias_dtype = linear.weight.dtype if linear.bias is not None else None
        replace_linear(model, name, QuantLinear(meta, bias_dtype, device="meta"))
        metas[name] = meta
    return metas


def _skeleton(path: Path) -> nn.Module:
    """The model with parameters on the meta device (no memory, no init) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its norms (kept as the source stored them), else float32."""
    for module in model.modules():
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            return module.weight.dtype
    return torch.float32


def load_packed(path: str | Path, *, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a packed checkpoint folder as ``(model, tokenizer)`` with QuantLinear modules (eval mode).

    Every tensor the model expects must be stored, and nothing else: tied weights are the only names
    allowed to be absent.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    qc = read_quantization_config(path)
    tensors = read_tensors(path)
    model = _skeleton(path)
    for name, meta in swap_quant_linears(model, qc["layers"]).items():
        validate_tensors(tensors, f"{name}.", meta)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and k.split(".")[-1] not in tied]
    if missing:
        raise CorruptCheckpoint(f"tensor {missing[0]!r} is missing from the checkpoint at {path}")
    if result.unexpected_keys:
        raise CorruptCheckpoint(f"tensor {result.unexpected_keys[0]!r} in the checkpoint has no place in the model")
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CorruptCheckpoint(f"tensor {leftover[0]!r} is missing from the checkpoint at {path}")
    if (qc.get("dense16") or {}).get("tensors"):
        use_dense16(model, _compute_dtype(model))
    model.to(torch.device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer
