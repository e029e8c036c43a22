"""The block loop: quantize a model one decoder block at a time, as GPTQ does.

The model comes as :class:`~sqllm.engine.stream.ModelParts`: a loaded model, or a checkpoint whose
weights rest on disk and come in one block at a time. Two orders:

* Forward (methods with layer statistics or a block stage, and Fisher methods given a Fisher table):
  1. run the embeddings on the calibration windows and capture the first block's inputs (and the
     keyword arguments the architecture passes it: masks, position embeddings);
  2. for each block: load it; for each sequential group of linears, hook their inputs to collect the
     statistics the method needs, run the block, call the solver per linear and write the dequantized
     weight back; run the method's block stage; run the block once more so that its *quantized*
     outputs become the next block's inputs; hand the block's codes to the sink; release the block.
* Reverse, for Fisher methods without a Fisher table: the streamed Fisher pass
  (:func:`~sqllm.engine.fisher.streamed_fisher`) yields each block's Fisher while the block is still
  loaded, from the last block to the first, and the block is solved at once. The Fisher never exists
  for the whole model, and each block is read from disk twice (forward sweep, reverse sweep).

After each block the :class:`~sqllm.engine.resume.WorkState`, if given, records what is needed to go
on after a kill (the next block's inputs or the gradient flowing into it). Peak memory is one block in
the compute dtype, its statistics, and the calibration activations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..codes import QuantizedMatrix
from ..errors import InvalidConfig
from ..methods import LayerStats, MethodSpec, StageOptions, StatContext
from ..models import ArchSpec, linear_names
from . import distributed as dist
from .stream import ActivationCache, InMemoryParts, ModelParts, StopForward, block_output, first_block_inputs

# ``stage(block, index, block_inputs, fp_outputs, block_results) -> block_results``: block-level work
# (training, refinement) after a block's linears are solved; see MethodSpec.block_stage.
BlockStage = Callable[
    [nn.Module, int, "BlockInputs", Tensor, dict[str, QuantizedMatrix]],
    dict[str, QuantizedMatrix],
]
# ``sink(index, block_results, block)``: receives each finished block's codes while the block is loaded
BlockSink = Callable[[int, dict[str, QuantizedMatrix], nn.Module], None]


@dataclass
class BlockInputs:
    """Inputs of a decoder block for every calibration window: ``hidden [n, L, d]`` plus shared kwargs."""

    hidden: Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


def capture_first_block_inputs(model: nn.Module, arch: ArchSpec, windows: Tensor, batch_size: int) -> BlockInputs:
    """Run a loaded model up to its first block on ``windows: [n, L]`` and keep what the block receives."""
    device = next(model.parameters()).device
    return BlockInputs(*first_block_inputs(InMemoryParts(model, device=device), windows, batch_size))


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int) -> Tensor:
    """Outputs ``[n, L, d]`` of one block on every window."""
    with torch.no_grad():
        return torch.cat([block_output(block(h, **inputs.kwargs)) for h in inputs.hidden.split(batch_size)])


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, independent of the method.

    batch_size:      calibration windows per block forward
    input_rows:      rows of calibration inputs kept per linear for methods that sample inputs
    device:          where each block is moved while it is calibrated
    fisher_amp:      autocast dtype of the Fisher pass's forward and backward (None: float32)
    activation_budget: bytes of block inputs the streamed Fisher keeps in memory; the rest go to disk
    resident_fisher_bytes: a model whose weights take at most this many bytes in the compute dtype is
                     loaded whole for its Fisher pass, which then computes each window forward and
                     backward once; a larger one streams (each block computed twice, see
                     :func:`~sqllm.engine.fisher.streamed_fisher`)

    Whether a block's linears are solved group by group (true-sequential) is the method's own option
    (``cfg.true_sequential`` where the config has it).
    """

    batch_size: int = 8
    input_rows: int = 4096
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    fisher_amp: torch.dtype | None = None
    activation_budget: int = 2 * 1024**3
    resident_fisher_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidConfig(f"batch_size={self.batch_size} must be >= 1 (calibration windows per forward)")
        if self.input_rows < 1:
            raise InvalidConfig(f"input_rows={self.input_rows} must be >= 1")
        if self.resident_fisher_bytes < 0:
            raise InvalidConfig(f"resident_fisher_bytes={self.resident_fisher_bytes} must be >= 0")


