"""The public verbs of sqllm. The CLI calls nothing else.

    model, tok = load_model("smollm2-135m")
    result = quantize(model, tok, "squeezellm", bits=3, calib="wiki.valid.tokens", sensitive_pct=0.05)
    save_quantized(model, tok, result, "out/smollm2-sq3")
    model, tok = load_model("out/smollm2-sq3")
    print(evaluate_perplexity(model, tok, "wiki.test.raw", windows=4)["perplexity"])

Each check a command needs before its long part (a config, an output path, calibration text, task
names) is a function here that the verb itself also calls, so the CLI can run it first without
repeating it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import __version__, output
from .codes import QuantizedMatrix
from .config import CONFIG_VERSION, config_to_dict
from .data import Calibration, calibration_windows, check_source, check_window_counts, eval_tokens
from .engine.loop import EngineOptions, StageClock, quantize_blocks, quantize_parts
from .errors import InvalidConfig, NumericalError
from .formats.checkpoint import is_packed_checkpoint
from .methods import METHODS, MethodSpec, get_method
from .models import arch_spec, linear_names, resolve_model_path

__all__ = [
    "METHODS",
    "Calibration",
    "EngineOptions",
    "QuantizationResult",
    "bench",
    "compute_sensitivity",
    "evaluate_perplexity",
    "evaluate_perplexity_streamed",
    "evaluate_zeroshot",
    "generate",
    "load_model",
    "load_quantized",
    "make_config",
    "quantize",
    "quantize_checkpoint",
    "save_quantized",
    "save_sensitivity",
]


def load_model(
    spec: str, *, dtype: torch.dtype | None = None, device: str = "cpu", packed: bool = True,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a model folder, ``.gguf`` file, alias or hub id, in eval mode; a packed
    sqllm checkpoint folder loads with QuantLinear modules, or is refused when ``packed`` is False.
    ``dtype``: the dtype a full-precision model is loaded in (default float32), or the one a packed model
    computes in (default: as its norms were stored; see :func:`load_quantized`)."""
    from . import models

    path = resolve_model_path(spec)
    if is_packed_checkpoint(path):
        if not packed:
            raise InvalidConfig(_already_packed(spec, path))
        return load_quantized(path, device=device, dtype=dtype)
    return models.load_model(path, dtype=dtype or torch.float32, device=device)


def _already_packed(spec: str, path: str) -> str:
    return (f"model {spec!r} is already a packed sqllm checkpoint; give the full-precision model it was "
            f"made from (see {Path(path) / 'README.md'})")


def check_model(spec: str, *, full_precision: bool = False) -> str:
    """Resolve ``spec`` (a folder, ``.gguf``, alias or hub id) and refuse, before any weight is read, what
    would fail while loading: an unusable folder or architecture, a packed checkpoint whose config, index
    or shard headers are damaged, or a packed checkpoint where a full-precision model is needed.
    Returns what :func:`load_model` loads."""
    from .formats.checkpoint import read_quantization_config, stored_names

    path = resolve_model_path(spec)
    if is_packed_checkpoint(path):
        if full_precision:
            raise InvalidConfig(_already_packed(spec, path))
        read_quantization_config(Path(path))
        stored_names(Path(path))
    return path


def check_context(path: str, seqlen: int) -> None:
    """Windows of ``seqlen`` tokens fit the model at ``path`` (from :func:`check_model`), read from its
    ``config.json`` before loading (a hub id is checked once loaded)."""
    from .models import read_config

    if Path(path).is_dir():
        check_seqlen(seqlen, read_config(path))


def check_seqlen(seqlen: int, config: Any) -> None:
    """Windows of ``seqlen`` tokens fit the model: at least 2, at most its ``max_position_embeddings``
    (``config``: a model config or its ``config.json`` dict)."""
    limit = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    if seqlen < 2:
        raise InvalidConfig(f"seqlen={seqlen} must be >= 2")
    if isinstance(limit, int) and seqlen > limit:
        raise InvalidConfig(f"seqlen={seqlen} is longer than the model's context "
                            f"(max_position_embeddings={limit}); use at most {limit}")


