"""Embeddings and heads whose weights are stored in 16 bits while the model computes in float32.

A packed checkpoint stores the matrices it does not quantize (embeddings, ``lm_head``) in float16 or
bfloat16 (``quantization_config["dense16"]``). Loaded as they are, they would turn the whole residual
stream into 16-bit activations; these modules keep the weights in 16 bits and compute in the model's
dtype. The module classes are swapped in place (``module.__class__``), so tied weights stay one tensor.
"""

from __future__ import annotations

from types import ModuleType
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import cpu_kernels, may_call_directly
from .kernels.ops import DECODE_TOKENS

HEAD_TILE = 1 << 20  # weight elements widened to the compute dtype at once (4 MiB of float32)


class Dense16Embedding(nn.Embedding):
    """``nn.Embedding`` with a 16-bit weight whose lookups come out in ``compute_dtype``."""

    compute_dtype: torch.dtype

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids).to(self.compute_dtype)


class Dense16Linear(nn.Linear):
    """``nn.Linear`` with a 16-bit weight, computing ``x @ W^T`` in ``x``'s dtype: tiles of rows of ``W`` are
    widened one at a time, so the wide weight never exists whole and the result equals ``F.linear`` with
    the widened weight up to the matmul's summation order."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        kernels = _decode_kernels(x2, self.weight)
        if kernels is not None:
            y = kernels.dense16_mm(x2, self.weight).to(x.dtype)
        else:
            rows = max(1, HEAD_TILE // self.in_features)
            y = torch.cat([x2 @ w.to(x.dtype).T for w in self.weight.split(rows)], dim=1)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _decode_kernels(x: Tensor, weight: Tensor) -> ModuleType | None:
    """The compiled CPU kernels when they can multiply ``x [m, n]`` by the 16-bit ``weight`` directly: a
    decode step (m <= DECODE_TOKENS) on CPU with no gradient wanted. Prefill keeps the widened tiles, whose
    cost the matmul amortizes."""
    if not 1 <= x.shape[0] <= DECODE_TOKENS or not weight.is_contiguous() or not may_call_directly(x):
        return None
    return cpu_kernels()


def use_dense16(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Swap every embedding and linear of ``model`` whose weight is 16-bit while ``compute_dtype`` is wider
    for its Dense16 counterpart; returns the swapped modules' names."""
    swapped = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dtype not in (torch.float16, torch.bfloat16) or weight.dtype == compute_dtype:
            continue
        if type(module) is nn.Embedding:
            module.__class__ = Dense16Embedding
            cast(Dense16Embedding, module).compute_dtype = compute_dtype
        elif type(module) is nn.Linear:
            module.__class__ = Dense16Linear
        else:
            continue
        swapped.append(name)
    return swapped
