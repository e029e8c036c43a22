"""The command line's contract: one clear line and exit code 2 on bad input, nothing half-written."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from sqllm.cli import main


def _run(capsys, *argv):
    capsys.readouterr()  # drop what building the fixture printed
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _tiny_folder(tmp_path, family="llama"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / f"tiny-{family}"
    tiny_model(family).save_pretrained(path)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the a of and to in is was it on".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["quantize", "/no/such/model", "--method", "rtn", "--bits", "4"], "not found"),
        (["quantize", "TINY", "--method", "rtn", "--bits", "9"], "bits=9"),
        (["quantize", "TINY", "--method", "rtn", "--bits", "1"], "bits=1"),
        (["quantize", "TINY", "--method", "rtn", "--bits", "4", "--group-size", "0"], "group_size=0"),
        (["quantize", "TINY", "--method", "rtn", "--bits", "4", "--group-size", "128"], "group_size=128"),
        (["quantize", "TINY", "--method", "gptq", "--bits", "4"], "--calib"),
        (["quantize", "TINY", "--method", "slim", "--bits", "4"], "choose 2 or 3"),
        (["quantize", "TINY", "--method", "squeezellm", "--bits", "5"], "choose 2, 3 or 4"),
        (["quantize", "TINY", "--method", "squeezellm", "--bits", "3", "--outliers", "11"], "outlier_pct=11"),
        (["quantize", "TINY", "--method", "gptq", "--bits", "3", "--calib", "SHORT"], "too few"),
        (["eval", "TINY"], "nothing to evaluate"),
        (["eval", "TINY", "--ppl", "no-such-source"], "unknown text source"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    tiny = _tiny_folder(tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("the a of")
    argv = [str(tiny) if a == "TINY" else str(short) if a == "SHORT" else a for a in argv]
    if argv[0] == "quantize":
        argv += ["--output", str(tmp_path / "out"), "--calib-seqlen", "16", "--nsamples", "2"]
    code, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("sqllm: error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unsupported_architecture(tmp_path, capsys):
    import transformers as tf

    path = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    code, err = _run(capsys, "eval", str(path), "--ppl", "wikitext2")
    assert code == 2 and "'gpt2'" in err and "llama" in err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    tiny = _tiny_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, "quantize", str(tiny), "--method", "rtn", "--bits", "4", "--output", str(out))
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_quantize_then_eval_roundtrip(tmp_path, capsys):
    tiny = _tiny_folder(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and it was a day of rain"] * 200))
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", str(text), "--nsamples", "4", "--calib-seqlen", "32", "--output", str(out),
                 "--json", str(tmp_path / "q.json")]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "sqllm" and cfg["method"] == "gptq" and cfg["bits"] == 4
    assert main(["eval", str(out), "--baseline", str(tiny), "--ppl", str(text), "--seqlen", "64",
                 "--windows", "2", "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert {"perplexity", "windows", "seqlen", "tokens"} <= set(res)
    assert res["windows"] == 2 and res["seqlen"] == 64 and len(res["runs"]) == 2
    q, fp = (r["perplexity"] for r in res["runs"])
    assert q > 0 and fp > 0 and abs(q - fp) / fp < 0.5