class StageClock:
    """Wall seconds per named stage, summed over the run (``with clock("solve"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> _Timed:
        return _Timed(self, stage)


class _Timed:
    def __init__(self, clock: StageClock, stage: str):
        self.clock, self.stage = clock, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.clock.seconds[self.stage] = self.clock.seconds.get(self.stage, 0.0) + time.perf_counter() - self.start


def _collect(
    block: nn.Module, names: tuple[str, ...], method: MethodSpec, inputs: BlockInputs, opts: EngineOptions
) -> dict[str, LayerStats]:
    """Run the block once with hooks on ``names`` and return each linear's statistics, summed over the
    data-parallel ranks when there are several (each rank runs its own windows).

    A linear whose input is the very tensor the previously hooked linear received (q/k/v, gate/up) takes
    that linear's accumulators of ``shared`` statistics: on a LLaMA block this skips three of seven
    Hessian products, with bit-identical results.

    Each batch's forward stops as soon as every linear of the group has seen its input: the rest of the
    block cannot change the statistics (each linear of a dense decoder block runs once per forward). On
    a LLaMA block the four true-sequential groups then cost about two block forwards, not four."""
    n_windows = inputs.hidden.shape[0]
    per_batch = math.ceil(opts.input_rows / math.ceil(n_windows / opts.batch_size))
    accs: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        n_in = block.get_submodule(name).in_features
        ctx = StatContext(input_rows=opts.input_rows, per_batch=per_batch, seed=opts.seed + i)
        accs[name] = {stat.name: stat.make(n_in, ctx) for stat in method.layer_stats}
    shared_kinds = {stat.name for stat in method.layer_stats if stat.shared}
    source: dict[str, str] = {}  # linear -> the linear whose input (and shared accumulators) it shares
    last: list[Any] = [None, None]  # (name, input) of the latest hook call

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # compared as the module received it: every detach() is a new object
            if name not in source:  # the first batch decides, the later ones must agree
                source[name] = source[last[0]] if last[1] is x else name
                for kind in shared_kinds:
                    accs[name][kind] = accs[source[name]][kind]
            elif (source[name] != name) != (last[1] is x):
                raise RuntimeError(f"{name}: its input stopped being (or started being) the previous linear's")
            last[:] = name, x
            for kind, acc in accs[name].items():
                if source[name] == name or kind not in shared_kinds:
                    acc.update(x.detach())
            seen.add(name)
            if len(seen) == len(names):
                raise StopForward

        return hook

    seen: set[str] = set()
    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for h in inputs.hidden.split(opts.batch_size):
                seen.clear()
                try:
                    block(h, **inputs.kwargs)
                except StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        last[:] = None, None
    unique = {id(a): a for n in names for a in accs[n].values()}
    for acc in unique.values():
        dist.reduce_accumulator(acc)
    # One result per accumulator, so linears sharing an input share the tensor, and one ``derived``
    # dict per input, in which solvers keep what they compute from the shared statistics alone.
    results = {key: acc.result() for key, acc in unique.items()}
    derived: dict[str, dict[Any, Any]] = {}
    return {
        n: LayerStats(name=n, derived=derived.setdefault(source.get(n, n), {}),
                      **{kind: results[id(acc)] for kind, acc in accs[n].items()})
        for n in names
    }


def _solve_group(
    parts: ModelParts, b: int, group: tuple[str, ...], stats: dict[str, LayerStats], method: MethodSpec, cfg: Any,
    fisher: Mapping[str, Tensor] | None, bar: tqdm, share: bool, plans: Mapping[str, Any] | None = None,
) -> dict[str, QuantizedMatrix]:
    """Solve each linear of ``group`` in block ``b`` and write its dequantized weight back.

    Rank 0 solves; with ``share`` the other data-parallel ranks receive the dequantized weights (their
    next block inputs must be computed with the same weights). Other ranks return no codes."""
    block = parts.block(b)
    results: dict[str, QuantizedMatrix] = {}
    for name in group:
        full = f"{parts.block_name(b)}.{name}"
        layer = block.get_submodule(name)
        if dist.is_main():
            st = stats[name]
            st.name = full
            if fisher is not None:
                st.fisher = fisher[full].to(layer.weight.device)
            if plans is not None:
                st.plan = plans[full]
            qm = method.solve(layer.weight.data.float(), st, cfg)
            layer.weight.data = qm.dequantize().to(layer.weight.dtype).to(layer.weight.device)
            results[full] = qm
        if share:
            dist.broadcast_(layer.weight.data)
        bar.update(1)
        bar.set_postfix_str(f"block {b} {name}")
    # What the group's solvers derived from its inputs (a prepared Hessian holds two [in, in] matrices)
    # is spent: free it now, not when the caller drops the statistics after the block's propagation.
    for st in stats.values():
        st.derived.clear()
    return results


def _forward_order(
    parts: ModelParts, method: MethodSpec, cfg: Any, windows: Tensor | None, fisher: FisherTable | None,
    opts: EngineOptions, sink: BlockSink, work: Any, clock: StageClock, plans: Mapping[str, Any] | None,
) -> None:
    """Blocks from first to last, each calibrated on the quantized outputs of the ones before; ``plans``:
    the method's model-wide decisions by full linear name (``LayerStats.plan``)."""
    stage_opts = StageOptions(seed=opts.seed, progress=opts.progress)
    stage = method.block_stage(cfg, stage_opts) if method.block_stage else None
    groups = parts.arch.sequential if getattr(cfg, "true_sequential", True) else (parts.arch.linears,)
    start, inputs = 0, None
    if method.needs_windows:
        assert windows is not None
        resumed = work.resume_forward(parts.device) if work is not None else None
        with clock("capture"):
            hidden, kwargs = first_block_inputs(parts, windows[:1] if resumed else windows, opts.batch_size)
        start, hidden = resumed if resumed else (0, hidden)
        inputs = BlockInputs(hidden, kwargs)
    elif work is not None:
        start = work.next_block_forward()
    with tqdm(total=(parts.n_blocks - start) * len(parts.arch.linears), desc=f"{method.name} blocks",
              disable=not opts.progress) as bar:
        for b in range(start, parts.n_blocks):
            names = parts.names_under((parts.block_name(b),))
            with clock("load"):
                parts.load(names)
            try:
                _forward_block(parts, b, method, cfg, groups, inputs, fisher, stage, opts, sink, clock, bar, plans)
            finally:
                parts.release(names)
            if work is not None:
                work.block_done(b, inputs.hidden if inputs is not None else None, direction="forward")


