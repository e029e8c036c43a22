"""Packed checkpoints: a Hugging Face model folder whose quantized linears hold packed codes.

Folder contents:

* ``config.json`` with ``quantization_config`` (``quant_method: "sqllm"``, ``format_version``, the method
  and its settings, bits per weight, and ``layers``: the :class:`LayerMeta` of every quantized linear)
* ``model-0000k-of-0000n.safetensors`` shards and ``model.safetensors.index.json``
* tokenizer files, ``generation_config.json`` and a short model card (``README.md``)

This module writes the folder and reads back its checked ``quantization_config`` and tensors; building a
model from them is the runtime's job (:func:`sqllm.nn.loader.load_packed`). Any missing, truncated or
mis-shaped tensor is a :class:`CorruptCheckpoint` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..codes import QuantizedMatrix
from ..errors import CorruptCheckpoint
from .layouts import matrix_meta, pack_matrix

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


FP16_MAX = float(torch.finfo(torch.float16).max)


def dense16_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """The 16-bit dtype that stores every one of ``tensors`` (float tensors of a full-precision model):
    their own dtype when they are all already 16-bit, else float16 when every value is finite and within
    its range (float16 keeps 3 more mantissa bits than bfloat16), else bfloat16."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1 and (d := next(iter(dtypes))) in (torch.float16, torch.bfloat16):
        return d
    fits = all(bool(torch.isfinite(t).all()) and float(t.abs().max()) <= FP16_MAX
               for t in tensors.values() if t.numel())
    return torch.float16 if fits else torch.bfloat16


def store_dense_in_16_bits(state: dict[str, Tensor], names: list[str]) -> dict[str, Any]:
    """Cast ``state[name]`` (the matrices kept dense: embeddings, an untied head) to one 16-bit dtype, in
    place; returns what ``quantization_config["dense16"]`` records. These matrices outweigh the packed
    linears of a small model (SmolLM2's tied 49152 x 576 head is 113 MB in float32) and bound its
    decode speed, so they are stored like the source's 16-bit checkpoints are."""
    chosen = {n: state[n] for n in names if state[n].is_floating_point() and state[n].dtype.itemsize > 2}
    if not chosen:
        return {"dtype": None, "tensors": [], "compute_dtype": None}
    compute = {t.dtype for t in chosen.values()}.pop()
    dtype = dense16_dtype(chosen)
    for n, t in chosen.items():
        state[n] = t.to(dtype)
    return {"dtype": _name(dtype), "tensors": sorted(chosen), "compute_dtype": _name(compute)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def model_card(qconfig: dict[str, Any], base: str) -> str:
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
) -> dict[str, Any]:
    """Write ``model`` with each linear of ``matrices`` stored packed into the (empty) folder ``dest``.

    Outlier values are stored in the model's dtype, norms and biases as they are, and the other matrices
    (embeddings, ``lm_head``) in 16 bits (:func:`store_dense_in_16_bits`). Returns the
    ``quantization_config`` written.
    """
    dest = Path(dest)
    state = _unique_state_dict(model)
    dense16 = store_dense_in_16_bits(state, [n for n, t in state.items() if t.dim() == 2 and n.removesuffix(".weight")
                                             not in matrices])
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
        # One metadata key: safetensors writes the metadata table in hash order, which differs between runs,
        # so a second key would make checkpoints of the same seed differ in their bytes.
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (dest / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    config = model.config.to_dict()
    config["quantization_config"] = {**qconfig, "dense16": dense16, "layers": layers}
    (dest / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    base = getattr(model.config, "_name_or_path", "") or model.config.model_type
    (dest / "README.md").write_text(model_card(qconfig, base))
    return config["quantization_config"]


def is_packed_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a folder whose ``config.json`` says ``quant_method: "sqllm"``."""
    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "sqllm"


def check_quantization_config(qc: Any, where: str) -> dict[str, Any]:
    """``qc`` if it is a ``quantization_config`` this sqllm reads (``quant_method`` sqllm, the supported
    ``format_version``, a ``layers`` table), else CorruptCheckpoint naming ``where`` and the fault.
    Every loading path (ours and transformers') runs this same check."""
    if not isinstance(qc, dict) or qc.get("quant_method") != "sqllm":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CorruptCheckpoint(f"{where}: quantization_config.quant_method is {method!r}, not 'sqllm'")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptCheckpoint(
            f"{where}: format_version {version!r} is not supported (this sqllm reads {FORMAT_VERSION}); "
            f"upgrade sqllm or re-quantize"
        )
    if not isinstance(qc.get("layers"), dict):
        raise CorruptCheckpoint(f"{where}: quantization_config has no 'layers' table")
    return qc


def read_quantization_config(path: Path) -> dict[str, Any]:
    """The checked ``quantization_config`` of a packed checkpoint folder."""
    cfg_path = Path(path) / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{cfg_path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{cfg_path}: config.json holds a JSON {type(config).__name__}, not an object")
    return check_quantization_config(config.get("quantization_config"), str(cfg_path))


def read_index(path: Path) -> dict[str, str]:
    """The shard index of a checkpoint folder: tensor name -> shard file name. Every shard must be a plain
    file name inside the folder (no ``..``, no separators, no absolute path)."""
    index_path = Path(path) / INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{index_path}: unreadable shard index ({type(exc).__name__})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpoint(f"{index_path}: weight_map is not a table of tensor name -> shard file")
    for fname in weight_map.values():
        if fname in ("", ".", "..") or Path(fname).name != fname or "\\" in fname:
            raise CorruptCheckpoint(f"{index_path}: shard {fname!r} is not a file name inside the checkpoint folder")
    return weight_map


def _shard_path(path: Path, fname: str) -> Path:
    shard = path / fname
    if not shard.is_file():
        raise CorruptCheckpoint(f"shard {fname} listed in {INDEX_NAME} is missing from {path}")
    return shard


def stored_names(path: Path) -> set[str]:
    """Names of every tensor in the folder's shards (headers only), checked against the index."""
    path = Path(path)
    weight_map = read_index(path)
    names: set[str] = set()
    for fname in sorted(set(weight_map.values())):
        try:
            with safe_open(str(_shard_path(path, fname)), framework="pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CorruptCheckpoint(f"shard {fname} is truncated or corrupt ({str(exc).splitlines()[0]})") from None
    _check_listed(weight_map, names)
    return names


def _check_listed(weight_map: dict[str, str], names: Any) -> None:
    missing = [k for k in weight_map if k not in names]
    if missing:
        raise CorruptCheckpoint(f"tensor {missing[0]!r} is listed in {INDEX_NAME} but missing from its shard")


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's shards, checked against the index (missing shards or tensors named)."""
    path = Path(path)
    weight_map = read_index(path)
    tensors: dict[str, Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        shard = _shard_path(path, fname)
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    # A copy: safetensors' tensors live in a private mapping of the file, at the header's
                    # unaligned offsets, where the decode kernels ran 1.45x slower on SmolLM2's head (3.8
                    # against 2.6 ms).
                    tensors[key] = f.get_tensor(key).clone()
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CorruptCheckpoint(f"shard {fname} is truncated or corrupt ({str(exc).splitlines()[0]})") from None
    _check_listed(weight_map, tensors)
    return tensors