def check_text_source(source: str) -> None:
    """Refuse a text source that cannot be read (missing file, folder, unknown name, unreachable hub)."""
    check_source(source)


def check_calibration_counts(nsamples: int, calib_seqlen: int) -> None:
    """At least one calibration window of at least two tokens."""
    check_window_counts(nsamples, calib_seqlen)


def check_weights_finite(model: nn.Module) -> None:
    """Refuse a model whose weights hold NaN or infinity: every method would turn them into a broken
    checkpoint (or blame the calibration text)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise NumericalError(f"weight {name!r} of the model holds {bad} NaN or infinite values; "
                                 f"the model is damaged and cannot be quantized")


@dataclass
class QuantizationResult:
    """What :func:`quantize` produced: the codes of every linear, by full module name, and a summary."""

    method: str
    config: Any
    matrices: dict[str, QuantizedMatrix]
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    dense16: dict[str, Any] | None = None  # what save_quantized stored in 16 bits (set when saved)

    def summary(self) -> dict[str, Any]:
        """Bits per weight over the quantized linears (by part and in total) and method-specific counts."""
        records = {name: {"weights": qm.shape[0] * qm.shape[1], "storage_bits": qm.storage_bits(),
                          "sparse_nnz": qm.sparse.nnz if qm.sparse is not None else None}
                   for name, qm in self.matrices.items()}
        s = summarize(self.method, self.config, records, self.calibration, self.seconds)
        if self.dense16 is not None:
            s["dense16"] = self.dense16
        return s


def summarize(method: str, config: Any, records: dict[str, dict[str, Any]], calibration: dict[str, Any],
              seconds: float | None) -> dict[str, Any]:
    """The summary of a quantization from per-linear records (``weights``, ``storage_bits`` by part,
    ``sparse_nnz`` or None): bits per weight by part and in total, sparse counts."""
    parts: dict[str, int] = {}
    n_weights = 0
    for r in records.values():
        n_weights += r["weights"]
        for k, v in r["storage_bits"].items():
            parts[k] = parts.get(k, 0) + v
    s: dict[str, Any] = {
        "method": method,
        "config": config_to_dict(config),
        "linears": len(records),
        "weights": n_weights,
        "bits_per_weight": {k: v / n_weights for k, v in parts.items()} if n_weights else {},
        "calibration": calibration,
    }
    if seconds is not None:
        s["seconds"] = seconds
    if n_weights:
        s["bits_per_weight"]["total"] = sum(parts.values()) / n_weights
    sparse = [r["sparse_nnz"] for r in records.values() if r["sparse_nnz"] is not None]
    if sparse:
        s["sparse_values"] = sum(sparse)
        s["sparse_pct"] = 100.0 * sum(sparse) / n_weights
    return s


def make_config(method: str, **options: Any) -> Any:
    """Build the validated config of ``method`` from keyword options (``None`` values mean 'default')."""
    spec = get_method(method)
    known = {f.name for f in fields(spec.config_cls)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InvalidConfig(f"method {method!r} does not take {unknown}; its options are {sorted(known)}")
    if "bits" not in given:
        raise InvalidConfig(f"method {method!r} needs bits")
    return spec.config_cls(**given)


def check_calibration_given(method: str, calib: str | None, fisher: Any = None) -> None:
    """Methods that learn from data need a calibration source (a Fisher file can stand in for the Fisher)."""
    spec = get_method(method)
    if calib is None and (spec.needs_windows or (spec.fisher and fisher is None)):
        raise InvalidConfig(f"method {method!r} needs calibration text: pass --calib SOURCE")


def check_config_against_model(cfg: Any, model: nn.Module) -> None:
    """Reject settings that do not fit the model's linears, naming every offender at once (and whatever
    a config's own ``check_input_widths(name -> in_features)`` refuses)."""
    arch = arch_spec(model)
    check_widths = getattr(cfg, "check_input_widths", None)
    if check_widths is not None:
        check_widths({name: model.get_submodule(name).in_features for name in linear_names(model, arch)})
    group_size = getattr(cfg, "group_size", None)
    if group_size is None:
        return
    offenders = sorted(
        {
            f"{name.rsplit('.', 1)[-1]} (in={model.get_submodule(name).in_features})"
            for name in linear_names(model, arch)
            if model.get_submodule(name).in_features < group_size
        }
    )
    if offenders:
        raise InvalidConfig(
            f"group_size={group_size} is larger than the input width of {', '.join(offenders)}; "
            f"use a smaller --group-size"
        )


