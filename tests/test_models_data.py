"""Model specs, the architecture table, and text sources."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FAMILIES, tiny_model
from sqllm.data import calibration_windows, eval_tokens, load_text, sample_windows
from sqllm.errors import DataUnavailable, InvalidConfig, NotEnoughText, UnknownModel, UnsupportedArchitecture
from sqllm.models import ARCHITECTURES, arch_spec, linear_names, load_model, resolve_model_path


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_its_linears(family):
    model = tiny_model(family)
    names = linear_names(model)
    assert len(names) == 2 * (6 if family == "opt" else 7)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)


def test_unsupported_architecture_names_it_and_the_supported():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'.*llama") as e:
        arch_spec(model)
    assert "\n" not in str(e.value)
    assert set(ARCHITECTURES) >= {"llama", "mistral", "qwen2", "opt"}


def test_local_folder_roundtrip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("spec", ["/no/such/folder", "nonsense", "missing.gguf"])
def test_unknown_model(spec):
    with pytest.raises(UnknownModel):
        resolve_model_path(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(UnknownModel, match="config.json"):
        resolve_model_path(str(tmp_path))


class _CharTok:
    """A byte-level stand-in tokenizer: one token per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
        class R:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])

        return R()


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(InvalidConfig, match="bad.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataUnavailable):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataUnavailable, match="unknown text source"):
        load_text("no-such-dataset")


def test_line_ends_read_as_newlines(tmp_path):
    """CRLF and CR files give the text of their LF twin, as the GPTQ protocol's ``datasets`` rows have it."""
    lines = [" = Title = ", "", " First line , with a comma . ", " Second @-@ line "]
    for name, sep in (("lf.raw", b"\n"), ("crlf.raw", b"\r\n"), ("cr.raw", b"\r")):
        (tmp_path / name).write_bytes(sep.join(line.encode() for line in lines) + sep)
        assert load_text(str(tmp_path / name)) == "\n".join(lines) + "\n"


def test_real_test_text_has_no_carriage_returns(wiki_test):
    """The shared ``wiki.test.raw`` ends its lines with CRLF; read as text, no ``\\r`` is left to tokenize."""
    assert b"\r\n" in wiki_test.read_bytes()
    text = load_text(str(wiki_test))
    assert "\r" not in text and text == wiki_test.read_text(encoding="utf-8")


def test_windows_are_seeded_and_in_bounds(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 50)
    a = calibration_windows(_CharTok(), str(tmp_path / "t.txt"), 6, 32, seed=1)
    b = calibration_windows(_CharTok(), str(tmp_path / "t.txt"), 6, 32, seed=1)
    c = calibration_windows(_CharTok(), str(tmp_path / "t.txt"), 6, 32, seed=2)
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    stream = eval_tokens(_CharTok(), str(tmp_path / "t.txt"))[0]
    for row in a:  # every window is a contiguous slice of the stream
        start = int(row[0] - ord("a"))
        assert torch.equal(row, stream[start : start + 32])


def test_windows_follow_gptqs_seeded_loop():
    """Protocol P's calibration: the offsets GPTQ's datautils draw after ``random.seed(seed)``, one
    ``random.randint(0, T - seqlen - 1)`` per window, in that order."""
    import random

    ids = torch.arange(5000)
    state = random.getstate()
    try:
        random.seed(0)
        want = [random.randint(0, ids.numel() - 2048 - 1) for _ in range(32)]
    finally:
        random.setstate(state)
    got = sample_windows(ids, 32, 2048, seed=0)
    assert got[:, 0].tolist() == want and torch.equal(got[:, -1] - got[:, 0], torch.full((32,), 2047))


def test_too_little_text():
    with pytest.raises(NotEnoughText, match="10 tokens"):
        sample_windows(torch.arange(10), 4, 32, seed=0)


def test_real_calibration_file(wiki_valid, smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    w = calibration_windows(tok, str(wiki_valid), 4, 512, seed=0)
    assert w.shape == (4, 512) and int(w.max()) < tok.vocab_size


@pytest.mark.real
def test_concurrent_gguf_conversion_keeps_the_finished_folder(smollm2_path, tmp_path):
    """Two processes converting the same GGUF: the one that renames second keeps the first's folder."""
    from sqllm.models import ALIASES, _convert_gguf, resolve_alias

    assert "smollm2-135m" in ALIASES
    dest = tmp_path / "converted"
    shutil.copytree(smollm2_path, dest)  # what the first process put in place
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    _convert_gguf(resolve_alias("smollm2-135m"), dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary folder left behind
