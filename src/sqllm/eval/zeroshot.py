"""Zero-shot accuracy through lm-evaluation-harness (Gao et al., "A framework for few-shot language model
evaluation"), the protocol of the SqueezeLLM and SliM-LLM zero-shot tables.

The in-memory model (full precision, quantized in place, or loaded from a packed checkpoint) is wrapped
in lm-eval's ``HFLM`` as is, so what is evaluated is exactly what sqllm built. Tasks are lm-eval names
(``arc_easy``, ``piqa``, ...) or local YAML tasks in a folder given as ``include_path``
(``tests/data/zeroshot`` ships ``sqllm_tiny_mc``, which needs no network; its YAML builds its dataset with
``custom_dataset``, which lm-eval reads since 0.4.9).

    res = run_zeroshot(model, tok, ["sqllm_tiny_mc"], include_path="tests/data/zeroshot")
    res["tasks"]["sqllm_tiny_mc"]["acc"]
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..errors import DataUnavailable, InvalidConfig

# The numbers reported per task, when the task defines them (lm-eval keys them as "metric,filter").
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
INSTALL_HINT = 'pip install "lm-eval>=0.4" (or pip install "sqllm[eval]")'


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """(lm_eval, HFLM, TaskManager), or DataUnavailable with the pip command."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataUnavailable(f"zero-shot evaluation needs lm-evaluation-harness ({exc}); {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


@contextmanager
def _quiet(logger: str = "lm_eval") -> Iterator[None]:
    """Keep lm-eval's warnings about being handed a model object (expected here) off the console."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _unknown(task_manager: Any, tasks: Sequence[str]) -> list[str]:
    known = set(task_manager.all_tasks)
    return [t for t in tasks if t not in known]


@functools.cache
def _full_task_manager(task_manager_cls: Any, include_path: str | None) -> Any:
    """The built-in tasks (plus ``include_path``) indexed once per process: indexing takes seconds."""
    return task_manager_cls(include_path=include_path)


def task_manager_for(task_manager_cls: Any, tasks: Sequence[str], include_path: str | None) -> Any:
    """A TaskManager that knows every name in ``tasks``, or InvalidConfig naming the unknown ones.

    lm-eval indexes its ~15k built-in task YAMLs in seconds, so a folder given as ``include_path`` is
    indexed alone first and the built-ins only when some task is not found there.
    """
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise InvalidConfig(f"include path {include_path!r} is not a folder; pass the folder of the task YAMLs")
        local = task_manager_cls(include_path=include_path, include_defaults=False)
        if not _unknown(local, tasks):
            return local
    manager = _full_task_manager(task_manager_cls, include_path)
    unknown = _unknown(manager, tasks)
    if unknown:
        where = f"lm-eval {version('lm_eval')}'s built-in tasks" + (f" or {include_path}" if include_path else "")
        raise InvalidConfig(
            f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}: not among {where}; "
            f"for a local task pass --include-path with the folder of its YAML"
        )
    return manager


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task (and group) of an lm-eval result, the :data:`METRICS` it has under the default filter
    ("acc,none" -> "acc"), plus ``samples``, the number of documents evaluated."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        row: dict[str, float] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            # lm-eval writes "N/A" for stderrs it could not compute: "where present" means numbers only.
            if metric in METRICS and filt == "none" and isinstance(value, (int, float)):
                row[metric] = float(value)
        if row:
            samples = results.get("n-samples", {}).get(task, {}).get("effective")
            if samples is not None:
                row["samples"] = int(samples)
            out[task] = row
    return out


def _evaluate_task(lm_eval: Any, lm: Any, task: str, manager: Any, limit: int | None) -> dict[str, Any]:
    """One task through ``simple_evaluate``; a dataset that cannot be fetched becomes DataUnavailable.

    Tasks run one call each so that a failure names its task: lm-eval loads every dataset before
    evaluating, and its errors name the dataset, not the task.
    """
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, num_fewshot=0, limit=limit, log_samples=False,
        )
    except OSError as exc:  # ConnectionError, the hub's offline and not-found errors, missing local files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataUnavailable(
            f"data of zero-shot task {task!r} cannot be loaded ({type(exc).__name__}: {first}); run where "
            f"the dataset is reachable or cached, or use a local task with --include-path"
        ) from None


def check_tasks(tasks: Sequence[str], *, include_path: str | None = None,
                limit: int | None = None) -> tuple[list[str], Any]:
    """The cleaned task names and a TaskManager that knows them all; raises before any model is loaded.

    Raises DataUnavailable (lm-eval missing) or InvalidConfig (no task, an unknown task, a bad limit).
    """
    _, _, task_manager_cls = _import_lm_eval()
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise InvalidConfig("no zero-shot task given; pass --tasks T1,T2")
    if limit is not None and limit < 1:
        raise InvalidConfig(f"limit={limit} must be >= 1 (or omitted for every document)")
    with _quiet():
        return names, task_manager_for(task_manager_cls, names, include_path)


def run_zeroshot(
    model: Any, tokenizer: Any, tasks: Sequence[str], *, include_path: str | None = None, limit: int | None = None,
    batch_size: int = 8, checked: tuple[list[str], Any] | None = None,
) -> dict[str, Any]:
    """Zero-shot lm-eval accuracy of an in-memory causal LM on ``tasks``.

    include_path: folder of extra task YAMLs (local data); limit: first N documents per task (None: all)
    checked: what :func:`check_tasks` returned for these arguments, so that a caller evaluating several
    models indexes the tasks once
    Returns ``{"tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}},
    "limit": limit, "num_fewshot": 0, "lm_eval_version": ...}`` with the metrics each task defines.
    Raises DataUnavailable (lm-eval missing, a task's data unreachable) or InvalidConfig (unknown task).
    """
    lm_eval, hflm_cls, _ = _import_lm_eval()
    names, manager = checked or check_tasks(tasks, include_path=include_path, limit=limit)
    with _quiet():
        lm = hflm_cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        per_task: dict[str, dict[str, float]] = {}
        for task in names:
            per_task.update(task_metrics(_evaluate_task(lm_eval, lm, task, manager, limit)))
    return {"tasks": per_task, "limit": limit, "num_fewshot": 0, "lm_eval_version": version("lm_eval")}
