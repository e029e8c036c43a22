"""The work folder of a resumable run: what a killed quantization needs to go on where it stopped.

``<output>.work/`` beside the output folder holds

* ``settings.json``: everything that decides the result (model, method config, calibration, seed,
  engine options that change numbers). ``--resume`` compares it with the new run's settings and
  refuses any difference, naming the first one; without ``--resume`` an existing work folder is
  refused, never silently reused;
* ``state.json`` + ``carry.safetensors``: which blocks are finished and the tensor the next block
  needs: the next block's inputs ``[n, L, d]`` (forward order) or the gradient flowing into the next
  block of the streamed Fisher's reverse sweep (reverse order);
* ``blocks/``: the finished blocks' packed shards (written by the caller's sink);
* ``activations/``: block inputs the streamed Fisher pass spilled to disk.
* ``fisher.safetensors``: the Fisher table of a resident Fisher pass (a model small enough to load
  whole), which a resumed run reads instead of computing it again.

Every file is written to a temporary name and renamed, so a kill leaves either the old or the new
version. A block's shard is written before the state that marks it finished: a kill in between redoes
the block, which writes the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidConfig, OutputExists

SETTINGS = "settings.json"
STATE = "state.json"
CARRY = "carry.safetensors"


def work_folder_for(output: str | os.PathLike) -> Path:
    """The work folder that belongs to an output folder: a hidden sibling ``.<name>.work``."""
    out = Path(output)
    return out.with_name(f".{out.name}.work")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """Dotted path and both values of the first difference between two JSON values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            if k not in old or k not in new:
                return f"{where}{k}: {old.get(k, '<absent>')!r} then, {new.get(k, '<absent>')!r} now"
            diff = _first_difference(old[k], new[k], f"{where}{k}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{where.rstrip('.')}: {old!r} then, {new!r} now"


class WorkState:
    """Progress of one run in its work folder (see the module docstring).

    settings: JSON-able dict of everything that decides the result
    resume:   continue the run recorded in ``folder`` (its settings must equal ``settings``)
    """

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any], *, resume: bool):
        self.folder = Path(folder)
        settings = json.loads(json.dumps(settings, default=str))
        existing = self.folder / SETTINGS
        if self.folder.exists() and not resume:
            raise OutputExists(f"work folder {str(self.folder)!r} holds an unfinished earlier run; pass --resume "
                               "to continue it, or delete the folder to start over")
        if resume and existing.is_file():
            try:
                old = json.loads(existing.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise InvalidConfig(f"cannot --resume: {existing} is unreadable ({exc}); delete "
                                    f"{str(self.folder)!r} to start over") from None
            diff = _first_difference(old, settings)
            if diff:
                raise InvalidConfig(f"cannot --resume {str(self.folder)!r}: it was started with other settings "
                                    f"({diff}); rerun with the same settings or delete the folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.blocks_dir.mkdir(exist_ok=True)
        if not existing.is_file():
            _write_atomic(existing, json.dumps(settings, indent=2, sort_keys=True))
        self.state: dict[str, Any] = (json.loads((self.folder / STATE).read_text())
                                      if (self.folder / STATE).is_file() else {"done": []})

    @property
    def blocks_dir(self) -> Path:
        return self.folder / "blocks"

    @property
    def activation_dir(self) -> Path:
        return self.folder / "activations"

    @property
    def fisher_path(self) -> Path:
        """Where a resident Fisher pass keeps its table for a resumed run."""
        return self.folder / "fisher.safetensors"

    @property
    def done(self) -> set[int]:
        return set(self.state["done"])

    def block_done(self, b: int, carry: Tensor | None, *, direction: str) -> None:
        """Record block ``b`` as finished with the tensor the next block needs (None: nothing)."""
        from safetensors.torch import save_file

        if carry is not None:
            tmp = self.folder / (CARRY + ".partial")
            save_file({"carry": carry.detach().contiguous().cpu()}, str(tmp))
            os.replace(tmp, self.folder / CARRY)
        self.state = {"done": sorted(self.done | {b}), "direction": direction, "carry": carry is not None}
        _write_atomic(self.folder / STATE, json.dumps(self.state))

    def _carry(self, device: torch.device) -> Tensor | None:
        from safetensors.torch import load_file

        if not self.state.get("carry"):
            return None
        return load_file(str(self.folder / CARRY), device=str(device))["carry"]

    def next_block_forward(self) -> int:
        """First block not finished in forward order."""
        return max(self.done) + 1 if self.done else 0

    def resume_forward(self, device: torch.device) -> tuple[int, Tensor] | None:
        """``(next block, its inputs)`` of a forward-order run that finished some blocks, else None."""
        carry = self._carry(device)
        return (self.next_block_forward(), carry) if self.done and carry is not None else None

    def resume_reverse(self, device: torch.device) -> tuple[int, Tensor] | None:
        """``(next block, gradient at its output)`` of a reverse-order run that finished some blocks, else None."""
        carry = self._carry(device)
        return (min(self.done) - 1, carry) if self.done and carry is not None else None

    def remove(self) -> None:
        """Delete the work folder (the run is complete and its output committed)."""
        shutil.rmtree(self.folder, ignore_errors=True)
