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
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import __version__
from .codes import QuantizedMatrix
from .config import CONFIG_VERSION, config_to_dict
from .data import calibration_windows, eval_tokens
from .engine.loop import EngineOptions, quantize_blocks
from .errors import InvalidConfig, OutputExists
from .formats.checkpoint import is_packed_checkpoint
from .methods import METHODS, MethodSpec, get_method
from .models import arch_spec, linear_names, resolve_model_path

__all__ = [
    "METHODS",
    "EngineOptions",
    "QuantizationResult",
    "load_model",
    "make_config",
    "quantize",
    "save_quantized",
    "load_quantized",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "compute_sensitivity",
    "save_sensitivity",
    "bench",
    "generate",
]


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a model folder, ``.gguf`` file, alias or hub id, in eval mode; a packed
    sqllm checkpoint folder loads with QuantLinear modules (``dtype`` applies to full-precision models)."""
    from . import models

    path = resolve_model_path(spec)
    if is_packed_checkpoint(path):
        return load_quantized(path, device=device)
    return models.load_model(path, dtype=dtype, device=device)


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
        parts: dict[str, int] = {}
        n_weights = 0
        for qm in self.matrices.values():
            out, n_in = qm.shape
            n_weights += out * n_in
            for k, v in qm.storage_bits().items():
                parts[k] = parts.get(k, 0) + v
        s: dict[str, Any] = {
            "method": self.method,
            "config": config_to_dict(self.config),
            "linears": len(self.matrices),
            "weights": n_weights,
            "bits_per_weight": {k: v / n_weights for k, v in parts.items()} if n_weights else {},
            "seconds": self.seconds,
            "calibration": self.calibration,
        }
        if n_weights:
            s["bits_per_weight"]["total"] = sum(parts.values()) / n_weights
        if self.dense16 is not None:
            s["dense16"] = self.dense16
        sparse = [qm.sparse.nnz for qm in self.matrices.values() if qm.sparse is not None]
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
    spec = get_method(method)
    cfg = _resolve_config(spec, config, options)
    arch = arch_spec(model)
    check_config_against_model(cfg, model)
    engine = engine or EngineOptions(seed=seed, progress=progress)
    names = linear_names(model, arch)

    start = time.perf_counter()
    windows = None
    calibration: dict[str, Any] = {}
    needs_windows = spec.needs_windows or (spec.fisher and not isinstance(fisher, (dict, str)))
    check_calibration_given(method, calib, fisher)
    if needs_windows:
        assert calib is not None
        windows = calibration_windows(tokenizer, calib, nsamples, calib_seqlen, seed)
        calibration = {"source": str(calib), "nsamples": nsamples, "seqlen": calib_seqlen, "seed": seed}

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
    from .formats.checkpoint import FORMAT_VERSION

    summary = result.summary()
    return {
        "quant_method": "sqllm",
        "format_version": FORMAT_VERSION,
        "config_version": CONFIG_VERSION,
        "sqllm_version": __version__,
        "method": result.method,
        "config": summary["config"],
        "bits": summary["config"].get("bits"),
        "group_size": summary["config"].get("group_size"),
        "bits_per_weight": summary["bits_per_weight"],
        "sparse_pct": summary.get("sparse_pct", 0.0),
        "calibration": result.calibration,
    }


def check_output(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder as a Path, refused up front when it exists and ``overwrite`` is False."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExists(f"output folder {str(out)!r} exists; pass --overwrite to replace it")
    return out


def _prepare_output(out_dir: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    """Check the output folder and make a temporary sibling to write into (renamed into place at the end)."""
    out = check_output(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed checkpoint should read like any model folder
    return out, tmp


def _commit_output(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_quantized(
    model: nn.Module, tokenizer: Any, result: QuantizationResult, out_dir: str | os.PathLike,
    *, overwrite: bool = False,
) -> Path:
    """Write the packed checkpoint (safetensors + ``quantization_config``) atomically to ``out_dir``."""
    from .formats.checkpoint import write_packed

    out, tmp = _prepare_output(out_dir, overwrite)
    try:
        written = write_packed(model, tokenizer, result.matrices, quantization_config(result), tmp)
        result.dense16 = written["dense16"]
        (tmp / "sqllm_summary.json").write_text(json.dumps(result.summary(), indent=2))
        _commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_quantized(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a packed sqllm checkpoint as a transformers model with QuantLinear modules."""
    from .nn.loader import load_packed

    return load_packed(str(path), device=device)


def evaluate_perplexity(
    model: nn.Module, tokenizer: Any, source: str, *, seqlen: int = 2048, windows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity (GPTQ protocol) of ``model`` on the evaluation text of ``source``."""
    from .eval.perplexity import perplexity

    res = perplexity(model, eval_tokens(tokenizer, source), seqlen=seqlen, windows=windows, progress=progress)
    res["source"] = str(source)
    return res


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
    grad_checkpointing: bool = False, progress: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher ``{linear name: [out, in] float32}`` of every targeted linear (SqueezeLLM §3.2)."""
    from .engine.fisher import compute_fisher

    windows = calibration_windows(tokenizer, calib, nsamples, calib_seqlen, seed)
    return compute_fisher(model, linear_names(model), windows, grad_checkpointing=grad_checkpointing,
                          progress=progress)


def save_sensitivity(path: str | os.PathLike, fisher: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write a Fisher file that ``quantize(..., fisher=path)`` and ``--sensitivity-file`` read back."""
    from .engine.fisher import save_fisher

    save_fisher(path, fisher, meta)


def bench(path: str, *, baseline: str | None = None, prefill: int = 512, decode: int = 32) -> dict[str, Any]:
    """Size, bits per weight, peak memory and prefill/decode speed of ``path`` (and of ``baseline``)."""
    from .eval.bench import bench_checkpoint

    return bench_checkpoint(load_model, path, baseline=baseline, prefill=prefill, decode=decode)


def generate(
    model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
    seed: int = 0,
) -> Iterator[str]:
    """Yield the generated text piece by piece (greedy when ``temperature`` is 0)."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **ids, max_new_tokens=max_new_tokens, streamer=streamer, do_sample=temperature > 0,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if temperature > 0:
        kwargs["temperature"] = temperature
    thread = Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    yield from streamer
    thread.join()