def _forward_block(
    parts: ModelParts, b: int, method: MethodSpec, cfg: Any, groups: tuple[tuple[str, ...], ...],
    inputs: BlockInputs | None, fisher: FisherTable | None, stage: BlockStage | None, opts: EngineOptions,
    sink: BlockSink, clock: StageClock, bar: tqdm, plans: Mapping[str, Any] | None = None,
) -> None:
    """Calibrate, solve, refine and propagate the loaded block ``b``; ``inputs.hidden`` becomes its
    quantized outputs."""
    block = parts.block(b)
    fp_out = run_block(block, inputs, opts.batch_size) if stage is not None and inputs is not None else None
    block_fisher = fisher.block(b) if fisher is not None else None
    results: dict[str, QuantizedMatrix] = {}
    for group in groups:
        with clock("statistics"):
            stats = (_collect(block, group, method, inputs, opts) if method.layer_stats and inputs is not None
                     else {n: LayerStats(name=n) for n in group})
        with clock("solve"):
            results.update(_solve_group(parts, b, group, stats, method, cfg, block_fisher, bar,
                                        share=inputs is not None, plans=plans))
    if stage is not None:
        assert inputs is not None and fp_out is not None  # a block stage makes the method need windows
        with clock("block stage"):
            results = stage(block, b, inputs, fp_out, results)
    if inputs is not None:
        with clock("propagate"):
            inputs.hidden = run_block(block, inputs, opts.batch_size)
    if dist.is_main():
        with clock("write"):
            sink(b, results, block)


