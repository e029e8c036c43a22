"""Packed checkpoints: a Hugging Face model folder whose quantized linears hold packed codes.

Folder contents:

* ``config.json`` with ``quantization_config`` (``quant_method: "sqllm"``, ``format_version``, the method
  and its settings, bits per weight, and ``layers``: the :class:`LayerMeta` of every quantized linear)
* ``model-0000k-of-0000n.safetensors`` shards and ``model.safetensors.index.json``
* tokenizer files, ``generation_config.json`` and a short model card (``README.md``)

Loading builds the model skeleton without allocating weights, swaps the quantized linears for
QuantLinear modules built from their metas, checks every tensor against the layout table, and assigns
the stored tensors. Any missing, truncated or mis-shaped tensor is a :class:`CorruptCheckpoint` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..codes import QuantizedMatrix
from ..errors import CorruptCheckpoint
from .layouts import LayerMeta, matrix_meta, pack_matrix, validate_tensors

FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 2 * 1024**3


def _unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """State dict without tied duplicates (safetensors stores each storage once): the first name wins."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen and t.numel():
            continue
        seen.add(ptr)
        out[name] = t.detach().contiguous()
    return out


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _model_card(qconfig: dict[str, Any], base: str) -> str:
    bpw = qconfig.get("bits_per_weight", {}).get("total")
    return (
        f"# {base} ({qconfig['method']}, {qconfig.get('bits')}-bit)\n\n"
        f"Quantized with sqllm {qconfig['sqllm_version']} (format version {qconfig['format_version']}): "
        f"method `{qconfig['method']}`, settings `{json.dumps(qconfig['config'])}`"
        + (f", {bpw:.3f} bits per weight over the quantized linears" if bpw else "")
        + ".\n\nLoad with `sqllm.api.load_quantized(path)`, or with "
        "`transformers.AutoModelForCausalLM.from_pretrained(path)` after `import sqllm`.\n"
    )


def write_packed(
    model: nn.Module, tokenizer: Any, matrices: dict[str, QuantizedMatrix], qconfig: dict[str, Any], dest: Path,
    *, shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write ``model`` with each linear of ``matrices`` stored packed into the (empty) folder ``dest``.

    Outlier values are stored in the model's dtype; embeddings, norms and ``lm_head`` as they are.
    """
    dest = Path(dest)
    state = _unique_state_dict(model)
    layers: dict[str, dict[str, Any]] = {}
    for name, qm in matrices.items():
        dtype = model.get_submodule(name).weight.dtype
        state.pop(f"{name}.weight")
        state.update(pack_matrix(qm, f"{name}.", dtype))
        layers[name] = matrix_meta(qm, dtype).to_dict()
    shards = _shards(state, shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(dest / fname), metadata={"format": "pt", "sqllm_format_version": str(FORMAT_VERSION)})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (dest / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    config = model.config.to_dict()
    config["quantization_config"] = {**qconfig, "layers": layers}
    (dest / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    base = getattr(model.config, "_name_or_path", "") or model.config.model_type
    (dest / "README.md").write_text(_model_card(qconfig, base))


def read_quantization_config(path: Path) -> dict[str, Any]:
    """The checked ``quantization_config`` of a packed checkpoint folder."""
    cfg_path = Path(path) / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{cfg_path}: unreadable config.json ({exc})") from None
    return check_quantization_config(config.get("quantization_config") or {}, str(cfg_path))


def check_quantization_config(qc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``qc``, a ``quantization_config`` block, as a dict once its method, format version and layer
    table are ones this sqllm reads; else CorruptCheckpoint naming ``where`` (the file it came from)."""
    if qc.get("quant_method") != "sqllm":
        raise CorruptCheckpoint(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'sqllm'")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptCheckpoint(
            f"{where}: format_version {version!r} is not supported (this sqllm reads {FORMAT_VERSION}); "
            f"upgrade sqllm or re-quantize"
        )
    if not isinstance(qc.get("layers"), dict):
        raise CorruptCheckpoint(f"{where}: quantization_config has no 'layers' table")
    return dict(qc)


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's shards, checked against the index (missing shards or tensors named)."""
    path = Path(path)
    index_path = path / INDEX_NAME
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise CorruptCheckpoint(f"{index_path}: unreadable shard index ({type(exc).__name__})") from None
    tensors: dict[str, Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        shard = path / fname
        if not shard.is_file():
            raise CorruptCheckpoint(f"shard {fname} listed in {INDEX_NAME} is missing from {path}")
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CorruptCheckpoint(f"shard {fname} is truncated or corrupt ({str(exc).splitlines()[0]})") from None
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise CorruptCheckpoint(f"tensor {missing[0]!r} is listed in {INDEX_NAME} but missing from its shard")
    return tensors


def _skeleton(path: Path) -> nn.Module:
    """The model with parameters on the meta device (no memory, no init) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def load_packed(path: str | Path, *, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a packed checkpoint folder as ``(model, tokenizer)`` with QuantLinear modules."""
    from transformers import AutoTokenizer

    from ..nn import QuantLinear, replace_linear

    path = Path(path)
    qc = read_quantization_config(path)
    tensors = read_tensors(path)
    model = _skeleton(path)
    for name, meta_dict in qc["layers"].items():
        meta = LayerMeta.from_dict(meta_dict, where=name)
        validate_tensors(tensors, f"{name}.", meta)
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CorruptCheckpoint(f"quantized layer {name!r} does not exist in this model's architecture") from None
        bias_dtype = linear.weight.dtype if linear.bias is not None else None
        replace_linear(model, name, QuantLinear(meta, bias_dtype, device="meta"))
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
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer
