"""Calibration windows and evaluation token streams, from dataset names or local text files.

A *source* is a name (``wikitext2``, ``c4``, ``ptb``; loaded through ``datasets`` when reachable) or a
local ``.txt`` / ``.raw`` / ``.tokens`` / ``.jsonl`` file. Calibration draws ``n`` windows of ``seqlen``
tokens at seeded random offsets of the tokenized text (the GPTQ protocol); evaluation tokenizes the
whole text once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import DataUnavailable, InvalidConfig, NotEnoughText

LOCAL_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl")
Split = Literal["calib", "eval"]

# name -> (datasets args, split for calibration, split for evaluation, text field)
DATASETS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "train", "test", "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), "train", "test", "sentence"),
    "c4": (("allenai/c4", "en"), "train", "validation", "text"),
}


def _read_text_file(path: Path) -> str:
    r"""The UTF-8 text of ``path`` with ``\r\n`` and ``\r`` line ends read as ``\n`` (Python's text mode);
    a binary file is refused by name rather than tokenized as noise. The line ends matter: the copy of
    ``wiki.test.raw`` here ends its lines with ``\r\n``, while the GPTQ protocol scores the text as the
    ``datasets`` rows give it, with ``\n``; kept, the ``\r`` tokens move SmolLM2's full-precision
    perplexity on protocol P's 40 windows from 20.57 to 20.24."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConfig(
            f"text file {str(path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); give a plain text file"
        ) from None
    if "\x00" in text:
        raise InvalidConfig(f"text file {str(path)!r} holds NUL bytes, so it is binary; give a plain text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_local(path: Path) -> str:
    text = _read_text_file(path)
    if path.suffix != ".jsonl":
        return text
    texts = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            value = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            raise InvalidConfig(f"{path}:{i + 1} is not a JSON object with a 'text' field") from None
        if not isinstance(value, str):
            raise InvalidConfig(f"{path}:{i + 1}: 'text' is a JSON {type(value).__name__}, not a string")
        texts.append(value)
    return "\n\n".join(texts)


def _check_hub(name: str) -> None:
    """Fail at once, instead of after the download retries, when the hub cannot be reached. In offline
    mode ``datasets`` itself answers at once, from its cache."""
    from .hub import offline_mode, offline_reason

    if offline_mode():
        return
    reason = offline_reason()
    if reason is not None:
        raise DataUnavailable(
            f"dataset {name!r} comes from the Hugging Face hub, which {reason}; pass a local text file "
            f"(or set HF_HUB_OFFLINE=1 to use a copy cached earlier)"
        )


def _read_dataset(name: str, split: Split) -> str:
    args, calib_split, eval_split, field = DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise DataUnavailable(
            f"dataset {name!r} needs the 'datasets' package (pip install datasets), or pass a local text file"
        ) from None
    hf_split = calib_split if split == "calib" else eval_split
    try:
        if name == "c4":
            shard = "train" if split == "calib" else "validation"
            files = {shard: f"en/c4-{shard}.00000-of-{'01024' if shard == 'train' else '00008'}.json.gz"}
            ds = datasets.load_dataset(args[0], data_files=files, split=shard)
        else:
            ds = datasets.load_dataset(*args, split=hf_split)
    except Exception as exc:  # the hub raises many types when offline
        raise DataUnavailable(
            f"dataset {name!r} could not be loaded ({type(exc).__name__}); pass a local text file instead"
        ) from None
    sep = " " if name == "ptb" else "\n\n"
    return sep.join(ds[field])


def check_source(source: str) -> Path | None:
    """Refuse a text source that cannot be read, before any model is loaded: a missing file, a folder,
    an unsupported suffix, an unknown name, or a dataset whose hub is unreachable. Returns the local file
    (None for a dataset name)."""
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise InvalidConfig(f"text source {source!r} is a folder; give a {'/'.join(LOCAL_SUFFIXES)} file")
        if not path.is_file():
            raise DataUnavailable(f"text file {source!r} does not exist")
        if path.suffix not in LOCAL_SUFFIXES:
            raise InvalidConfig(f"text file {source!r}: supported suffixes are {', '.join(LOCAL_SUFFIXES)}")
        return path
    if source in DATASETS:
        _check_hub(source)
        return None
    raise DataUnavailable(
        f"unknown text source {source!r}: give a local {'/'.join(LOCAL_SUFFIXES)} file or one of "
        f"{', '.join(DATASETS)}"
    )


def load_text(source: str, split: Split = "eval") -> str:
    """The raw text of a source: a local file, or the calibration / evaluation split of a named dataset."""
    path = check_source(source)
    return _read_local(path) if path is not None else _read_dataset(source, split)


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """Token ids of ``text`` as one stream ``[1, T]`` (no truncation, no special tokens added)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids.long()


def check_window_counts(n: int, seqlen: int) -> None:
    """Calibration takes at least one window of at least two tokens."""
    if n < 1 or seqlen < 2:
        raise InvalidConfig(f"calibration needs n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")


@dataclass(frozen=True)
class Calibration:
    """The calibration draw: ``nsamples`` windows of ``seqlen`` tokens of the text ``source`` (a dataset
    name or a local file) at offsets drawn with ``seed``."""

    source: str
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def windows(self, tokenizer: Any) -> Tensor:
        """``[nsamples, seqlen]`` token ids."""
        return calibration_windows(tokenizer, self.source, self.nsamples, self.seqlen, self.seed)

    def record(self) -> dict[str, Any]:
        """What a checkpoint's ``quantization_config`` records of the draw."""
        return {"source": str(self.source), "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


def calibration_windows(tokenizer: Any, source: str, n: int, seqlen: int, seed: int = 0) -> Tensor:
    """``[n, seqlen]`` token windows at seeded random offsets of the source's calibration text."""
    check_window_counts(n, seqlen)
    ids = tokenize(tokenizer, load_text(source, "calib"))[0]
    return sample_windows(ids, n, seqlen, seed, what=f"calibration source {source!r}")


def sample_windows(ids: Tensor, n: int, seqlen: int, seed: int, what: str = "text") -> Tensor:
    """``[n, seqlen]`` windows of the stream ``ids: [T]`` at offsets drawn with ``seed``."""
    if ids.numel() <= seqlen:
        raise NotEnoughText(
            f"{what} has {ids.numel()} tokens, too few for windows of {seqlen}; "
            f"use a shorter --calib-seqlen or a longer text"
        )
    # GPTQ's calibration loop (its datautils): Python's generator seeded with ``seed``, one
    # ``randint(0, T - seqlen - 1)`` per window, so protocol P draws the reference code's offsets.
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_tokens(tokenizer: Any, source: str) -> Tensor:
    """The whole evaluation text of ``source`` tokenized once: ``[1, T]``."""
    return tokenize(tokenizer, load_text(source, "eval"))
