"""Sqllm as a hostile user tries it (issue 10): every bad input, fault and interrupt ends in one clear line
on stderr and exit code 2, leaves nothing half-written, loses nothing, and is refused before the long work.

Most cases call ``cli.main`` in-process; "before the long work" is shown by making ``api.load_model`` fail
the test if it is reached. Only the byte-identity check runs the real CLI in a second process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sqllm
from conftest import tiny_model
from sqllm import api, output
from sqllm.cli import main
from sqllm.errors import CorruptCheckpoint, InvalidConfig, UnsafeOutput

TEXT = " ".join(["the cat sat on the mat and it was a day of rain"] * 200)


# ---------------------------------------------------------------- fixtures and helpers


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["the", "a", "of", "and", "on", "cat", "sat", "mat"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


def _save_tiny(path: Path, model: torch.nn.Module | None = None) -> Path:
    (model or tiny_model("llama")).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def tiny(work) -> Path:
    """A 2-block llama folder (hidden 64, context 256) with a word-level tokenizer."""
    return _save_tiny(work / "tiny")


@pytest.fixture(scope="module")
def text(work) -> Path:
    path = work / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def packed(work, tiny) -> Path:
    """An RTN checkpoint of ``tiny`` (tests that damage it work on a copy)."""
    model, tok = api.load_model(str(tiny))
    result = api.quantize(model, tok, "rtn", bits=4, group_size=32, progress=False)
    return api.save_quantized(model, tok, result, work / "packed")


@pytest.fixture
def damaged(packed, tmp_path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "ckpt"))


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the command gets as far as loading a model: its refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(api, "load_model", refuse)


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _refused(capsys, needle: str, *argv) -> str:
    code, err = _run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("sqllm: error:") and "\n" not in err, err
    assert needle in err, err
    return err


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones too) by relative name, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _quantize_args(tiny: Path, out: Path, *extra) -> list:
    return ["quantize", tiny, "--method", "rtn", "--bits", "4", "--group-size", "32", "--output", out, *extra]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _edit_shard(folder: Path, edit) -> None:
    """Apply ``edit`` to the tensors of the (single) shard, and keep the index in step."""
    shard = next(folder.glob("model-*.safetensors"))
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: shard.name for k in tensors}
    index_path.write_text(json.dumps(index))


# ---------------------------------------------------------------- hangs


@pytest.mark.parametrize("option, needle", [
    (["--max-new-tokens", "-1"], "max_new_tokens=-1"),
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
    (["--prompt", ""], "prompt is empty"),
    (["--temperature", "nan"], "temperature=nan"),
    (["--temperature", "-1"], "temperature=-1"),
    (["--temperature", "inf"], "temperature=inf"),
])
def test_generate_refuses_bad_options_before_loading(capsys, no_load, packed, option, needle):
    _refused(capsys, needle, "generate", packed, "--prompt", "the cat", *option)


def test_generate_ends_when_its_thread_dies(packed):
    """A generation thread that fails ends the iteration with its exception, instead of a hang."""
    model, tok = api.load_model(str(packed))

    def broken_generate(**kwargs):
        raise RuntimeError("generation failed")

    model.generate = broken_generate
    outcome: list[BaseException] = []

    def consume():
        try:
            list(api.generate(model, tok, "the cat", max_new_tokens=4))
        except BaseException as exc:  # whatever ends the iteration is checked below
            outcome.append(exc)

    watcher = threading.Thread(target=consume, daemon=True)
    watcher.start()
    watcher.join(60)  # a bound for the test only: a hang would otherwise block the suite forever
    assert not watcher.is_alive(), "generate() hung on a dead generation thread"
    assert len(outcome) == 1 and str(outcome[0]) == "generation failed"


# ---------------------------------------------------------------- data loss


def test_overwrite_never_replaces_the_input_model(capsys, no_load, tmp_path):
    model_dir = _save_tiny(tmp_path / "models" / "m")
    before = _tree(tmp_path / "models")
    _refused(capsys, "would replace the input", *_quantize_args(model_dir, model_dir, "--overwrite"))
    _refused(capsys, "would replace the input", *_quantize_args(model_dir, tmp_path / "models", "--overwrite"))
    assert _tree(tmp_path / "models") == before


def test_overwrite_never_replaces_the_working_folder(capsys, no_load, tiny, tmp_path, monkeypatch):
    work = tmp_path / "here"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    _refused(capsys, "is the current folder", *_quantize_args(tiny, ".", "--overwrite"))
    _refused(capsys, "a parent of the current folder", *_quantize_args(tiny, "..", "--overwrite"))
    assert (work / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_what_sqllm_wrote(capsys, no_load, tiny, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _refused(capsys, "only folders that sqllm wrote", *_quantize_args(tiny, mine, "--overwrite"))
    assert (mine / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    _refused(capsys, "is an existing file, not a folder", *_quantize_args(tiny, a_file, "--overwrite"))
    assert a_file.read_text() == "mine" and _leftovers(tmp_path) == []


def test_sensitivity_output_needs_overwrite_and_a_fisher_file(capsys, no_load, tiny, text, tmp_path):
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"not a fisher file")
    args = ["sensitivity", tiny, "--calib", text, "--calib-seqlen", "16", "--nsamples", "2", "--output", other]
    _refused(capsys, "pass --overwrite", *args)
    _refused(capsys, "only files that sqllm wrote", *args, "--overwrite")
    assert other.read_bytes() == b"not a fisher file"


@pytest.mark.parametrize("asked, used", [("float32", "none"), ("bfloat16", "bfloat16"),
                                         ("auto", "none" if api.fisher_dtype("auto", "cpu") is None else "bfloat16")])
def test_sensitivity_file_names_the_precision_it_was_computed_in(capsys, tiny, text, tmp_path, asked, used):
    out = tmp_path / "fisher.safetensors"
    code, err = _run(capsys, "sensitivity", tiny, "--calib", text, "--calib-seqlen", "16", "--nsamples", "2",
                     "--fisher-dtype", asked, "--output", out)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert (meta["fisher_dtype"], meta["autocast"]) == (asked, used)


def test_sensitivity_file_is_replaced_atomically(tmp_path):
    path = tmp_path / "missing" / "f.safetensors"  # a missing folder is made
    api.save_sensitivity(path, {"a": torch.ones(2, 3)}, {"n": 1})
    with pytest.raises(sqllm.errors.OutputExists):
        api.save_sensitivity(path, {"a": torch.zeros(2, 3)}, {"n": 2})
    api.save_sensitivity(path, {"a": torch.zeros(2, 3)}, {"n": 2}, overwrite=True)
    assert torch.equal(load_file(path)["a"], torch.zeros(2, 3))
    assert _leftovers(path.parent) == [] and path.stat().st_mode & 0o777 == 0o666 & ~output._umask()


def _swap_target(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sqllm_summary.json").write_text("old")
    return out


def _write_new(tmp: Path) -> None:
    (tmp / "sqllm_summary.json").write_text("new")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_swap_replaces_the_folder(tmp_path, monkeypatch, exchange):
    out = _swap_target(tmp_path)
    if not exchange:
        monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    output.write_folder(api.check_output(out, True), _write_new)
    assert _tree(out) == {"sqllm_summary.json": b"new"} and _leftovers(tmp_path) == []


def test_interrupted_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    """Without an atomic exchange, an interrupt between the two renames puts the old folder back."""
    out = _swap_target(tmp_path)
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's move into place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        output.write_folder(api.check_output(out, True), _write_new)
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert _tree(out) == {"sqllm_summary.json": b"old"} and _leftovers(tmp_path) == []


def test_killed_swap_is_undone_by_the_next_run(tmp_path):
    """A run killed between the two renames left only ``.out.old-PID-*``: the next run puts it back."""
    aside = tmp_path / f".out.old-{_dead_pid()}-0a1b2c3d"
    aside.mkdir()
    (aside / "sqllm_summary.json").write_text("old")
    with pytest.raises(sqllm.errors.OutputExists):
        api.check_output(tmp_path / "out", overwrite=False)
    assert _tree(tmp_path / "out") == {"sqllm_summary.json": b"old"} and _leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_runs_are_removed(capsys, tiny, tmp_path):
    dead = tmp_path / f".q.tmp-{_dead_pid()}-0a1b2c3d"
    alive = tmp_path / f".q.tmp-{os.getpid()}-0a1b2c3d"  # a run still writing: left alone
    for d in (dead, alive):
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    assert _run(capsys, *_quantize_args(tiny, tmp_path / "q"))[0] == 0
    assert not dead.exists() and alive.exists()


# ---------------------------------------------------------------- corrupt checkpoints


def test_checkpoint_without_quantization_config_is_refused(capsys, damaged, text):
    _edit_config(damaged, lambda cfg: cfg.pop("quantization_config"))
    with pytest.raises(CorruptCheckpoint, match="no quantization_config"):
        api.load_model(str(damaged))
    _refused(capsys, "no quantization_config", "eval", damaged, "--ppl", text, "--seqlen", "32")


def _nan_bytes(folder: Path, name: str) -> None:
    """Overwrite the first value of the float32 tensor ``name`` in place with 0xFFFFFFFF (a NaN)."""
    shard = next(folder.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]
    data[start : start + 4] = b"\xff\xff\xff\xff"
    shard.write_bytes(bytes(data))


def test_damaged_bytes_are_refused(capsys, damaged, text):
    _nan_bytes(damaged, "model.norm.weight")
    with pytest.raises(CorruptCheckpoint, match=r"'model\.norm\.weight'.*NaN"):
        api.load_quantized(damaged)
    _refused(capsys, "NaN", "eval", damaged, "--ppl", text, "--seqlen", "32")


def _drop_tensor(tensors):
    del tensors["model.norm.weight"]


def _extra_tensor(tensors):
    tensors["model.extra"] = torch.zeros(2)


def _version_2(folder):
    _edit_config(folder, lambda cfg: cfg["quantization_config"].update(format_version=2))


def _outside_shard(folder):
    """The index names a shard outside the folder (a full copy of the real one)."""
    shard = next(folder.glob("model-*.safetensors"))
    outside = folder.parent / "evil.safetensors"
    shutil.copy(shard, outside)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: "../evil.safetensors" for k in index["weight_map"]}
    index_path.write_text(json.dumps(index))


DAMAGE = {
    "missing-tensor": (lambda f: _edit_shard(f, _drop_tensor), "'model.norm.weight' is missing"),
    "extra-tensor": (lambda f: _edit_shard(f, _extra_tensor), "'model.extra'"),
    "format-version-2": (_version_2, "format_version 2"),
    "index-outside-folder": (_outside_shard, "not a file name inside"),
    "nan": (lambda f: _nan_bytes(f, "model.norm.weight"), "NaN"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("loader", ["sqllm", "transformers"])
def test_every_loading_path_is_strict(damaged, damage, loader):
    from transformers import AutoModelForCausalLM

    apply, needle = DAMAGE[damage]
    apply(damaged)
    load = api.load_quantized if loader == "sqllm" else AutoModelForCausalLM.from_pretrained
    refusal: tuple[type[Exception], ...] = (CorruptCheckpoint,)
    if loader == "transformers" and damage == "index-outside-folder":
        # transformers >= 5 refuses such an index itself, before our quantizer sees the files
        refusal, needle = (CorruptCheckpoint, ValueError), f"{needle}|points outside the model directory"
    with pytest.raises(refusal, match=needle):
        load(str(damaged))


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(intermediate_size=96), "in quantization_config but"),
    (lambda c: c.update(vocab_size=300), "is [256, 64] in the checkpoint"),
    (lambda c: c.update(num_hidden_layers=1), "does not exist in this model's architecture"),
])
def test_config_that_disagrees_with_the_packed_layers(capsys, damaged, text, edit, needle):
    _edit_config(damaged, edit)
    _refused(capsys, needle, "eval", damaged, "--ppl", text, "--seqlen", "32")


# ---------------------------------------------------------------- refused before the long work


def test_output_in_proc_is_refused_up_front(capsys, no_load, tiny):
    _refused(capsys, "cannot write", *_quantize_args(tiny, "/proc/sqllm-out"))


def test_output_under_a_file_is_refused_up_front(capsys, no_load, tiny, tmp_path):
    (tmp_path / "f").write_text("x")
    _refused(capsys, "is a file, not a folder", *_quantize_args(tiny, tmp_path / "f" / "out"))
    _refused(capsys, "is a file, not a folder",
             *_quantize_args(tiny, tmp_path / "q", "--json", tmp_path / "f" / "q.json"))


def test_json_into_a_missing_folder_is_written(capsys, tiny, tmp_path):
    report = tmp_path / "reports" / "deep" / "q.json"
    assert _run(capsys, *_quantize_args(tiny, tmp_path / "q", "--json", report))[0] == 0
    assert json.loads(report.read_text())["method"] == "rtn"


def test_sensitivity_output_checked_before_the_gradient_pass(capsys, no_load, tiny, text, tmp_path):
    (tmp_path / "f").write_text("x")
    args = ["sensitivity", tiny, "--calib", text, "--calib-seqlen", "16", "--output"]
    _refused(capsys, "is a file, not a folder", *args, tmp_path / "f" / "fisher.safetensors")
    _refused(capsys, "is a folder", *args, tmp_path)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weights_are_refused_before_quantizing(capsys, tmp_path, text, method):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan
    folder = _save_tiny(tmp_path / "nan", model)
    _refused(capsys, "'model.layers.1.mlp.up_proj.weight' of the model holds 1 NaN", *_quantize_args(
        folder, tmp_path / "q", "--calib", text, "--nsamples", "2", "--calib-seqlen", "16"))
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- bad model folders and text files


def _t5(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 64}))


def _auto_map(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "my_llm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLLM"}}))


def _pickle_only(folder: Path) -> None:
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


BAD_MODELS = {
    "t5": (_t5, "architecture 't5'"),
    "config-not-json": (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
    "config-a-list": (lambda f: (f / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    "config-no-model-type": (lambda f: (f / "config.json").write_text("{}"), "has no model_type"),
    "auto-map": (_auto_map, "never runs code"),
    "pickle-only": (_pickle_only, "only safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_folders(capsys, no_load, tmp_path, text, case):
    make, needle = BAD_MODELS[case]
    folder = tmp_path / case
    folder.mkdir()
    make(folder)
    _refused(capsys, needle, "eval", folder, "--ppl", text, "--seqlen", "32")


def test_text_file_named_gguf(capsys, no_load, tmp_path, text):
    fake = tmp_path / "model.gguf"
    fake.write_text("just text")
    _refused(capsys, "is not a GGUF file", "eval", fake, "--ppl", text)


def test_packed_checkpoint_given_to_quantize(capsys, no_load, packed, tmp_path):
    _refused(capsys, "already a packed sqllm checkpoint", *_quantize_args(packed, tmp_path / "q"))


def test_batch_size_zero(capsys, no_load, tiny, text, tmp_path):
    _refused(capsys, "batch_size=0", "quantize", tiny, "--method", "gptq", "--bits", "4", "--calib", text,
             "--batch-size", "0", "--output", tmp_path / "q")


@pytest.mark.parametrize("content, needle", [
    (b"\x00\x01\xfe\xff" * 64, "is not UTF-8 text"),
    (b"text\x00more", "NUL bytes"),
])
@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_binary_text_file(capsys, tiny, tmp_path, command, content, needle):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    argv = (["eval", tiny, "--ppl", bad, "--seqlen", "32"] if command == "eval"
            else ["quantize", tiny, "--method", "gptq", "--bits", "4", "--calib", bad, "--calib-seqlen", "16",
                  "--output", tmp_path / "q"])
    _refused(capsys, needle, *argv)


def test_jsonl_with_a_non_string_text(capsys, tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 42}) + "\n")
    _refused(capsys, "bad.jsonl:2: 'text' is a JSON int", "eval", tiny, "--ppl", bad, "--seqlen", "32")


def test_folder_given_as_text_file(capsys, no_load, tiny, tmp_path):
    folder = tmp_path / "texts.txt"
    folder.mkdir()
    _refused(capsys, "is a folder", "eval", tiny, "--ppl", folder, "--seqlen", "32")


# ---------------------------------------------------------------- values accepted without a check


def test_seqlen_beyond_the_context(capsys, no_load, tiny, text, tmp_path):
    _refused(capsys, "max_position_embeddings=256", "eval", tiny, "--ppl", text, "--seqlen", "99999")
    _refused(capsys, "max_position_embeddings=256", "quantize", tiny, "--method", "gptq", "--bits", "4",
             "--calib", text, "--calib-seqlen", "99999", "--output", tmp_path / "q")
    with pytest.raises(InvalidConfig, match="max_position_embeddings=256"):
        api.check_seqlen(257, tiny_model("llama").config)


@pytest.mark.parametrize("method, option, needle", [
    ("squeezellm", ["--outlier-range", "nan"], "outlier_range=nan"),
    ("squeezellm", ["--outlier-range", "inf"], "outlier_range=inf"),
    ("slim+", ["--lwc-lr", "nan"], "lwc_lr=nan"),
    ("slim+", ["--lwc-lr", "-1"], "lwc_lr=-1"),
    ("slim+", ["--lwc-samples", "0"], "lwc_samples=0"),
])
def test_method_values(capsys, no_load, tiny, text, tmp_path, method, option, needle):
    _refused(capsys, needle, "quantize", tiny, "--method", method, "--bits", "3", "--calib", text, *option,
             "--output", tmp_path / "q")


# ---------------------------------------------------------------- minor


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-mode", "unreachable"])
def test_offline_hub_fails_at_once(capsys, no_load, monkeypatch, tiny, tmp_path, env):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _refused(capsys, "Hugging Face hub", "eval", "sqllm-test/no-such-model", "--ppl", "wikitext2")
    if "HF_ENDPOINT" in env:  # in offline mode, datasets answers from its cache at once by itself
        _refused(capsys, "Hugging Face hub", "quantize", tiny, "--method", "gptq", "--bits", "4",
                 "--calib", "wikitext2", "--output", tmp_path / "q")


def test_checkpoints_are_byte_identical_and_readable(capsys, tiny, text, tmp_path):
    """Two runs with the same seed, in two processes, give the same bytes in every file; every file is
    readable like any other (0644 under the usual umask)."""
    args = ["quantize", tiny, "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", text,
            "--nsamples", "4", "--calib-seqlen", "32", "--output"]
    # another hash seed than this process (whatever it is), so that no ordering by hash can pass unseen
    env = {**os.environ, "PYTHONPATH": str(Path(sqllm.__file__).parents[1]), "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-m", "sqllm.cli", *map(str, args), str(tmp_path / "a")],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _run(capsys, *args, tmp_path / "b")[0] == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    mode = 0o666 & ~output._umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "b").iterdir()} == {k: mode for k in b}


def test_check_output_refuses_unsafe_targets(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(UnsafeOutput, match="would replace the input"):
        api.check_output(tmp_path, True, inputs=[str(tmp_path / "model")])
    assert api.check_output(tmp_path / "new", False) == (tmp_path / "new").resolve()


@pytest.mark.parametrize("argv, needle", [
    (["--method", "gptq", "--bits", "3", "--mixed"], "mixed"),
    (["--method", "squeezellm+", "--bits", "2", "--mixed"], "below what 2-bit rows reach"),
])
def test_mixed_tables_refused_where_they_cannot_apply(capsys, no_load, tiny, text, tmp_path, argv, needle):
    """``--mixed`` on a method without mixed tables, or with a budget 2-bit rows cannot meet."""
    _refused(capsys, needle, "quantize", tiny, *argv, "--calib", text, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()
