"""Diagonal Fisher information of a causal LM's linear weights (SqueezeLLM §3.2, Eq. 3-4).

``F = sum over calibration windows of grad(W)**2``, the gradient of the window's causal-LM loss (labels
= inputs). It is a model-level pass, so it lives beside the block loop rather than in it; its result
feeds the SqueezeLLM solver per linear. Two exact ways to run it:

* :func:`compute_fisher`: every window runs the whole (loaded) model forward and backward.
* :func:`streamed_fisher`: one block in memory at a time. A forward sweep over the blocks keeps each
  block's inputs (:class:`~sqllm.engine.stream.ActivationCache`, on disk past a budget); the head and
  loss give the gradient at the last hidden state of each window; a reverse sweep recomputes each block
  from its saved input with gradients on, backpropagates each window's incoming gradient, squares that
  window's weight gradients into the block's float32 accumulators and hands the input gradient to the
  block below. Each block is computed twice (no-grad, then with grad): the least a streamed backward
  can do without keeping a block's internal activations.

Both can run forward and backward under autocast (``amp=torch.bfloat16``: AMX on recent x86 CPUs,
tensor cores on GPUs) while the squares and sums stay float32.
Saved as safetensors, so a long gradient pass is run once and reused (``sqllm sensitivity``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import CorruptCheckpoint, InvalidConfig
from ..models import ARCHITECTURES
from . import distributed as dist
from .lm_loss import causal_lm_loss, is_frozen_linear
from .stream import ActivationCache, ModelParts, block_output, first_block_inputs, head_loss

FISHER_FORMAT = "sqllm-fisher"
FISHER_VERSION = 1


def _target_weights(model: nn.Module, linear_names: list[str]) -> dict[str, nn.Parameter]:
    """name -> weight Parameter of every named linear; InvalidConfig naming the first unknown one."""
    weights = {}
    for name in linear_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InvalidConfig(f"model has no module {name!r} to compute Fisher information for") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise InvalidConfig(f"module {name!r} has no 2-D weight; Fisher is computed for linears only")
        weights[name] = weight
    return weights


@contextmanager
def _squares_into(params: list[nn.Parameter], acc: dict[int, Tensor]) -> Iterator[None]:
    """While open, each of ``params``' gradients is squared into ``acc[id(param)]`` (float32) as soon as
    it is complete, then dropped: at most one gradient per weight is alive."""

    def square(p: Tensor) -> None:
        assert p.grad is not None  # the hook runs once the gradient is accumulated
        g = p.grad.float()
        acc[id(p)].addcmul_(g, g)  # one pass, no temporary for the square
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(square) for p in params]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def _only_these_require_grad(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter but ``params`` (no gradient memory for the rest); restore the flags on
    exit. ``params`` leave with ``.grad = None``."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None


@contextmanager
def _gradient_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """Eval mode (no dropout), or train mode with gradient checkpointing, which transformers only
    applies while training; the model's mode and checkpointing state come back on exit."""
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has the old names.
    new_api = hasattr(model, "activation_checkpointing_enable")
    was_training = model.training
    was_checkpointing = bool(
        getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False)
    )
    try:
        if checkpointing:
            # Non-reentrant checkpointing: the frozen embeddings' output needs no grad for the weights
            # inside a checkpointed block to get theirs.
            kwargs = {"use_reentrant": False}
            if new_api:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.train()
        else:
            model.eval()
        yield
    finally:
        if checkpointing and not was_checkpointing:
            (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        model.train(was_training)


def _check_windows(windows: Tensor) -> None:
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[0] == 0:
        raise InvalidConfig(f"Fisher windows must be a non-empty [n, L] int64 tensor, got {windows.dtype} "
                            f"{tuple(windows.shape)}")


def _autocast(device: torch.device, amp: torch.dtype | None):
    """Autocast to ``amp`` on ``device`` (a no-op context when ``amp`` is None)."""
    return torch.autocast(device_type=device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def _frozen_head(model: nn.Module) -> nn.Linear | None:
    """The head of a supported architecture whose weights get no gradient in this pass, or None.

    For those architectures the logits are exactly ``head(base_model(ids).last_hidden_state)``, so the
    loss can be taken at the head's input by :func:`~sqllm.engine.lm_loss.causal_lm_loss`; other models,
    and a head that is itself a target, run the model's own forward and loss."""
    if getattr(getattr(model, "config", None), "model_type", None) not in ARCHITECTURES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if is_frozen_linear(head) else None


def compute_fisher(
    model: nn.Module,
    linear_names: list[str],
    windows: Tensor,
    *,
    grad_checkpointing: bool = False,
    amp: torch.dtype | None = None,
    progress: bool = True,
    frozen_head_loss: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher ``{name: [out, in] float32}`` of the named linears' weights, on CPU.

    windows: [n, L] token ids; each window is one forward + backward of the causal-LM loss with
    ``labels = inputs``, and the element-wise square of each window's gradient is summed over windows.
    Only the named weights require grad during the pass (the model's ``requires_grad`` flags, training
    mode and gradient checkpointing state are restored afterwards). Each gradient is squared into its
    float32 accumulator as soon as it is complete and then dropped, so at most one gradient per weight
    is alive; no optimizer is involved. ``amp``: run forward and backward under autocast to that dtype.
    ``frozen_head_loss``: take the loss at the head's input (:func:`_frozen_head`), the same loss without
    the ``[L, vocab]`` float32 logits and their backward; False always runs the model's own forward and
    loss, the reference that path is checked against.
    """
    _check_windows(windows)
    weights = _target_weights(model, linear_names)
    # One accumulator per distinct Parameter: tied weights share theirs (and their single gradient).
    acc = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in weights.values()}
    params = list({id(p): p for p in weights.values()}.values())

    device = torch.device(getattr(model, "device", None) or (params[0].device if params else "cpu"))
    with _only_these_require_grad(model, params), _gradient_mode(model, grad_checkpointing), torch.enable_grad(), \
            _squares_into(params, acc):
        # One autocast context around every window: its cast cache keeps each target weight's
        # low-precision copy until the pass ends, so weights are cast once, not once per window.
        with _autocast(device, amp):
            head = _frozen_head(model) if frozen_head_loss else None
            for window in tqdm(windows, desc="Fisher", unit="window", disable=not progress):
                ids = window.unsqueeze(0).to(device)
                if head is None:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                else:
                    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                    loss = causal_lm_loss(hidden, head, ids)
                with _autocast(device, None):  # backward outside autocast (nested: keeps the cache)
                    loss.backward()
    for t in acc.values():
        dist.all_reduce_(t)
    return {name: acc[id(p)].cpu() for name, p in weights.items()}


def _run_blocks_forward(
    parts: ModelParts, hidden: Tensor, kwargs: dict[str, Any], cache: ActivationCache, amp: torch.dtype | None,
    batch_size: int, stop: int, progress: bool,
) -> Tensor:
    """Forward sweep over blocks ``0 .. stop-1``: put each block's input ``[n, L, d]`` into ``cache`` and
    return the output of block ``stop - 1``."""
    for b in tqdm(range(stop), desc="Fisher forward", unit="block", disable=not progress):
        cache.put(b, hidden)
        block = parts.block(b)
        with parts.loaded(parts.names_under((parts.block_name(b),))), torch.no_grad(), _autocast(parts.device, amp):
            hidden = torch.cat([block_output(block(h, **kwargs)).float() for h in hidden.split(batch_size)])
    return hidden


def _head_gradients(parts: ModelParts, hidden: Tensor, windows: Tensor, amp: torch.dtype | None) -> Tensor:
    """Gradient of each window's loss at the last block's output: ``[n, L, d]`` float32."""
    grads = []
    with parts.loaded(parts.head_names()), _only_these_require_grad(parts.model, []), torch.enable_grad():
        for w in range(hidden.shape[0]):
            h = hidden[w : w + 1].detach().requires_grad_(True)
            with _autocast(parts.device, amp):
                loss = head_loss(parts, h, windows[w : w + 1].to(parts.device))
            grads.append(torch.autograd.grad(loss, h)[0].float())
    return torch.cat(grads)


def _backward_block(
    block: nn.Module, x: Tensor, g: Tensor, kwargs: dict[str, Any], weights: dict[str, nn.Parameter],
    amp: torch.dtype | None, need_input_grad: bool,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """One block of the reverse sweep: recompute each window ``x[w] [1, L, d]`` with grad, backpropagate
    ``g[w]``, and square that window's weight gradients into float32 accumulators.

    Returns ``({name: [out, in] float32}, input gradient [n, L, d] float32 or None)``.
    """
    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in weights.items()}
    params = list(weights.values())
    input_grads = []
    with _only_these_require_grad(block, params), torch.enable_grad(), \
            _squares_into(params, {id(p): acc[name] for name, p in weights.items()}):
        with _autocast(x.device, amp):  # one context: the block's weights are cast once (see compute_fisher)
            for w in range(x.shape[0]):
                xw = x[w : w + 1].detach().requires_grad_(need_input_grad)
                out = block_output(block(xw, **kwargs))
                wanted = params + ([xw] if need_input_grad else [])
                with _autocast(x.device, None):
                    torch.autograd.backward(out, g[w : w + 1].to(out.dtype), inputs=wanted)
                if need_input_grad:
                    assert xw.grad is not None
                    input_grads.append(xw.grad.float())
    return acc, (torch.cat(input_grads) if need_input_grad else None)


def streamed_fisher(
    parts: ModelParts,
    windows: Tensor,
    *,
    amp: torch.dtype | None = None,
    cache: ActivationCache | None = None,
    batch_size: int = 8,
    progress: bool = True,
    resume: tuple[int, Tensor] | None = None,
    clock: Callable[[str], Any] | None = None,
) -> Iterator[tuple[int, dict[str, Tensor], Tensor | None]]:
    """Exact diagonal Fisher of every targeted linear, one block at a time (see the module docstring).

    windows: [n, L] token ids (this rank's share under data parallelism; the block sums are all-reduced)
    cache:   where the forward sweep keeps block inputs (default: all in memory)
    resume:  ``(k, g)``: blocks above ``k`` are done and ``g [n, L, d]`` is the gradient at block ``k``'s
             output; the forward sweep stops at block ``k`` and the head is skipped
    clock:   ``clock(stage)`` gives a context that times the stage ("fisher forward", ...)
    Yields ``(b, {full linear name: [out, in] float32 on parts.device}, gradient at block b's input or
    None for block 0)`` from the top block down, while block ``b``'s weights are still loaded, so a
    consumer can quantize the block at once.
    """
    _check_windows(windows)
    timed = clock or (lambda stage: nullcontext())
    cache = cache if cache is not None else ActivationCache(None, 0)
    top = resume[0] if resume is not None else parts.n_blocks - 1
    with timed("fisher forward"):
        hidden, kwargs = first_block_inputs(parts, windows, batch_size)
        hidden = _run_blocks_forward(parts, hidden.float(), kwargs, cache, amp, batch_size,
                                     top if resume is not None else parts.n_blocks, progress)
    if resume is not None:
        cache.put(top, hidden)
        g: Tensor | None = resume[1].to(parts.device)
    else:
        with timed("fisher head"):
            g = _head_gradients(parts, hidden, windows, amp)
    del hidden
    with tqdm(total=(top + 1) * windows.shape[0], desc="Fisher backward", unit="window",
              disable=not progress) as bar:
        for b in range(top, -1, -1):
            prefix = parts.block_name(b)
            with timed("fisher backward"):
                x = cache.get(b, parts.device)
                parts.load(parts.names_under((prefix,)))
            try:
                assert g is not None  # only block 0 passes no gradient on
                with timed("fisher backward"):
                    block = parts.block(b)
                    weights = {f"{prefix}.{lin}": block.get_submodule(lin).weight for lin in parts.arch.linears}
                    fisher, g_in = _backward_block(block, x, g, kwargs, weights, amp, need_input_grad=b > 0)
                    for t in fisher.values():
                        dist.all_reduce_(t)
                bar.update(windows.shape[0])
                yield b, fisher, g_in
            finally:
                parts.release(parts.names_under((prefix,)))
            del x, fisher
            g = g_in
            cache.drop(b)


def streamed_fisher_dict(parts: ModelParts, windows: Tensor, **options: Any) -> dict[str, Tensor]:
    """:func:`streamed_fisher` gathered into ``{full linear name: [out, in] float32 on CPU}``, in block order."""
    blocks = {b: {k: v.cpu() for k, v in f.items()} for b, f, _ in streamed_fisher(parts, windows, **options)}
    return {k: v for b in sorted(blocks) for k, v in blocks[b].items()}


def save_fisher(path: str | Path, fisher: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``fisher`` (name -> [out, in]) as float32 safetensors; ``meta`` (JSON-able) goes in the header."""
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in fisher.items()}
    header = {"format": FISHER_FORMAT, "version": str(FISHER_VERSION), "meta": json.dumps(dict(meta), default=str)}
    save_file(tensors, str(path), metadata=header)


def load_fisher(path: str | Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Read a file of :func:`save_fisher` and check it against the model: ``expected`` is name -> shape.

    Raises InvalidConfig naming the first tensor that is missing, unexpected or of the wrong shape
    (with both shapes), and CorruptCheckpoint when the file cannot be read as a Fisher file or holds
    negative or non-finite values.
    """
    return fisher_reader(path, expected)(list(expected))


def fisher_reader(
    path: str | Path, expected: Mapping[str, tuple[int, ...]]
) -> Callable[[list[str]], dict[str, Tensor]]:
    """Check a Fisher file's header against ``expected`` (name -> shape) now, as :func:`load_fisher`
    does, and return ``read(names) -> {name: [out, in] float32}`` that loads only the named tensors (a
    7B model's Fisher is 27 GB in float32; the block loop reads one block's worth at a time)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfig(f"Fisher file {str(path)!r} does not exist; compute one with `sqllm sensitivity`")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types, or OSError, on damaged files
        raise CorruptCheckpoint(f"cannot read Fisher file {str(path)!r}: {e}") from None
    if header.get("format") != FISHER_FORMAT:
        raise CorruptCheckpoint(f"{str(path)!r} is not a Fisher file (format {header.get('format')!r})")
    _check_names_and_shapes(path, shapes, expected)

    def read(names: list[str]) -> dict[str, Tensor]:
        try:
            with safe_open(str(path), framework="pt") as f:
                fisher = {name: f.get_tensor(name).float() for name in names}
        except Exception as e:
            raise CorruptCheckpoint(f"cannot read Fisher file {str(path)!r}: {e}") from None
        for name, t in fisher.items():
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise CorruptCheckpoint(f"Fisher tensor {name!r} in {str(path)!r} has negative or non-finite values")
        return fisher

    return read


def _check_names_and_shapes(
    path: Path, shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """InvalidConfig for the first expected tensor missing or misshapen, else the first unexpected one."""
    for name, shape in expected.items():
        if name not in shapes:
            raise InvalidConfig(
                f"Fisher file {str(path)!r} has no tensor {name!r} (expected shape {tuple(shape)}); "
                "it was computed for another model"
            )
        if shapes[name] != tuple(shape):
            raise InvalidConfig(
                f"Fisher tensor {name!r} in {str(path)!r} has shape {shapes[name]}, expected {tuple(shape)}; "
                "it was computed for another model"
            )
    extra = [name for name in shapes if name not in expected]
    if extra:
        raise InvalidConfig(
            f"Fisher file {str(path)!r} has tensor {extra[0]!r} of shape {shapes[extra[0]]}, which the model "
            "does not have; it was computed for another model"
        )