def _resolve_config(spec: MethodSpec, config: Any, options: dict[str, Any]) -> Any:
    if config is None:
        return make_config(spec.name, **options)
    if not isinstance(config, spec.config_cls):
        raise InvalidConfig(f"method {spec.name!r} takes a {spec.config_cls.__name__}, "
                            f"got a {type(config).__name__}")
    if any(v is not None for v in options.values()):
        raise InvalidConfig(f"pass either config= or options {sorted(options)}, not both")
    return config


def quantize(
    model: nn.Module,
    tokenizer: Any,
    method: str,
    *,
    config: Any = None,
    calib: str | None = None,
    nsamples: int = 128,
    calib_seqlen: int = 2048,
    seed: int = 0,
    fisher: dict[str, Tensor] | str | None = None,
    engine: EngineOptions | None = None,
    progress: bool = True,
    **options: Any,
) -> QuantizationResult:
    """Quantize ``model`` in place with ``method`` and return the codes of every linear.

    calib:    text source for calibration windows (dataset name or local file); needed by every method
              but RTN
    fisher:   for SqueezeLLM, precomputed Fisher information (a dict or a safetensors file from
              ``sqllm sensitivity``); computed on the calibration windows when omitted
    config:   the method's config, already built with :func:`make_config` (instead of ``options``)
    options:  the method's config fields (``bits``, ``group_size``, ``sensitive_pct``, ...)
    """
    from .nn import QuantLinear

    spec = get_method(method)
    cfg = _resolve_config(spec, config, options)
    arch = arch_spec(model)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise InvalidConfig("this model is already quantized (it holds QuantLinear modules); "
                            "load the full-precision model it was made from")
    check_config_against_model(cfg, model)
    check_weights_finite(model)
    engine = engine or EngineOptions(seed=seed, progress=progress)
    names = linear_names(model, arch)

    start = time.perf_counter()
    windows = None
    calibration: dict[str, Any] = {}
    needs_windows = spec.needs_windows or (spec.fisher and not isinstance(fisher, (dict, str)))
    check_calibration_given(method, calib, fisher)
    if needs_windows:
        assert calib is not None
        check_seqlen(calib_seqlen, model.config)
        draw = Calibration(calib, nsamples, calib_seqlen, seed)
        windows, calibration = draw.windows(tokenizer), draw.record()

    fisher_dict = None
    if spec.fisher:
        from .engine.fisher import compute_fisher, load_fisher

        if isinstance(fisher, str):
            expected = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
            fisher_dict = load_fisher(fisher, expected)
            calibration["fisher_file"] = fisher
        elif isinstance(fisher, dict):
            fisher_dict = fisher
        else:
            fisher_dict = compute_fisher(model, names, windows, progress=progress)

    matrices = quantize_blocks(
        model, arch, spec, cfg, windows=windows if spec.needs_windows else None, fisher=fisher_dict, opts=engine,
    )
    return QuantizationResult(method, cfg, matrices, calibration, time.perf_counter() - start)


def quantization_config(result: QuantizationResult) -> dict[str, Any]:
    """The ``quantization_config`` block written into ``config.json``."""
    return _quantization_config(result.summary())


def _quantization_config(summary: dict[str, Any]) -> dict[str, Any]:
    from .formats.checkpoint import FORMAT_VERSION

    return {
        "quant_method": "sqllm",
        "format_version": FORMAT_VERSION,
        "config_version": CONFIG_VERSION,
        "sqllm_version": __version__,
        "method": summary["method"],
        "config": summary["config"],
        "bits": summary["config"].get("bits"),
        "group_size": summary["config"].get("group_size"),
        "bits_per_weight": summary["bits_per_weight"],
        "sparse_pct": summary.get("sparse_pct", 0.0),
        "calibration": summary["calibration"],
    }