def _reverse_fisher_order(
    parts: ModelParts, method: MethodSpec, cfg: Any, windows: Tensor, opts: EngineOptions, sink: BlockSink,
    work: Any, clock: StageClock,
) -> None:
    """Fisher methods: each block is solved as soon as the streamed Fisher pass has its Fisher."""
    from .fisher import streamed_fisher

    resume = work.resume_reverse(parts.device) if work is not None else None
    sweep = streamed_fisher(parts, windows, amp=opts.fisher_amp, cache=_activation_cache(work, opts),
                            batch_size=opts.batch_size, progress=opts.progress, resume=resume, clock=clock)
    top = resume[0] if resume is not None else parts.n_blocks - 1
    with tqdm(total=(top + 1) * len(parts.arch.linears), desc=f"{method.name} blocks",
              disable=not opts.progress) as bar:
        for b, block_fisher, grad_in in sweep:
            with clock("solve"):
                stats = {n: LayerStats(name=n) for n in parts.arch.linears}
                results = _solve_group(parts, b, parts.arch.linears, stats, method, cfg, block_fisher, bar,
                                       share=False)
            if dist.is_main():
                with clock("write"):
                    sink(b, results, parts.block(b))
            if work is not None:
                work.block_done(b, grad_in, direction="reverse")


def _activation_cache(work: Any, opts: EngineOptions) -> ActivationCache:
    """Where the streamed Fisher pass keeps block inputs: memory up to the budget, then the work folder."""
    return ActivationCache(work.activation_dir if work is not None else None, opts.activation_budget)


def fisher_resident(parts: ModelParts, opts: EngineOptions) -> bool:
    """Whether the Fisher pass loads the whole model (its weights fit ``opts.resident_fisher_bytes``
    in the compute dtype) rather than streaming it block by block."""
    n = sum(p.numel() for p in parts.model.parameters())  # tied weights counted once
    return n * parts.dtype.itemsize <= opts.resident_fisher_bytes


def _kept_fisher(
    parts: ModelParts, windows: Tensor, work: Any, clock: StageClock, compute: Callable[[], Mapping[str, Tensor]]
) -> Mapping[str, Tensor] | Callable[[list[str]], dict[str, Tensor]]:
    """The whole Fisher table from ``compute()``, kept in the work folder (when there is one) so that a
    killed run resumes without a second gradient pass: a resumed run, or this one once the table is
    written, reads it back lazily, one block at a time. Returns the table or a reader of it."""
    from .fisher import fisher_reader, save_fisher

    shapes = {n: tuple(parts.model.get_submodule(n).weight.shape) for n in linear_names(parts.model, parts.arch)}
    if work is not None and work.fisher_path.is_file():
        return fisher_reader(work.fisher_path, shapes)
    table = compute()
    if work is None:
        return table
    with clock("write"):
        tmp = work.fisher_path.with_name(work.fisher_path.name + ".partial")
        save_fisher(tmp, table, {"windows": list(windows.shape)})
        tmp.replace(work.fisher_path)
    return fisher_reader(work.fisher_path, shapes)


def _resident_fisher(parts: ModelParts, windows: Tensor, opts: EngineOptions, clock: StageClock) -> dict[str, Tensor]:
    """The Fisher table of a model small enough to load whole: every part loaded at once, each window
    one forward and one backward (:func:`~sqllm.engine.fisher.compute_fisher`), no block computed twice."""
    from .fisher import compute_fisher

    with clock("fisher"), parts.loaded(parts.tensor_names()):
        return compute_fisher(parts.model, linear_names(parts.model, parts.arch), windows, amp=opts.fisher_amp,
                              progress=opts.progress)


class FisherTable:
    """Per-block view of a Fisher table: a dict ``{full linear name: [out, in]}`` or a lazy reader
    (``block(b)`` returns the block's entries)."""

    def __init__(self, parts: ModelParts, source: Mapping[str, Tensor] | Callable[[list[str]], dict[str, Tensor]]):
        self.parts = parts
        self.source = source

    def block(self, b: int) -> dict[str, Tensor]:
        names = [f"{self.parts.block_name(b)}.{n}" for n in self.parts.arch.linears]
        if callable(self.source):
            return self.source(names)
        return {n: self.source[n] for n in names}


