"""``sqllm`` command line: a thin layer over :mod:`sqllm.api`.

Every :class:`~sqllm.errors.SqllmError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import SqllmError
from .methods import METHODS


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write a packed checkpoint")
    p.add_argument("model", help="model folder, .gguf file, hub id or alias (smollm2-135m)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, help="columns per group (-1 or omitted: per output channel)")
    p.add_argument("--output", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", help="calibration text: wikitext2, c4, ptb or a local .txt/.raw/.tokens/.jsonl")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    s = p.add_argument_group("squeezellm")
    s.add_argument("--sensitive", type=float, help="percent of most Fisher-sensitive weights kept exact")
    s.add_argument("--outliers", type=float, help="percent of largest-magnitude weights kept exact")
    s.add_argument("--outlier-range", type=float, help="outlier threshold factor r of the IQR rule")
    s.add_argument("--sensitivity-file", help="Fisher file from `sqllm sensitivity` (skips the gradient pass)")
    q = p.add_argument_group("gptq / slim")
    q.add_argument("--percdamp", type=float)
    q.add_argument("--act-order", action="store_true", default=None)
    q.add_argument("--static-groups", action="store_true", default=None)
    q.add_argument("--no-true-sequential", dest="true_sequential", action="store_false", default=None)
    q.add_argument("--salience", choices=["cholesky", "inverse"])
    q.add_argument("--lwc-epochs", type=int, help="slim+: clipping training epochs per block")
    q.add_argument("--lwc-lr", type=float, help="slim+: clipping learning rate")
    q.add_argument("--lwc-samples", type=int, help="slim+: calibration windows used for clipping training")
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
    p.add_argument("--calib", required=True)
    p.add_argument("--nsamples", type=int, default=100)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--output", required=True, help="safetensors file to write")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqllm", description="Squeeze LLMs to 2-4 bits per weight (SqueezeLLM, SliM-LLM, GPTQ, RTN) and run them."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantize, _add_eval, _add_sensitivity, _add_generate, _add_bench):
        add(sub)
    return parser


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _cmd_quantize(a: argparse.Namespace) -> None:
    from . import api
    from .engine.loop import EngineOptions
    from .report import print_summary

    # Fail on a bad config or an existing output before the slow load.
    options = dict(
        bits=a.bits, group_size=a.group_size, sensitive_pct=a.sensitive, outlier_pct=a.outliers,
        outlier_range=a.outlier_range, percdamp=a.percdamp, act_order=a.act_order,
        static_groups=a.static_groups, true_sequential=a.true_sequential, salience=a.salience,
        lwc_epochs=a.lwc_epochs, lwc_lr=a.lwc_lr, lwc_samples=a.lwc_samples,
    )
    if options["group_size"] == -1:
        options["group_size"] = None
    options = {k: v for k, v in options.items() if v is not None}
    api.make_config(a.method, **options)
    api.check_calibration_given(a.method, a.calib, a.sensitivity_file)
    if Path(a.output).exists() and not a.overwrite:
        from .errors import OutputExists

        raise OutputExists(f"output folder {a.output!r} exists; pass --overwrite to replace it")
    model, tok = api.load_model(a.model)
    engine = EngineOptions(batch_size=a.batch_size, seed=a.seed)
    result = api.quantize(
        model, tok, a.method, calib=a.calib, nsamples=a.nsamples, calib_seqlen=a.calib_seqlen, seed=a.seed,
        fisher=a.sensitivity_file, engine=engine, **options,
    )
    out = api.save_quantized(model, tok, result, a.output, overwrite=a.overwrite)
    summary = result.summary()
    summary["output"] = str(out)
    print_summary(summary)
    _write_json(a.json, summary)


def _cmd_eval(a: argparse.Namespace) -> None:
    from . import api
    from .errors import InvalidConfig
    from .report import print_table

    if not a.ppl and not a.tasks:
        raise InvalidConfig("nothing to evaluate: pass --ppl SOURCE and/or --tasks T1,T2")
    checked = None
    if a.tasks:  # unknown tasks fail in seconds, not after loading the models
        from .eval.zeroshot import check_tasks

        checked = check_tasks(a.tasks.split(","), include_path=a.include_path, limit=a.limit)
    specs = [a.model] + ([a.baseline] if a.baseline else [])
    results: dict[str, Any] = {"model": a.model, "runs": []}
    for spec in specs:
        model, tok = api.load_model(spec)
        run: dict[str, Any] = {"model": spec}
        if a.ppl:
            run.update(api.evaluate_perplexity(model, tok, a.ppl, seqlen=a.seqlen, windows=a.windows))
        if a.tasks:
            from .eval.zeroshot import run_zeroshot

            run["zeroshot"] = run_zeroshot(model, tok, a.tasks.split(","), include_path=a.include_path,
                                           limit=a.limit, checked=checked)
        results["runs"].append(run)
        del model
    if a.ppl:
        print_table(
            ["model", "source", "windows", "seqlen", "perplexity"],
            [[r["model"], a.ppl, r["windows"], r["seqlen"], f"{r['perplexity']:.3f}"] for r in results["runs"]],
        )
    if a.tasks:
        from .eval.zeroshot import print_zeroshot

        for r in results["runs"]:
            print_zeroshot(r["model"], r["zeroshot"])
    results.update({k: v for k, v in results["runs"][0].items() if k != "model"})
    _write_json(a.json, results)


def _cmd_sensitivity(a: argparse.Namespace) -> None:
    from .data import calibration_windows
    from .engine.fisher import compute_fisher, save_fisher
    from .models import linear_names, load_model

    model, tok = load_model(a.model)
    windows = calibration_windows(tok, a.calib, a.nsamples, a.calib_seqlen, a.seed)
    fisher = compute_fisher(model, linear_names(model), windows, grad_checkpointing=a.gradient_checkpointing)
    meta = {"model": a.model, "calib": a.calib, "nsamples": a.nsamples, "seqlen": a.calib_seqlen, "seed": a.seed}
    save_fisher(a.output, fisher, meta)
    print(f"wrote Fisher sensitivity of {len(fisher)} linears to {a.output}")


def _cmd_generate(a: argparse.Namespace) -> None:
    from . import api

    model, tok = api.load_model(a.model)
    for piece in api.generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              seed=a.seed):
        print(piece, end="", flush=True)
    print()


def _cmd_bench(a: argparse.Namespace) -> None:
    from .eval.bench import bench_checkpoint, print_bench

    res = bench_checkpoint(a.model, baseline=a.baseline, prefill=a.prefill, decode=a.decode)
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
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
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
