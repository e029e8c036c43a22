"""``sqllm`` command line: a thin layer over :mod:`sqllm.api`.

Every :class:`~sqllm.errors.SqllmError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from types import UnionType
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

from . import api
from .errors import InvalidConfig, SqllmError


def _group_size(text: str) -> int | None:
    """``--group-size``: a positive column count, or ``channel`` for one group per output channel."""
    if text == "channel":
        return None
    try:
        return int(text)  # the config range-checks it, naming the allowed values
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a column count nor 'channel'") from None


def _option_spec(name: str, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for a config field of type ``hint``."""
    if name == "group_size":
        return {"type": _group_size, "metavar": "G|channel"}
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args)}
    if origin is tuple:
        return {"type": args[0], "nargs": len(args), "metavar": ("LO", "HI") if len(args) == 2 else None}
    if origin in (Union, UnionType):  # ``X | None``: the X
        hint = next(a for a in args if a is not type(None))
    return {"type": hint, "metavar": name.upper()}


def method_options() -> dict[str, dict[str, Any]]:
    """Every CLI-visible config field of every registered method: field name -> its argparse flag and
    keyword arguments, and the methods that take it. A field shared by several methods is one flag."""
    options: dict[str, dict[str, Any]] = {}
    for method, spec in api.METHODS.items():
        hints = get_type_hints(spec.config_cls)
        for f in fields(spec.config_cls):
            if not f.metadata.get("cli", False):
                continue
            opt = options.setdefault(f.name, {
                "flag": f.metadata.get("flag") or "--" + f.name.replace("_", "-"),
                "kwargs": {**_option_spec(f.name, hints[f.name]), "help": f.metadata["help"]},
                "methods": [],
            })
            opt["methods"].append(method)
            opt.setdefault("defaults", {})[method] = f.default
    for opt in options.values():
        defaults = opt.pop("defaults")
        if len(set(map(repr, defaults.values()))) > 1:  # one flag, several methods' defaults: name each
            opt["kwargs"]["help"] += " (default: " + ", ".join(f"{m} {d}" for m, d in defaults.items()) + ")"
    return options


def _add_calibration(p: argparse._ActionsContainer, *, required: bool, nsamples: int, seqlen: int) -> None:
    """The calibration and Fisher-pass flags, shared by ``quantize`` and ``sensitivity`` (which differ in
    defaults)."""
    p.add_argument("--calib", required=required,
                   help="calibration text: wikitext2, c4, ptb or a local .txt/.raw/.tokens/.jsonl")
    p.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
    p.add_argument("--calib-seqlen", type=int, default=seqlen,
                   help=f"tokens per calibration window (default {seqlen})")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--fisher-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="precision of the Fisher pass's forward and backward (squares and sums stay float32); "
                        "auto: bfloat16 where the device multiplies it natively (AMX, AVX512-BF16, CUDA), "
                        "else float32")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write a packed checkpoint")
    p.add_argument("model", help="model folder, .gguf file, hub id or alias (smollm2-135m)")
    p.add_argument("--method", required=True, choices=list(api.METHODS),
                   help="; ".join(f"{m}: {s.summary}" for m, s in api.METHODS.items()))
    p.add_argument("--output", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g = p.add_argument_group("calibration")
    _add_calibration(g, required=False, nsamples=128, seqlen=2048)
    g.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    g.add_argument("--sensitivity-file", help="Fisher file from `sqllm sensitivity` (skips the gradient pass)")
    r = p.add_argument_group("large models")
    r.add_argument("--device", default="cpu", help="where each block is computed: cpu (default), cuda or cuda:N; "
                                                   "weights rest on disk either way")
    r.add_argument("--resume", action="store_true",
                   help="continue the unfinished run recorded in the work folder beside --output")
    m = p.add_argument_group("method options (each applies to the methods named in brackets)")
    for name, opt in method_options().items():
        kwargs = dict(opt["kwargs"])
        kwargs["help"] = f"{kwargs['help']} [{', '.join(opt['methods'])}]"
        required = name == "bits"
        m.add_argument(opt["flag"], dest=f"opt_{name}", default=None, required=required, **kwargs)
    p.add_argument("--json", help="write the quantization summary here")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of a model or packed checkpoint")
    p.add_argument("model")
    p.add_argument("--ppl", help="text source for perplexity: wikitext2, c4, ptb or a local file")
    p.add_argument("--baseline", help="also evaluate this model (e.g. the full-precision one) for comparison")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, help="evaluate the first N windows only")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (zero-shot)")
    p.add_argument("--include-path", help="folder of lm-eval task YAMLs (local data)")
    p.add_argument("--limit", type=int, help="items per task")
    p.add_argument("--json", help="write results here")