def quantize_parts(
    parts: ModelParts,
    method: MethodSpec,
    cfg: Any,
    *,
    sink: BlockSink,
    windows: Tensor | None = None,
    fisher: Mapping[str, Tensor] | Callable[[list[str]], dict[str, Tensor]] | None = None,
    opts: EngineOptions = EngineOptions(),
    work: Any = None,
    clock: StageClock | None = None,
) -> StageClock:
    """Quantize every targeted linear of ``parts``, handing each finished block's codes to ``sink``.

    windows: ``[n, L]`` calibration tokens (this rank's share under data parallelism); needed when the
             method collects layer statistics, has a block stage, or computes its Fisher
    fisher:  for Fisher methods, a table ``{full linear name: [out, in]}`` or a reader ``names -> table``;
             None computes it: the whole model at once when it fits ``opts.resident_fisher_bytes``,
             else with the streamed Fisher pass, solving each block as its Fisher is done
    work:    a :class:`~sqllm.engine.resume.WorkState` to record progress in and resume from
    Returns the clock with the seconds spent per stage.
    """
    clock = clock or StageClock()
    if work is not None and len(work.done) == parts.n_blocks:  # killed after the last block: nothing left
        return clock
    if method.needs_windows and windows is None:
        raise ValueError(f"method {method.name!r} needs calibration windows")
    planner = method.plan(cfg) if method.plan is not None else None
    if method.fisher and fisher is None:
        if windows is None:
            raise ValueError(f"method {method.name!r} needs calibration windows or a Fisher table")
        if fisher_resident(parts, opts):
            fisher = _kept_fisher(parts, windows, work, clock, lambda: _resident_fisher(parts, windows, opts, clock))
        elif planner is not None:
            # A model-wide plan reads every linear's Fisher before any block is solved: the streamed
            # pass runs first, its whole table in memory until it is written to the work folder (4 bytes
            # per weight; a Fisher file from `sqllm sensitivity` avoids that).
            from .fisher import streamed_fisher_dict

            fisher = _kept_fisher(parts, windows, work, clock, lambda: streamed_fisher_dict(
                parts, windows, amp=opts.fisher_amp, cache=_activation_cache(work, opts), batch_size=opts.batch_size,
                progress=opts.progress, clock=clock))
        else:
            _reverse_fisher_order(parts, method, cfg, windows, opts, sink, work, clock)
            return clock
    table = FisherTable(parts, fisher) if method.fisher and fisher is not None else None
    plans = None
    if planner is not None:
        assert table is not None
        with clock("plan"):
            plans = planner(_weights_and_fisher(parts, table))
    _forward_order(parts, method, cfg, windows, table, opts, sink, work, clock, plans)
    return clock


def _weights_and_fisher(parts: ModelParts, table: FisherTable) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(full name, w [out, in] float32, fisher [out, in])`` of every linear, one block in memory at a time."""
    for b in range(parts.n_blocks):
        names = parts.names_under((parts.block_name(b),))
        parts.load(names)
        try:
            block, block_fisher = parts.block(b), table.block(b)
            for name in parts.arch.linears:
                full = f"{parts.block_name(b)}.{name}"
                layer = block.get_submodule(name)
                assert isinstance(layer, nn.Linear)
                yield full, layer.weight.data.float(), block_fisher[full]
        finally:
            parts.release(names)


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
    """Quantize every targeted linear of a loaded ``model`` in place (weights become their dequantized
    values) and return the codes by full module name.

    windows:    ``[n, L]`` calibration tokens; needed when the method collects layer statistics or has
                a block stage
    fisher:     full linear name -> ``[out, in]`` Fisher diagonal, for methods that need it

    The method's block stage, if any, is called after a block is quantized and before its outputs are
    propagated, with the block's full-precision outputs; it may refine the block's weights and codes
    (SliM-LLM+ trains its clipping there).
    """
    if method.fisher and fisher is None:
        raise ValueError(f"method {method.name!r} needs Fisher information")
    results: dict[str, QuantizedMatrix] = {}

    def collect(b: int, block_results: dict[str, QuantizedMatrix], block: nn.Module) -> None:
        results.update(block_results)

    quantize_parts(InMemoryParts(model, device=opts.device), method, cfg, sink=collect, windows=windows,
                   fisher=fisher, opts=opts)
    return dict(sorted(results.items(), key=lambda kv: _order(arch, kv[0])))


def _order(arch: ArchSpec, name: str) -> tuple[int, int]:
    """Sort key of a full linear name: block index, then position in the architecture's linears."""
    rest = name.removeprefix(arch.blocks + ".")
    b, _, rel = rest.partition(".")
    return int(b), arch.linears.index(rel)

