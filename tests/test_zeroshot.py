"""Zero-shot evaluation through lm-eval on the local task ``sqllm_tiny_mc`` (no network needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY
from sqllm.cli import main
from sqllm.errors import DataUnavailable, InvalidConfig
from sqllm.eval.zeroshot import run_zeroshot
from sqllm.report import print_zeroshot

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

TASKS = Path(__file__).parent / "data" / "zeroshot"
TASK = "sqllm_tiny_mc"
EOS = "<eos>"


def byte_tokenizer():
    """A byte-level tokenizer: one token per byte (ids 0-255) plus an end-of-text token (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS)


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    """The conftest tiny llama, with room for the byte tokenizer's 257 ids and the task's prompts."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**{**TINY, "vocab_size": 257}, num_key_value_heads=2, max_position_embeddings=512)
    return tf.LlamaForCausalLM(cfg).eval()


def _docs(n: int) -> list[dict]:
    with open(TASKS / f"{TASK}.jsonl") as f:
        return [json.loads(line) for line in f][:n]


def _direct_accuracy(model, tok, docs: list[dict]) -> float:
    """Accuracy by hand: the choice whose continuation ``" " + choice`` after the task's prompt has the
    highest summed log-likelihood (lm-eval's ``acc``; bytes make the context/continuation split exact)."""
    right = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        n_ctx = len(tok(context).input_ids)
        scores = []
        for choice in doc["choices"]:
            ids = torch.tensor([tok(f"{context} {choice}").input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)
            cont = ids[0, n_ctx:]
            scores.append(logp[0, n_ctx - 1:].gather(1, cont[:, None]).sum().item())
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)


@needs_lm_eval
def test_local_task_matches_direct_loglikelihood_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the task's data must not depend on the working directory
    model, tok = tiny_lm(), byte_tokenizer()
    res = run_zeroshot(model, tok, [TASK], include_path=str(TASKS), limit=12, batch_size=4)
    m = res["tasks"][TASK]
    assert res["limit"] == 12 and res["num_fewshot"] == 0 and res["lm_eval_version"].startswith("0.")
    assert m["samples"] == 12
    assert 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1 and m["acc_stderr"] > 0 and m["acc_norm_stderr"] > 0
    assert m["acc"] == pytest.approx(_direct_accuracy(model, tok, _docs(12)))


def _save_tiny(path: Path) -> Path:
    tiny_lm().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@needs_lm_eval
def test_cli_writes_zeroshot_results(tmp_path, capsys):
    model_dir = _save_tiny(tmp_path / "tiny")
    out = tmp_path / "res.json"
    rc = main(["eval", str(model_dir), "--tasks", TASK, "--include-path", str(TASKS), "--limit", "6",
               "--json", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())["zeroshot"]["tasks"][TASK]
    assert 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1 and m["samples"] == 6
    table = capsys.readouterr().out
    assert f"| {model_dir} | {TASK} | {m['acc']:.4f} |" in table


@needs_lm_eval
def test_cli_unknown_task_is_one_line_and_exit_2(tmp_path, capsys):
    model_dir = _save_tiny(tmp_path / "tiny")
    rc = main(["eval", str(model_dir), "--tasks", "sqllm_no_such_task", "--include-path", str(TASKS)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "sqllm_no_such_task" in err and "--include-path" in err
    # Tasks are checked before any model is loaded: a missing model is not what gets reported.
    rc = main(["eval", str(tmp_path / "no_model"), "--tasks", "sqllm_no_such_task", "--include-path", str(TASKS)])
    err = capsys.readouterr().err
    assert rc == 2 and "sqllm_no_such_task" in err and "no_model" not in err


@needs_lm_eval
def test_unreachable_task_data_is_data_unavailable(tmp_path, monkeypatch):
    """A hub dataset with the hub offline fails fast, naming the task, in one line."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "offline.yaml").write_text(
        (TASKS / f"{TASK}.yaml").read_text()
        .replace(f"task: {TASK}", "task: sqllm_offline_mc")
        .replace("dataset_path: json", "dataset_path: sqllm-tests/not-on-this-machine")
        .replace(f"custom_dataset: !function {TASK}.load\n", "")
    )
    with pytest.raises(DataUnavailable, match="sqllm_offline_mc") as err:
        run_zeroshot(tiny_lm(), byte_tokenizer(), ["sqllm_offline_mc"], include_path=str(tmp_path))
    assert "\n" not in str(err.value)


def test_missing_lm_eval_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(DataUnavailable, match="pip install"):
        run_zeroshot(tiny_lm(), byte_tokenizer(), [TASK])


@needs_lm_eval
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=[" "]), "no zero-shot task"),
        (dict(tasks=[TASK], limit=0), "limit=0"),
        (dict(tasks=[TASK], include_path="/nonexistent/sqllm-tasks"), "not a folder"),
    ],
)
def test_bad_arguments_are_invalid_config(kwargs, match):
    with pytest.raises(InvalidConfig, match=match):
        run_zeroshot(None, None, **kwargs)


def test_print_zeroshot_table(capsys):
    print_zeroshot("m", {"tasks": {"a": {"acc": 0.5, "acc_stderr": 0.1, "samples": 4}}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| model | task | acc |")
    assert lines[2] == "| m | a | 0.5000 | 0.1000 | - | - | 4 |"
