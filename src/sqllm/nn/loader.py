"""The one loader of packed sqllm checkpoints.

``api.load_quantized``, ``api.load_model`` on a packed folder and the transformers quantizer
(``sqllm.hf``) all come here: a skeleton on the meta device, every quantized ``nn.Linear`` swapped for
an empty QuantLinear built from its layer meta (:func:`swap_quant_linears`, the one swap loop), then the
stored tensors assigned after every one of them is checked against the layout table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CorruptCheckpoint, InvalidConfig
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


def check_names(model: nn.Module, stored: Iterable[str], where: str) -> None:
    """Strict loading: every tensor of ``model``'s state dict is among the ``stored`` names (a tied weight
    may be absent, as its source is stored) and every stored name has a place in the model."""
    expected = set(model.state_dict().keys())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    stored = set(stored)
    missing = sorted(expected - stored - tied)
    if missing:
        raise CorruptCheckpoint(f"tensor {missing[0]!r} is missing from the checkpoint at {where} "
                                f"({len(missing)} missing)")
    unexpected = sorted(stored - expected)
    if unexpected:
        raise CorruptCheckpoint(f"tensor {unexpected[0]!r} in the checkpoint at {where} has no place in the model")


def check_shapes(model: nn.Module, tensors: Mapping[str, Tensor], where: str) -> None:
    """Every stored tensor has the shape the model built from ``config.json`` expects (a config edited to
    other sizes than the weights were saved with fails here, naming the tensor)."""
    state = model.state_dict()
    for name, t in tensors.items():
        want = tuple(state[name].shape)
        if tuple(t.shape) != want:
            raise CorruptCheckpoint(
                f"tensor {name!r} is {list(t.shape)} in the checkpoint at {where} but {list(want)} for the "
                f"architecture in its config.json"
            )


def check_finite(named: Iterable[tuple[str, Tensor]], where: str) -> None:
    """No floating-point tensor holds NaN or infinity (damaged bytes usually show up so)."""
    for name, t in named:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CorruptCheckpoint(f"tensor {name!r} of the checkpoint at {where} holds {bad} NaN or infinite "
                                    f"values; the file is damaged: copy it again or re-quantize")


def _skeleton(path: Path) -> Any:
    """The model with parameters on the meta device (no memory, no init) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its norms (kept as the source stored them), else float32."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor):
            return weight.dtype
    return torch.float32


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cast_full_precision(model: nn.Module, dtype: torch.dtype, dense16: set[str]) -> None:
    """Cast the parameters of ``model`` (norms, biases, any matrix kept in full precision) and the packed
    layers' biases to ``dtype``. The matrices stored in 16 bits (``dense16``, by name) stay as stored
    when ``dtype`` is float32 (:mod:`.dense16` widens them as it multiplies) and are cast to a 16-bit
    ``dtype``, as in a model loaded in it. Packed tensors stay as stored; so do other buffers (rotary
    frequencies, which transformers keeps in float32)."""
    keep = {id(model.get_parameter(name)) for name in dense16} if dtype == torch.float32 else set()
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype and id(p) not in keep:
                module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        if isinstance(module, QuantLinear) and module.bias is not None:
            module.bias = module.bias.to(dtype)


def load_packed(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Load a packed checkpoint folder as ``(model, tokenizer)`` with QuantLinear modules (eval mode).

    Loading is strict: every tensor the model expects is stored (tied weights excepted) and nothing
    else, each has its layout's dtype and shape, and none holds NaN or infinity. ``dtype`` (one of
    COMPUTE_DTYPES): the dtype the model computes in, its norms and biases cast to it; None keeps the
    dtype the norms were stored in.
    """
    from transformers import AutoTokenizer

    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise InvalidConfig(f"a packed model computes in one of {[str(d) for d in COMPUTE_DTYPES]}, got {dtype}")
    path = Path(path)
    qc = read_quantization_config(path)
    tensors = read_tensors(path)
    model = _skeleton(path)
    for name, meta in swap_quant_linears(model, qc["layers"]).items():
        validate_tensors(tensors, f"{name}.", meta)
    check_names(model, tensors, str(path))
    check_shapes(model, tensors, str(path))
    check_finite(tensors.items(), str(path))
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CorruptCheckpoint(f"tensor {leftover[0]!r} is missing from the checkpoint at {path}")
    dense16 = set((qc.get("dense16") or {}).get("tensors") or ())
    if dtype is not None:
        _cast_full_precision(model, dtype, dense16)
    if dense16:
        use_dense16(model, _compute_dtype(model))
    model.to(torch.device(device)).eval()
    tokenizer = (AutoTokenizer.from_pretrained(path, trust_remote_code=False)
                 if (path / "tokenizer_config.json").is_file() else None)
    return model, tokenizer
