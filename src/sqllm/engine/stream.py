"""Streamed weights: a model whose parameters rest in safetensors shards and come in one part at a time.

A :class:`ModelParts` hands the engine a model one part at a time (the embeddings, one decoder block,
the head) with real weights on the work device, and takes each part back when the engine is done
with it. Two implementations:

* :class:`StreamedModel`: the model skeleton lives on the meta device (``accelerate.init_empty_weights``,
  real buffers such as rotary frequencies); a part's tensors are read from the checkpoint's shards with
  ``safetensors.safe_open`` (each shard opened, read and closed per part, so no file mapping outlives
  the part), cast to the compute dtype, assigned with ``accelerate``'s ``set_module_tensor_to_device``,
  and sent back to ``meta`` on release. Peak memory is one part in the compute dtype.
* :class:`InMemoryParts`: a model already loaded; parts are moved to the work device and back.

The engine, the Fisher pass and the packer are written once against this interface, so the streamed
and in-memory paths run the same arithmetic on the same values.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CorruptCheckpoint, InvalidConfig, UnknownModel
from ..models import ArchSpec, arch_spec, check_loading_info
from .lm_loss import causal_lm_loss, is_frozen_linear

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, or InvalidConfig when it does not exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidConfig(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidConfig(f"--device {device!r}: this machine has no CUDA GPU (torch {torch.__version__}); "
                                "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InvalidConfig(f"--device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise InvalidConfig(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


class ShardIndex:
    """Where each tensor of a checkpoint folder lives: ``model.safetensors.index.json`` or one
    ``model.safetensors``. Every listed shard is checked to exist when the index is opened."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptCheckpoint(f"{index}: unreadable shard index ({type(exc).__name__})") from None
        elif (self.folder / SINGLE_NAME).is_file():
            with safe_open(str(self.folder / SINGLE_NAME), framework="pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise UnknownModel(f"folder {str(self.folder)!r} has neither {INDEX_NAME} nor {SINGLE_NAME}; "
                               "streamed loading reads safetensors checkpoints")
        for fname in weight_map.values():  # a crafted index must not reach outside the folder
            if not isinstance(fname, str) or fname in ("", ".", "..") or Path(fname).name != fname or "\\" in fname:
                raise CorruptCheckpoint(f"{index}: shard {fname!r} is not a file name inside the checkpoint folder")
        missing = sorted({s for s in weight_map.values() if not (self.folder / s).is_file()})
        if missing:
            raise CorruptCheckpoint(f"shard {missing[0]} listed in {INDEX_NAME} is missing from {self.folder}")
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The named tensors in their stored dtype, each shard opened once and closed after."""
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, Tensor] = {}
        from safetensors import SafetensorError, safe_open

        for shard, keys in by_shard.items():
            try:
                with safe_open(str(self.folder / shard), framework="pt") as f:
                    for k in keys:
                        out[k] = f.get_tensor(k)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CorruptCheckpoint(f"shard {shard} in {self.folder} is truncated or corrupt "
                                        f"({str(exc).splitlines()[0]})") from None
        return out

    def nonfinite(self) -> tuple[str, int] | None:
        """The first stored floating tensor holding NaN or infinity and how many, reading one tensor at a
        time (the model is never in memory); None when every value is finite."""
        from safetensors import safe_open

        for shard in sorted(set(self.weight_map.values())):
            with safe_open(str(self.folder / shard), framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    if t.is_floating_point() and not all_finite(t):
                        return k, int((~torch.isfinite(t)).sum())
        return None

    def dtypes(self) -> dict[str, torch.dtype]:
        """Stored dtype of every tensor (read from the shard headers only)."""
        from safetensors import safe_open

        out: dict[str, torch.dtype] = {}
        for shard in sorted(set(self.weight_map.values())):
            with safe_open(str(self.folder / shard), framework="pt") as f:
                for k in f.keys():
                    out[k] = _SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()]
        return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of the floating tensor ``t`` is finite: its largest and least values are
    (``amax`` and ``amin`` propagate NaN). Two reductions and no ``[numel]`` boolean temporary: on a 7B
    model's bf16 shards, ``isfinite(t).all()`` took eight times as long, most of the time before
    quantizing started."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all())


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


class ModelParts(ABC):
    """A causal LM handed out one part at a time (see the module docstring).

    model:   the module tree (real or meta parameters); hooks and ``get_submodule`` work on it
    arch:    its ArchSpec
    device:  where a part's weights go while it is in use
    dtype:   the dtype a part computes in (weights are cast to it on the way in)
    """

    model: nn.Module
    arch: ArchSpec
    device: torch.device
    dtype: torch.dtype

    def __init__(self, model: nn.Module, device: str | torch.device, dtype: torch.dtype):
        self.model = model
        self.arch = arch_spec(model)
        self.device = torch.device(device)
        self.dtype = dtype
        head = model.get_output_embeddings()
        self.head_name = _module_name(model, head) or "lm_head"
        self.final_names = tuple(n for n in self.arch.final if _optional_submodule(model, n) is not None)

    @property
    def n_blocks(self) -> int:
        return len(self.model.get_submodule(self.arch.blocks))

    def block_name(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}"

    def block(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.arch.blocks)[i]

    def tensor_names(self) -> list[str]:
        """Every parameter and persistent buffer name of the model (tied duplicates included)."""
        return list(self.model.state_dict(keep_vars=True))

    def names_under(self, prefixes: tuple[str, ...]) -> list[str]:
        return [n for n in self.tensor_names() if any(n == p or n.startswith(p + ".") for p in prefixes)]

    def trunk_names(self) -> list[str]:
        """Tensors of the modules before the first block (embeddings, positions): everything outside
        the blocks, the final modules and the head."""
        rest = (self.arch.blocks, self.head_name, *self.final_names)
        return [n for n in self.tensor_names() if not any(n == p or n.startswith(p + ".") for p in rest)]

    def head_names(self) -> list[str]:
        return self.names_under((*self.final_names, self.head_name))

    @abstractmethod
    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The named tensors as stored (the checkpoint's dtype, on CPU for a streamed model)."""

    @abstractmethod
    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the named tensor is stored in."""

    @abstractmethod
    def load(self, names: list[str]) -> None:
        """Make the named tensors real, on ``self.device``, in ``self.dtype`` (floating ones)."""

    @abstractmethod
    def release(self, names: list[str]) -> None:
        """Undo :meth:`load` for the named tensors."""

    @contextmanager
    def loaded(self, names: list[str]) -> Iterator[None]:
        """The named tensors are loaded inside the ``with`` block and released after it."""
        self.load(names)
        try:
            yield
        finally:
            self.release(names)

    def move_buffers(self) -> None:
        """Non-persistent buffers (rotary frequencies) go to the work device once."""
        for mod in self.model.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None and not b.is_meta and b.device != self.device:
                    mod._buffers[k] = b.to(self.device)


def _optional_submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


class StreamedModel(ModelParts):
    """A checkpoint folder streamed from its safetensors shards (see the module docstring)."""

    def __init__(self, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.index = ShardIndex(self.folder)
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        super().__init__(model.eval(), device, dtype)
        self.stored = self.index.dtypes()
        self.source = self._sources()
        self.move_buffers()

    def _sources(self) -> dict[str, str]:
        """Model tensor name -> stored tensor name (a tied head reads the input embeddings); the first
        model tensor the checkpoint lacks is a CorruptCheckpoint."""
        tied: dict[str, str] = {}
        if getattr(self.model.config, "tie_word_embeddings", False):
            emb = _module_name(self.model, self.model.get_input_embeddings())
            tied[f"{self.head_name}.weight"] = f"{emb}.weight"
        out: dict[str, str] = {}
        missing = []
        for n in self.tensor_names():
            src = n if n in self.index else tied.get(n)
            if src is None or src not in self.index:
                missing.append(n)
            else:
                out[n] = src
        if missing:  # the same refusals as loading the whole model
            unexpected = [k for k in self.index.weight_map if k not in out.values()]
            check_loading_info(str(self.folder), {"missing_keys": missing, "unexpected_keys": unexpected})
        return out

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.stored[self.source[name]]

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The named model tensors as stored (no cast, on CPU)."""
        raw = self.index.read(sorted({self.source[n] for n in names}))
        return {n: raw[self.source[n]] for n in names}

    def load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n, t in self.read(names).items():
            # accelerate casts a value to the skeleton's dtype unless told otherwise
            dtype = self.dtype if t.is_floating_point() else None
            set_module_tensor_to_device(self.model, n, self.device, value=t, dtype=dtype)
            del t

    def release(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            set_module_tensor_to_device(self.model, n, "meta")


class InMemoryParts(ModelParts):
    """A loaded model handed out part by part: each part visits the work device and goes home after."""

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu"):
        dtype = next(model.parameters()).dtype
        super().__init__(model, device, dtype)
        self.home: dict[str, torch.device] = {}  # where each tensor moved to the work device came from
        self.move_buffers()

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.model.state_dict(keep_vars=True)[name].dtype

    def read(self, names: list[str]) -> dict[str, Tensor]:
        state = self.model.state_dict(keep_vars=True)
        return {n: state[n].detach() for n in names}

    def load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        state = self.model.state_dict(keep_vars=True)
        for n in names:
            if state[n].device != self.device:
                self.home[n] = state[n].device
                set_module_tensor_to_device(self.model, n, self.device)

    def release(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            if n in self.home:
                set_module_tensor_to_device(self.model, n, self.home.pop(n))


def save_activations(path: Path, hidden: Tensor) -> None:
    """Write block activations ``[n, L, d]`` to ``path`` (safetensors, written then renamed)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({"hidden": hidden.detach().contiguous().cpu()}, str(tmp))
    tmp.replace(path)


def load_activations(path: Path, device: torch.device | str = "cpu") -> Tensor:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))["hidden"]


class ActivationCache:
    """Block inputs ``[n, L, d]`` kept per block index: in memory while they fit ``budget_bytes``,
    then in files under ``folder`` (read back one block at a time)."""

    def __init__(self, folder: Path | None, budget_bytes: int):
        self.folder = folder
        self.budget = budget_bytes
        self.used = 0
        self.memory: dict[int, Tensor] = {}
        self.files: dict[int, Path] = {}

    def put(self, i: int, hidden: Tensor) -> None:
        nbytes = hidden.numel() * hidden.element_size()
        if self.folder is None or self.used + nbytes <= self.budget:
            self.memory[i] = hidden
            self.used += nbytes
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"block-{i:05d}.safetensors"
        save_activations(path, hidden)
        self.files[i] = path

    def get(self, i: int, device: torch.device | str) -> Tensor:
        if i in self.memory:
            return self.memory[i].to(device)
        return load_activations(self.files[i], device)

    def drop(self, i: int) -> None:
        if i in self.memory:
            t = self.memory.pop(i)
            self.used -= t.numel() * t.element_size()
        elif i in self.files:
            self.files.pop(i).unlink(missing_ok=True)


class StopForward(Exception):
    """Raised by a hook to end a forward once it has what it came for (caught by whoever registered it)."""


def first_block_inputs(parts: ModelParts, windows: Tensor, batch_size: int) -> tuple[Tensor, dict[str, Any]]:
    """``(hidden [n, L, d], kwargs)``: what the first block receives on ``windows: [n, L]``, computed with
    only the trunk (embeddings) loaded. ``kwargs`` (masks, position embeddings) come from the first
    batch, so they hold for any batch of windows of length L."""
    first = parts.block(0)
    hidden: list[Tensor] = []
    shared: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append(args[0] if args else kwargs["hidden_states"])
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with parts.loaded(parts.trunk_names()), torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    parts.model(batch.to(parts.device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    shared["use_cache"] = False
    for k in ("past_key_values", "past_key_value", "cache"):
        shared.pop(k, None)
    return torch.cat(hidden), shared


def block_output(out: Any) -> Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def head_loss(parts: ModelParts, hidden: Tensor, labels: Tensor) -> Tensor:
    """The causal-LM loss of the last block's output ``hidden [b, L, d]`` on ``labels [b, L]``: the
    architecture's final modules, then the head and the model's own loss function (head part loaded); a
    frozen linear head takes the chunked loss of :func:`~sqllm.engine.lm_loss.causal_lm_loss`."""
    h = hidden
    for name in parts.final_names:
        h = parts.model.get_submodule(name)(h)
    head = parts.model.get_submodule(parts.head_name)
    if is_frozen_linear(head):
        return causal_lm_loss(h, head, labels)
    logits = head(h)
    return parts.model.loss_function(logits=logits, labels=labels, vocab_size=parts.model.config.vocab_size)