def _model_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint folder's weights cheaply: its config, and the names and sizes of its
    safetensors files (the weights themselves are not hashed: 13 GB for a 7B model)."""
    import hashlib

    config = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    files = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}
    return {"path": str(path.resolve()), "config_sha256": config, "files": files}


def _amp_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def quantize_checkpoint(
    model: str,
    output: str | os.PathLike,
    method: str,
    *,
    config: Any = None,
    calibration: Calibration | None = None,
    fisher: str | None = None,
    engine: EngineOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Quantize a checkpoint on disk into the packed folder ``output`` without loading the whole model.

    Weights stay in the source's safetensors shards (in their stored dtype) and come in one block at a
    time (:class:`~sqllm.engine.stream.StreamedModel`); each finished block's packed shard is written
    at once into the work folder beside ``output`` (``.<name>.work``), which also records what a killed
    run needs to go on: ``resume=True`` continues from the first unfinished block and produces the same
    files, byte for byte, as an uninterrupted run. Under ``torchrun`` the calibration windows are split
    across the ranks and the statistics all-reduced; rank 0 writes.

    calibration: the calibration draw; needed by every method but RTN (and SqueezeLLM given ``fisher``,
                 a file from ``sqllm sensitivity``)
    Returns the summary (bits per weight, ``stages``: wall seconds per stage, ``peak_rss_mib``).
    """
    import resource

    from .engine import distributed as dist
    from .engine.loop import fisher_resident
    from .engine.resume import WorkState, work_folder_for
    from .engine.stream import StreamedModel, check_device

    start = time.perf_counter()
    spec = get_method(method)
    cfg = _resolve_config(spec, config, options)
    calib = calibration.source if calibration is not None else None
    engine = engine or EngineOptions(seed=calibration.seed if calibration else 0, progress=progress)
    device = check_device(engine.device)
    out = check_output(output, overwrite, inputs=[model, calib, fisher])
    check_calibration_given(method, calib, fisher)
    dist.init_from_env(device)
    if resume and dist.active():
        raise InvalidConfig("--resume runs in one process; rerun without torchrun to continue the work folder")
    path = Path(resolve_model_path(model))
    if is_packed_checkpoint(path):
        raise InvalidConfig(f"{model!r} is already a packed sqllm checkpoint; quantize its full-precision source")
    parts = StreamedModel(path, device=device)
    check_config_against_model(cfg, parts.model)
    bad = parts.index.nonfinite()
    if bad is not None:
        raise NumericalError(f"weight {bad[0]!r} of the model holds {bad[1]} NaN or infinite values; "
                             f"the model is damaged and cannot be quantized")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    windows = None
    record: dict[str, Any] = {}
    if spec.needs_windows or (spec.fisher and fisher is None):
        assert calibration is not None
        windows = dist.shard_windows(calibration.windows(tokenizer))
        record = calibration.record()
    fisher_table: Callable[[list[str]], dict[str, Tensor]] | dict[str, Tensor] | None = None
    if spec.fisher and fisher is not None:
        from .engine.fisher import fisher_reader

        expected = {n: (parts.model.get_submodule(n).out_features, parts.model.get_submodule(n).in_features)
                    for n in linear_names(parts.model, parts.arch)}
        fisher_table = fisher_reader(fisher, expected)
        record["fisher_file"] = fisher

    settings = {
        "model": _model_fingerprint(path), "method": method, "config": config_to_dict(cfg),
        "calibration": record, "sqllm_version": __version__,
        "engine": {"batch_size": engine.batch_size, "input_rows": engine.input_rows, "seed": engine.seed,
                   "device": device.type, "fisher_amp": _amp_name(engine.fisher_amp),
                   "fisher_pass": "resident" if fisher_resident(parts, engine) else "streamed"},
    }
    work = WorkState(work_folder_for(out), settings, resume=resume) if dist.is_main() else None
    clock = StageClock()
    clock.seconds["prepare"] = time.perf_counter() - start  # skeleton, shard index, tokenizer, windows
    try:
        quantize_parts(parts, spec, cfg, sink=_block_shard_sink(parts, work), windows=windows,
                       fisher=fisher_table, opts=engine, work=work, clock=clock)
    except BaseException:
        if work is not None and not work.done:  # nothing finished: nothing worth keeping
            work.remove()
        raise
    summary: dict[str, Any] = {}
    if work is not None:
        with clock("write"):
            summary = _assemble_output(parts, tokenizer, work, out, spec.name, cfg, record)
        work.remove()
    summary["seconds"] = time.perf_counter() - start
    summary["stages"] = dict(clock.seconds)
    summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        summary["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    dist.finish()
    return summary


def _block_shard_sink(parts: Any, work: Any) -> Any:
    """The engine's sink: each finished block's packed tensors and its other tensors (norms, biases,
    read as stored) go to ``work.blocks_dir/block-<b>.safetensors``."""
    from .formats.shards import write_block_shard

    def sink(b: int, results: dict[str, QuantizedMatrix], block: nn.Module) -> None:
        quantized = {f"{n}.weight" for n in results}
        plain = parts.read([n for n in parts.names_under((parts.block_name(b),)) if n not in quantized])
        dtypes = {n: parts.stored_dtype(f"{n}.weight") for n in results}
        write_block_shard(work.blocks_dir / f"block-{b:05d}.safetensors", results, plain, dtypes)

    return sink


def _assemble_output(parts: Any, tokenizer: Any, work: Any, out: Path, method: str, cfg: Any,
                     calibration: dict[str, Any]) -> dict[str, Any]:
    """Turn the work folder's finished block shards into the packed folder ``out`` (written to a
    temporary sibling and put in place when complete); returns the summary."""
    import shutil

    from .formats.checkpoint import model_card
    from .formats.shards import assemble_packed, read_block_records, write_text

    blocks = [work.blocks_dir / f"block-{b:05d}.safetensors" for b in range(parts.n_blocks)]
    records = {k: v for f in blocks for k, v in read_block_records(f)[0].items()}
    summary = summarize(method, cfg, records, calibration, None)
    # A tied head is stored once, under the name the source stores it.
    first = parts.read([n for n in parts.trunk_names() if parts.source[n] == n])
    last = parts.read([n for n in parts.head_names() if parts.source[n] == n])
    config = json.loads((parts.folder / "config.json").read_text())

    def write(tmp: Path) -> None:
        written = assemble_packed(tmp, first, blocks, last, config, _quantization_config(summary))
        summary["dense16"] = written["quantization_config"]["dense16"]
        if (parts.folder / "generation_config.json").is_file():
            shutil.copyfile(parts.folder / "generation_config.json", tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        base = config.get("_name_or_path") or parts.folder.name
        write_text(tmp / "README.md", model_card(written["quantization_config"], base))
        write_text(tmp / "sqllm_summary.json", json.dumps(summary, indent=2))

    output.write_folder(out, write)
    summary["output"] = str(out)
    return summary


def written_by_sqllm(path: Path) -> bool:
    """Whether the folder ``path`` is a checkpoint sqllm wrote (the only folders ``overwrite`` replaces)."""
    return is_packed_checkpoint(path) or (path / "sqllm_summary.json").is_file()


def check_output(out_dir: str | os.PathLike, overwrite: bool, *, inputs: Sequence[object] = ()) -> Path:
    """The checkpoint folder to write, refused up front when it exists and ``overwrite`` is False, when it
    exists and sqllm did not write it, when it is the current folder, one of ``inputs`` or a parent of
    one, or when its parent cannot be written."""
    return output.check_folder_output(out_dir, overwrite, ours=written_by_sqllm, inputs=inputs)


def check_output_file(path: str | os.PathLike, *, overwrite: bool = True, inputs: Sequence[object] = ()) -> Path:
    """A report file to write (``--json``): refused up front when it is a folder, an input, or cannot be
    written; an existing file is replaced unless ``overwrite`` is False."""
    return output.check_file_output(path, overwrite, inputs=inputs)


def _checkpoint_summary(result: QuantizationResult) -> dict[str, Any]:
    """The summary stored in the folder: without the run time, so that the same seed gives the same bytes."""
    return {k: v for k, v in result.summary().items() if k != "seconds"}


def save_quantized(
    model: nn.Module, tokenizer: Any, result: QuantizationResult, out_dir: str | os.PathLike,
    *, overwrite: bool = False,
) -> Path:
    """Write the packed checkpoint (safetensors + ``quantization_config``) to ``out_dir``: complete or not
    at all, and an existing checkpoint stays in place until the new one is complete."""
    from .formats.checkpoint import write_packed

    out = check_output(out_dir, overwrite, inputs=[getattr(model.config, "_name_or_path", None)])

    def write(tmp: Path) -> None:
        written = write_packed(model, tokenizer, result.matrices, quantization_config(result), tmp)
        result.dense16 = written["dense16"]
        (tmp / "sqllm_summary.json").write_text(json.dumps(_checkpoint_summary(result), indent=2))

    output.write_folder(out, write)
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` (checked with :func:`check_output_file`), atomically."""
    out = check_output_file(path)

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")

    output.write_file(out, write)


def load_quantized(
    path: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Load a packed sqllm checkpoint as a transformers model with QuantLinear modules. ``dtype``
    (float32, bfloat16 or float16) is the dtype its activations, norms and biases take; the packed codes,
    tables and 16-bit matrices stay as stored. None keeps the dtype its norms were stored in."""
    from .nn.loader import load_packed

    return load_packed(str(path), device=device, dtype=dtype)


def evaluate_perplexity(
    model: nn.Module, tokenizer: Any, source: str, *, seqlen: int = 2048, windows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity (GPTQ protocol) of ``model`` on the evaluation text of ``source``."""
    from .eval.perplexity import perplexity

    check_seqlen(seqlen, model.config)
    res = perplexity(model, eval_tokens(tokenizer, source), seqlen=seqlen, windows=windows, progress=progress)
    res["source"] = str(source)
    return res


def evaluate_perplexity_streamed(
    spec: str, source: str, *, seqlen: int = 2048, windows: int | None = None, device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a full-precision checkpoint on disk, one block in memory at a time (float32)."""
    from transformers import AutoTokenizer

    from .engine.stream import StreamedModel, check_device
    from .eval.perplexity import streamed_perplexity

    path = resolve_model_path(spec)
    parts = StreamedModel(path, device=check_device(device))
    tokens = eval_tokens(AutoTokenizer.from_pretrained(path, trust_remote_code=False), source)
    res = streamed_perplexity(parts, tokens, seqlen=seqlen, windows=windows, progress=progress)
    res["source"] = str(source)
    return res


def is_full_precision_folder(spec: str) -> bool:
    """Whether ``spec`` resolves to a model folder of safetensors weights that is not a packed checkpoint."""
    path = Path(resolve_model_path(spec))
    return path.is_dir() and not is_packed_checkpoint(path) and any(path.glob("*.safetensors"))


def check_zeroshot_tasks(tasks: Sequence[str], *, include_path: str | None = None,
                         limit: int | None = None) -> tuple[list[str], Any]:
    """Checked task names and an lm-eval TaskManager that knows them; raises before any model is loaded."""
    from .eval.zeroshot import check_tasks

    return check_tasks(tasks, include_path=include_path, limit=limit)


def evaluate_zeroshot(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], *, include_path: str | None = None,
    limit: int | None = None, checked: tuple[list[str], Any] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy through lm-evaluation-harness (``checked``: from :func:`check_zeroshot_tasks`)."""
    from .eval.zeroshot import run_zeroshot

    return run_zeroshot(model, tokenizer, tasks, include_path=include_path, limit=limit, checked=checked)


def compute_sensitivity(
    model: nn.Module, tokenizer: Any, calib: str, *, nsamples: int = 100, calib_seqlen: int = 512, seed: int = 0,
    grad_checkpointing: bool = False, amp: torch.dtype | None = None, progress: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher ``{linear name: [out, in] float32}`` of every targeted linear (SqueezeLLM §3.2).

    Under ``torchrun`` each rank computes its share of the windows and the sums are all-reduced, so
    every rank returns the Fisher of all windows."""
    from .engine import distributed as dist
    from .engine.fisher import compute_fisher

    dist.init_from_env(next(model.parameters()).device)
    windows = dist.shard_windows(calibration_windows(tokenizer, calib, nsamples, calib_seqlen, seed))
    return compute_fisher(model, linear_names(model), windows, grad_checkpointing=grad_checkpointing, amp=amp,
                          progress=progress)


def _is_fisher_file(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    from .engine.fisher import FISHER_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FISHER_FORMAT
    except (SafetensorError, OSError, RuntimeError):
        return False


def check_sensitivity_output(path: str | os.PathLike, overwrite: bool, *, inputs: Sequence[object] = ()) -> Path:
    """The Fisher file to write, refused up front when it exists without ``overwrite``, exists and is not
    a Fisher file, is a folder or an input, or cannot be written."""
    return output.check_file_output(path, overwrite, ours=_is_fisher_file, inputs=inputs)


def save_sensitivity(
    path: str | os.PathLike, fisher: dict[str, Tensor], meta: dict[str, Any], *, overwrite: bool = False,
) -> Path | None:
    """Write a Fisher file that ``quantize(..., fisher=path)`` and ``--sensitivity-file`` read back
    (to a temporary file first, renamed into place when complete). Only rank 0 of a data-parallel run
    writes; the other ranks return None."""
    from .engine import distributed as dist
    from .engine.fisher import save_fisher

    out = None
    if dist.is_main():
        out = check_sensitivity_output(path, overwrite)
        output.write_file(out, lambda tmp: save_fisher(tmp, fisher, meta))
    dist.finish()
    return out


def fisher_dtype(name: str, device: str) -> torch.dtype | None:
    """The Fisher pass's autocast dtype for ``--fisher-dtype`` (None: float32, no autocast); ``auto`` is
    bfloat16 where ``device`` multiplies it natively, else float32."""
    from .engine.refine import fast_train_dtype
    from .engine.stream import check_device

    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise InvalidConfig(f"fisher dtype {name!r} is not one of auto, float32, bfloat16")
    return None if fast_train_dtype(check_device(device)) == torch.float32 else torch.bfloat16


def bench(path: str, *, baseline: str | None = None, prefill: int = 512, decode: int = 32) -> dict[str, Any]:
    """Size, bits per weight, peak memory and prefill/decode speed of ``path`` (and of ``baseline``)."""
    from .eval.bench import bench_checkpoint

    return bench_checkpoint(load_model, path, baseline=baseline, prefill=prefill, decode=decode)


def check_generate_options(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """Refuse generation settings that would fail (or silently mean something else) once the model runs."""
    if not prompt:
        raise InvalidConfig("the prompt is empty; pass some text with --prompt")
    if max_new_tokens < 1:
        raise InvalidConfig(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not (0 <= temperature < math.inf):
        raise InvalidConfig(f"temperature={temperature} must be a finite number >= 0 (0 means greedy)")


def generate(
    model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
    seed: int = 0,
) -> Iterator[str]:
    """Yield the generated text piece by piece (greedy when ``temperature`` is 0).

    Generation runs in a daemon thread that feeds a streamer; the streamer is polled, so that a thread
    that died ends the iteration at once, and its exception is raised here.
    """
    from queue import Empty
    from threading import Thread

    from transformers import TextIteratorStreamer

    check_generate_options(prompt, max_new_tokens, temperature)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    if ids["input_ids"].numel() == 0:
        raise InvalidConfig(f"the prompt {prompt!r} has no tokens; pass some text with --prompt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.2)
    kwargs = dict(
        **ids, max_new_tokens=max_new_tokens, streamer=streamer, do_sample=temperature > 0,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if temperature > 0:
        kwargs["temperature"] = temperature
    failure: list[BaseException] = []

    def run() -> None:
        try:
            cast(Any, model).generate(**kwargs)  # a transformers model; nn.Module does not declare it
        except BaseException as exc:  # handed to the consuming thread, which raises it
            failure.append(exc)

    thread = Thread(target=run, daemon=True)
    thread.start()
    while True:
        try:
            piece = next(streamer)
        except StopIteration:
            break
        except Empty:
            if thread.is_alive():
                continue
            break
        yield piece
    thread.join()
    if failure:
        raise failure[0]
