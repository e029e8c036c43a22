"""The block loop: quantize a model one decoder block at a time, as GPTQ does.

1. Run the embeddings on the calibration windows and capture the inputs of the first block (and the
   keyword arguments the architecture passes it: masks, position embeddings).
2. For each block: move it to the work device; for each sequential group of linears, hook their inputs
   to collect the statistics the method needs, run the block, call the solver per linear and write the
   dequantized weight back; then run the block once more so that its *quantized* outputs become the next
   block's inputs; move it back.

Peak memory is one block plus the activations of the calibration windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..codes import QuantizedMatrix
from ..methods import LayerStats, MethodSpec, StageOptions, StatContext
from ..models import ArchSpec, get_blocks

# ``stage(block, index, block_inputs, fp_outputs, block_results) -> block_results``: block-level work
# (training, refinement) after a block's linears are solved; see MethodSpec.block_stage.
BlockStage = Callable[
    [nn.Module, int, "BlockInputs", Tensor, dict[str, QuantizedMatrix]],
    dict[str, QuantizedMatrix],
]


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Inputs of a decoder block for every calibration window: ``hidden [n, L, d]`` plus shared kwargs."""

    hidden: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


def capture_first_block_inputs(model: nn.Module, arch: ArchSpec, windows: Tensor, batch_size: int) -> BlockInputs:
    """Run the model up to its first block on ``windows: [n, L]`` and keep what the block receives."""
    first = get_blocks(model, arch)[0]
    hidden: list[Tensor] = []
    shared: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden.append(args[0] if args else kwargs["hidden_states"])
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(first.parameters()).device
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    shared["use_cache"] = False
    shared.pop("past_key_values", None)
    shared.pop("past_key_value", None)
    return BlockInputs(torch.cat(hidden), shared)


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int) -> Tensor:
    """Outputs ``[n, L, d]`` of one block on every window."""
    outs = []
    with torch.no_grad():
        for h in inputs.hidden.split(batch_size):
            out = block(h, **inputs.kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, independent of the method.

    batch_size:      calibration windows per block forward
    input_rows:      rows of calibration inputs kept per linear for methods that sample inputs
    device:          where each block is moved while it is calibrated

    Whether a block's linears are solved group by group (true-sequential) is the method's own option
    (``cfg.true_sequential`` where the config has it).
    """

    batch_size: int = 8
    input_rows: int = 4096
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


def _collect(
    block: nn.Module, names: tuple[str, ...], method: MethodSpec, inputs: BlockInputs, opts: EngineOptions
) -> dict[str, LayerStats]:
    """Run the block once with hooks on ``names`` and return each linear's statistics."""
    n_windows = inputs.hidden.shape[0]
    per_batch = math.ceil(opts.input_rows / math.ceil(n_windows / opts.batch_size))
    accs: dict[str, list[Any]] = {}
    for i, name in enumerate(names):
        n_in = block.get_submodule(name).in_features
        ctx = StatContext(input_rows=opts.input_rows, per_batch=per_batch, seed=opts.seed + i)
        accs[name] = [(stat.name, stat.make(n_in, ctx)) for stat in method.layer_stats]

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            for _, acc in accs[name]:
                acc.update(args[0].detach())

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        run_block(block, inputs, opts.batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: LayerStats(name=n, **{kind: acc.result() for kind, acc in accs[n]}) for n in names}


def quantize_blocks(
    model: nn.Module,
    arch: ArchSpec,
    method: MethodSpec,
    cfg: Any,
    *,
    windows: Tensor | None = None,
    fisher: dict[str, Tensor] | None = None,
    opts: EngineOptions = EngineOptions(),
) -> dict[str, QuantizedMatrix]:
    """Quantize every targeted linear of ``model`` in place (weights become their dequantized values)
    and return the codes by full module name.

    windows:    ``[n, L]`` calibration tokens; needed when the method collects layer statistics or has
                a block stage
    fisher:     full linear name -> ``[out, in]`` Fisher diagonal, for methods that need it

    The method's block stage, if any, is called after a block is quantized and before its outputs are
    propagated, with the block's full-precision outputs; it may refine the block's weights and codes
    (SliM-LLM+ trains its clipping there).
    """
    blocks = get_blocks(model, arch)
    prefix = arch.blocks
    needs_acts = method.needs_windows
    if needs_acts and windows is None:
        raise ValueError(f"method {method.name!r} needs calibration windows")
    if method.fisher and fisher is None:
        raise ValueError(f"method {method.name!r} needs Fisher information")
    stage = method.block_stage(cfg, StageOptions(seed=opts.seed, progress=opts.progress)) if method.block_stage else None

    inputs = capture_first_block_inputs(model, arch, windows, opts.batch_size) if needs_acts else None
    groups = arch.sequential if getattr(cfg, "true_sequential", True) else (arch.linears,)
    results: dict[str, QuantizedMatrix] = {}
    bar = tqdm(total=len(blocks) * len(arch.linears), desc=f"{method.name} blocks", disable=not opts.progress)
    for b, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(opts.device)
        if inputs is not None:
            inputs.hidden = inputs.hidden.to(opts.device)
        fp_out = run_block(block, inputs, opts.batch_size) if stage is not None else None
        block_results: dict[str, QuantizedMatrix] = {}
        for group in groups:
            if method.layer_stats:
                stats = _collect(block, group, method, inputs, opts)
            else:
                stats = {n: LayerStats(name=n) for n in group}
            for name in group:
                full = f"{prefix}.{b}.{name}"
                layer = block.get_submodule(name)
                st = stats[name]
                st.name = full
                if fisher is not None:
                    st.fisher = fisher[full]
                qm = method.solve(layer.weight.data.float(), st, cfg)
                layer.weight.data = qm.dequantize().to(layer.weight.dtype).to(layer.weight.device)
                block_results[full] = qm
                bar.update(1)
                bar.set_postfix_str(f"block {b} {name}")
        if stage is not None:
            block_results = stage(block, b, inputs, fp_out, block_results)
        results.update(block_results)
        if inputs is not None:
            inputs.hidden = run_block(block, inputs, opts.batch_size)
        block.to(home)
    bar.close()
    return results
