"""The frozen-head causal-LM loss against transformers' loss on the full logits, value and gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from sqllm.engine.lm_loss import IGNORE_INDEX, causal_lm_loss

VOCAB, D = 97, 24


def _case(bias: bool, seed: int = 0) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, VOCAB, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, D, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    head.requires_grad_(False)
    hidden = torch.randn(2, 13, D, generator=g)
    labels = torch.randint(0, VOCAB, (2, 13), generator=g)
    labels[0, 4] = labels[1, 0] = labels[1, 9] = IGNORE_INDEX
    return hidden, head, labels


def _reference(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = hidden.clone().requires_grad_(True)
    loss = ForCausalLMLoss(head(h), labels, vocab_size=VOCAB)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_float32_loss_and_gradient_equal_the_full_logits_path(bias, chunk):
    hidden, head, labels = _case(bias)
    want_loss, want_grad = _reference(hidden, head, labels)
    h = hidden.clone().requires_grad_(True)
    loss = causal_lm_loss(h, head, labels, chunk=chunk)
    (2.5 * loss).backward()  # the incoming gradient scales the saved one
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=0)
    # the sums over the vocabulary cancel: round-off is relative to the gradient's scale, not each element
    torch.testing.assert_close(h.grad, 2.5 * want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())
    assert torch.count_nonzero(h.grad[:, -1]) == 0  # the last position predicts nothing


def test_under_bf16_autocast_the_products_run_in_bf16_like_the_full_path():
    """Same logits and gradient products as autocast's full path: agreement to bf16 rounding, and far
    closer to it than the float32 result is."""
    hidden, head, labels = _case(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grad = _reference(hidden, head, labels)
        h = hidden.clone().requires_grad_(True)
        loss = causal_lm_loss(h, head, labels, chunk=4)
    loss.backward()
    _, fp32_grad = _reference(hidden, head, labels)
    assert h.grad.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=0)
    assert (h.grad - want_grad).norm() < 0.01 * want_grad.norm()
    assert (h.grad - want_grad).norm() < 0.25 * (fp32_grad - want_grad).norm()


def test_bad_input_is_refused():
    hidden, head, labels = _case(bias=False)
    with pytest.raises(ValueError, match="freeze"):
        causal_lm_loss(hidden, nn.Linear(D, VOCAB), labels)
    with pytest.raises(ValueError, match=r"\(2, 12\)"):
        causal_lm_loss(hidden, head, labels[:, 1:])
    with pytest.raises(ValueError, match="chunk"):
        causal_lm_loss(hidden, head, labels, chunk=0)
    with pytest.raises(ValueError, match="ignore index"):
        causal_lm_loss(hidden, head, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="one token"):
        causal_lm_loss(hidden[:, :1], head, labels[:, :1])
