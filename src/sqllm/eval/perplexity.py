"""Perplexity with the GPTQ protocol: the whole text tokenized once, cut into non-overlapping windows
of ``seqlen`` tokens, mean next-token NLL over all windows, ``exp`` of it."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..engine.stream import ModelParts, block_output, first_block_inputs
from ..errors import InvalidConfig, NotEnoughText


@torch.no_grad()
def window_nll(model: nn.Module, window: Tensor) -> float:
    """Mean next-token NLL of one window ``[1, L]`` (``L - 1`` predictions)."""
    logits = model(window, use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, window[0, 1:], reduction="mean"))


def perplexity(
    model: nn.Module, tokens: Tensor, seqlen: int = 2048, windows: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``tokens: [1, T]``; at most ``windows`` windows when given.

    Returns ``{"perplexity", "nll", "windows", "seqlen", "tokens", "seconds", "window_nll"}``.
    """
    n = _count_windows(tokens, seqlen, windows)
    device = next(model.parameters()).device
    model.eval()
    nlls = []
    start = time.perf_counter()
    for i in tqdm(range(n), desc="perplexity", disable=not progress):
        nlls.append(window_nll(model, tokens[:, i * seqlen : (i + 1) * seqlen].to(device)))
    nll = sum(nlls) / n
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "windows": n,
        "seqlen": seqlen,
        "tokens": n * seqlen,
        "seconds": time.perf_counter() - start,
        "window_nll": nlls,
    }


def _count_windows(tokens: Tensor, seqlen: int, windows: int | None) -> int:
    """How many windows of ``seqlen`` tokens to evaluate (all there are, or at most ``windows``)."""
    if seqlen < 2:
        raise InvalidConfig(f"seqlen={seqlen} must be >= 2")
    if windows is not None and windows < 1:
        raise InvalidConfig(f"windows={windows} must be >= 1")
    available = tokens.shape[1] // seqlen
    if available == 0:
        raise NotEnoughText(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    return available if windows is None else min(windows, available)


@torch.no_grad()
def streamed_perplexity(
    parts: ModelParts, tokens: Tensor, seqlen: int = 2048, windows: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """:func:`perplexity` of a model whose weights stay on disk: every window goes through one block at a
    time (:class:`~sqllm.engine.stream.ModelParts`), so memory holds one block and the windows' hidden
    states ``[n, seqlen, d]``, never the model. Same windows, same per-window NLLs up to round-off."""
    n = _count_windows(tokens, seqlen, windows)
    ids = tokens[0, : n * seqlen].reshape(n, seqlen)
    start = time.perf_counter()
    hidden, kwargs = first_block_inputs(parts, ids, batch_size=1)
    for b in tqdm(range(parts.n_blocks), desc="perplexity", unit="block", disable=not progress):
        with parts.loaded(parts.names_under((parts.block_name(b),))):
            block = parts.block(b)
            hidden = torch.cat([block_output(block(h, **kwargs)) for h in hidden.split(1)])
    nlls = []
    with parts.loaded(parts.head_names()):
        for w in range(n):
            h = hidden[w : w + 1]
            for name in parts.final_names:
                h = parts.model.get_submodule(name)(h)
            logits = parts.model.get_submodule(parts.head_name)(h)[0, :-1].float()
            nlls.append(float(F.cross_entropy(logits, ids[w, 1:].to(logits.device), reduction="mean")))
    nll = sum(nlls) / n
    return {"perplexity": math.exp(nll), "nll": nll, "windows": n, "seqlen": seqlen, "tokens": n * seqlen,
            "seconds": time.perf_counter() - start, "window_nll": nlls}
