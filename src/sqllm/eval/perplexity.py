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
    if seqlen < 2:
        raise InvalidConfig(f"seqlen={seqlen} must be >= 2")
    if windows is not None and windows < 1:
        raise InvalidConfig(f"windows={windows} must be >= 1")
    available = tokens.shape[1] // seqlen
    if available == 0:
        raise NotEnoughText(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    n = available if windows is None else min(windows, available)
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
