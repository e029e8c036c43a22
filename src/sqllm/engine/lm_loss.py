"""The causal-LM loss at a frozen head, with its gradient formed in the forward pass.

Fisher passes (SqueezeLLM §3.2) need the gradient of the next-token loss at the head's input, never at the
head: the head is not quantized. The standard path builds the ``[L, vocab]`` logits, upcasts them to
float32, runs log-softmax, and backpropagates through each of those steps; on SmolLM2 (vocabulary 49152)
those element-wise passes over 100M logits cost about as much per window as every MLP product of the
model. :func:`causal_lm_loss` computes the same loss a chunk of rows at a time, and writes
``(softmax - onehot) / n`` times the head straight into the input's gradient while each chunk's logits
are in cache. The matrix products are the standard path's, in the same precision: under autocast the
logits and the gradient products run in the autocast dtype, the softmax in float32.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear on ``x`` computes in: the autocast dtype where autocast is on, else ``x``'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _FrozenHeadLoss(torch.autograd.Function):
    """loss = mean over labelled rows of ``-log softmax(x W^T + b)[target]``; gradient for ``x`` only."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None,
        targets: Tensor, chunk: int,
    ) -> Tensor:
        dtype = _compute_dtype(x)
        valid = targets != IGNORE_INDEX
        n = int(valid.sum())
        if n == 0:
            raise ValueError("causal_lm_loss: no position has a next token to predict (every label is the "
                             "ignore index, or the sequences hold one token); the mean loss is undefined")
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad = torch.zeros_like(x)
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            # One set of chunk buffers for the whole call: a fresh [chunk, vocab] tensor per step and per
            # op costs page faults and zeroing comparable to the arithmetic.
            rows_max = min(chunk, x.shape[0])
            low = dtype != torch.float32  # products in a lower precision than the float32 softmax
            logits = torch.empty(rows_max, w.shape[0], dtype=dtype, device=x.device)
            p = torch.empty(logits.shape, dtype=torch.float32, device=x.device) if low else logits
            g_low = torch.empty(rows_max, x.shape[1], dtype=dtype, device=x.device)
            for s in range(0, x.shape[0], chunk):
                rows = slice(s, s + chunk)
                r = min(chunk, x.shape[0] - s)
                t, keep = targets[rows].clamp_min(0).unsqueeze(1), valid[rows].unsqueeze(1)
                z, pr = logits[:r], p[:r]
                if b is None:
                    torch.mm(x[rows].to(dtype), w.t(), out=z)
                else:
                    torch.addmm(b, x[rows].to(dtype), w.t(), out=z)
                if low:
                    pr.copy_(z)
                pr.sub_(pr.amax(dim=1, keepdim=True))  # z - max: every exp <= 1
                z_t = pr.gather(1, t)
                sums = pr.exp_().sum(dim=1, keepdim=True)
                total -= (z_t - sums.log()).masked_fill_(~keep, 0).sum(dtype=torch.float64)
                # d loss / d logits = (softmax - onehot(target)) / n on labelled rows, 0 on the others
                scale = keep.float() / n
                pr.mul_(scale / sums).scatter_add_(1, t, -scale)
                if low:  # into the logits buffer, free again
                    z.copy_(pr)
                torch.mm(z, w, out=g_low[:r])
                grad[rows] = g_low[:r]
        ctx.save_for_backward(grad)
        return (total / n).float()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None


def is_frozen_linear(head: nn.Module | None) -> TypeGuard[nn.Linear]:
    """Whether :func:`causal_lm_loss` can stand in for ``head`` and the loss after it: a plain linear
    whose parameters take no gradient."""
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, *, chunk: int = 256) -> Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` on ``labels``, as transformers' causal-LM loss
    (row ``t`` predicts ``labels[:, t + 1]``; labels of -100 are skipped).

    hidden: [b, L, d] (the head's input); labels: [b, L] int64. Returns a float32 scalar whose gradient
    reaches ``hidden`` only: the head must be frozen (``requires_grad=False``), which is checked, since
    a trainable head would silently get no gradient. ``chunk``: rows whose logits exist at once.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"causal_lm_loss: hidden [b, L, d] and labels [b, L] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"causal_lm_loss: chunk must be >= 1, got {chunk}")
    if any(p.requires_grad for p in head.parameters()):
        raise ValueError("causal_lm_loss gives the head no gradient; freeze it (requires_grad=False) first")
    d = hidden.shape[-1]
    # The last position has no next token: it takes no part in the loss, and its gradient is 0.
    x = hidden[:, :-1].reshape(-1, d)
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    return _FrozenHeadLoss.apply(x, head.weight, head.bias, targets, chunk)