def _add_sensitivity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="compute Fisher sensitivity (squared gradients) and save it")
    p.add_argument("model")
    _add_calibration(p, required=True, nsamples=100, seqlen=512)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--output", required=True, help="safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Fisher file")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream text from a model or packed checkpoint")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="size, bits per weight, memory and speed of a checkpoint")
    p.add_argument("model")
    p.add_argument("--baseline", help="full-precision model to compare with")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    p.add_argument("--decode", type=int, default=32, help="tokens generated for the decode measurement")
    p.add_argument("--json", help="write results here")


class _Parser(argparse.ArgumentParser):
    """Usage errors become one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise InvalidConfig(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sqllm", description="Squeeze LLMs to 2-4 bits per weight (SqueezeLLM, SliM-LLM, GPTQ, RTN) and run them."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantize, _add_eval, _add_sensitivity, _add_generate, _add_bench):
        add(sub)
    return parser


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        api.write_json(path, obj)


def _cmd_quantize(a: argparse.Namespace) -> None:
    from .report import print_stages, print_summary

    options = {k.removeprefix("opt_"): tuple(v) if isinstance(v, list) else v
               for k, v in vars(a).items() if k.startswith("opt_") and v is not None}
    # Everything that can be refused is refused before the slow part.
    cfg = api.make_config(a.method, **options)
    api.check_calibration_given(a.method, a.calib, a.sensitivity_file)
    engine = api.EngineOptions(batch_size=a.batch_size, seed=a.seed, device=a.device,
                               fisher_amp=api.fisher_dtype(a.fisher_dtype, a.device))
    path = api.check_model(a.model, full_precision=True)
    if a.calib is not None:
        api.check_calibration_counts(a.nsamples, a.calib_seqlen)
        api.check_text_source(a.calib)
        api.check_context(path, a.calib_seqlen)
    inputs = [a.model, path, a.calib, a.sensitivity_file]
    api.check_output(a.output, a.overwrite, inputs=inputs)
    if a.json:
        api.check_output_file(a.json, inputs=inputs)
    calibration = api.Calibration(a.calib, a.nsamples, a.calib_seqlen, a.seed) if a.calib is not None else None
    summary = api.quantize_checkpoint(
        path, a.output, a.method, config=cfg, calibration=calibration, fisher=a.sensitivity_file, engine=engine,
        resume=a.resume, overwrite=a.overwrite,
    )
    if "output" in summary:  # rank 0 of a data-parallel run, or the only process
        print_summary(summary)
        print_stages(summary)
        _write_json(a.json, summary)


def _cmd_eval(a: argparse.Namespace) -> None:
    from .report import print_table, print_zeroshot

    if not a.ppl and not a.tasks:
        raise InvalidConfig("nothing to evaluate: pass --ppl SOURCE and/or --tasks T1,T2")
    checked = None
    if a.tasks:  # unknown tasks fail in seconds, before anything about the models
        checked = api.check_zeroshot_tasks(a.tasks.split(","), include_path=a.include_path, limit=a.limit)
    specs = [a.model] + ([a.baseline] if a.baseline else [])
    paths = [api.check_model(spec) for spec in specs]
    if a.ppl:
        api.check_text_source(a.ppl)
        for path in paths:
            api.check_context(path, a.seqlen)
    if a.json:
        api.check_output_file(a.json, inputs=[*paths, a.ppl])
    results: dict[str, Any] = {"model": a.model, "runs": []}
    for spec, path in zip(specs, paths):
        run: dict[str, Any] = {"model": spec}
        if not a.tasks and api.is_full_precision_folder(path):
            # Perplexity alone of a full-precision model: its weights stay on disk, one block in memory.
            run.update(api.evaluate_perplexity_streamed(path, a.ppl, seqlen=a.seqlen, windows=a.windows))
            results["runs"].append(run)
            continue
        model, tok = api.load_model(path)
        if a.ppl:
            run.update(api.evaluate_perplexity(model, tok, a.ppl, seqlen=a.seqlen, windows=a.windows))
        if a.tasks:
            run["zeroshot"] = api.evaluate_zeroshot(model, tok, a.tasks.split(","), include_path=a.include_path,
                                                    limit=a.limit, checked=checked)
        results["runs"].append(run)
        del model
    if a.ppl:
        print_table(
            ["model", "source", "windows", "seqlen", "perplexity"],
            [[r["model"], a.ppl, r["windows"], r["seqlen"], f"{r['perplexity']:.3f}"] for r in results["runs"]],
        )
    if a.tasks:
        for r in results["runs"]:
            print_zeroshot(r["model"], r["zeroshot"])
    results.update({k: v for k, v in results["runs"][0].items() if k != "model"})
    _write_json(a.json, results)


def _cmd_sensitivity(a: argparse.Namespace) -> None:
    path = api.check_model(a.model, full_precision=True)
    api.check_calibration_counts(a.nsamples, a.calib_seqlen)
    api.check_text_source(a.calib)
    api.check_context(path, a.calib_seqlen)
    out = api.check_sensitivity_output(a.output, a.overwrite, inputs=[a.model, path, a.calib])
    model, tok = api.load_model(path, packed=False)
    amp = api.fisher_dtype(a.fisher_dtype, "cpu")
    fisher = api.compute_sensitivity(model, tok, a.calib, nsamples=a.nsamples, calib_seqlen=a.calib_seqlen,
                                     seed=a.seed, grad_checkpointing=a.gradient_checkpointing, amp=amp)
    # what the pass computed in, besides what was asked: "auto" depends on the machine that ran it
    meta = {"model": a.model, "calib": a.calib, "nsamples": a.nsamples, "seqlen": a.calib_seqlen, "seed": a.seed,
            "fisher_dtype": a.fisher_dtype, "autocast": "none" if amp is None else str(amp).removeprefix("torch.")}
    if api.save_sensitivity(out, fisher, meta, overwrite=a.overwrite):
        print(f"wrote Fisher sensitivity of {len(fisher)} linears to {a.output}")


def _cmd_generate(a: argparse.Namespace) -> None:
    api.check_generate_options(a.prompt, a.max_new_tokens, a.temperature)
    model, tok = api.load_model(api.check_model(a.model))
    for piece in api.generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              seed=a.seed):
        print(piece, end="", flush=True)
    print()


def _cmd_bench(a: argparse.Namespace) -> None:
    from .report import print_bench

    specs = [a.model] + ([a.baseline] if a.baseline else [])
    paths = [api.check_model(spec) for spec in specs]
    for path in paths:
        api.check_context(path, a.prefill + a.decode)
    if a.json:
        api.check_output_file(a.json, inputs=paths)
    res = api.bench(a.model, baseline=a.baseline, prefill=a.prefill, decode=a.decode)
    print_bench(res)
    _write_json(a.json, res)


COMMANDS = {
    "quantize": _cmd_quantize,
    "eval": _cmd_eval,
    "sensitivity": _cmd_sensitivity,
    "generate": _cmd_generate,
    "bench": _cmd_bench,
}


def _quiet_transformers() -> None:
    """Our own bars report progress; transformers' per-load bars would bury the one-line errors."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_transformers()
        COMMANDS[args.command](args)
    except SqllmError as exc:
        print(f"sqllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sqllm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
