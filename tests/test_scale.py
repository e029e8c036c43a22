"""Quantizing from disk block by block: equal to the in-memory engine, resumable byte for byte, data-parallel
statistics equal to one process, and one clear line for each bad input."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

import pytest
import torch

from sqllm import api
from sqllm.cli import main
from sqllm.engine.resume import WorkState, work_folder_for
from sqllm.formats.checkpoint import read_tensors
from sqllm.formats.layouts import pack_matrix
from test_cli import _tiny_folder

CALIB = dict(nsamples=4, calib_seqlen=32, seed=0)
RUNS = {  # id: (method, options)
    "gptq": ("gptq", dict(bits=3, group_size=32)),
    "squeezellm": ("squeezellm", dict(bits=3, outlier_pct=0.5)),
    # a model-wide plan: the Fisher pass runs first, then blocks in forward order
    "squeezellm-mixed": ("squeezellm", dict(bits=4, outlier_pct=0.5, mixed=True)),
    "rtn": ("rtn", dict(bits=4, group_size=32)),
    "slim": ("slim", dict(bits=3, group_size=32)),
}
STREAMED_FISHER = {"resident_fisher_bytes": 0}  # the tiny model would otherwise be loaded whole for its Fisher


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(["the cat sat on the mat and it was a day of rain in the town"] * 200))
    return path


def _quantize(folder, out, run, text, engine_options=None, **kwargs):
    method, options = RUNS[run]
    engine = api.EngineOptions(batch_size=3, progress=False, **(engine_options or {}))
    calibration = api.Calibration(str(text), CALIB["nsamples"], CALIB["calib_seqlen"], CALIB["seed"])
    return api.quantize_checkpoint(str(folder), out, method, calibration=calibration, engine=engine, progress=False,
                                   **options, **kwargs)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("run, engine_options", [(r, {}) for r in RUNS] + [
    ("squeezellm", STREAMED_FISHER), ("squeezellm-mixed", STREAMED_FISHER)])
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, text, run, engine_options):
    folder = _tiny_folder(tmp_path)
    model, tok = api.load_model(str(folder))
    method, options = RUNS[run]
    want = api.quantize(model, tok, method, calib=str(text), engine=api.EngineOptions(batch_size=3, progress=False),
                        progress=False, **CALIB, **options)
    summary = _quantize(folder, tmp_path / "out", run, text, engine_options)
    stored = read_tensors(tmp_path / "out")
    for name, qm in want.matrices.items():
        for key, t in pack_matrix(qm, f"{name}.", torch.float32).items():
            assert torch.equal(stored[key], t), key
    assert summary["bits_per_weight"] == want.summary()["bits_per_weight"]
    assert not work_folder_for(tmp_path / "out").exists()
    # Loading the streamed output gives the in-memory model's logits.
    loaded, _ = api.load_model(str(tmp_path / "out"))
    ids = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


class _Killed(Exception):
    pass


def _kill_after_first_block(monkeypatch) -> None:
    """Make the next run die (like a Ctrl-C) right after its first block is recorded as finished."""
    original = WorkState.block_done

    def dies(self, b, carry, *, direction):
        original(self, b, carry, direction=direction)
        raise _Killed

    monkeypatch.setattr(WorkState, "block_done", dies)


def _kill_while_assembling(monkeypatch) -> None:
    """Make the next run die after every block finished, while the output folder is being assembled."""
    import sqllm.formats.shards as shards

    def dies(dest, *args, **kwargs):
        (dest / "model-00001-of-00004.safetensors").write_bytes(b"half")
        raise _Killed

    monkeypatch.setattr(shards, "assemble_packed", dies)


@pytest.mark.parametrize(
    "run, kill, finished, engine_options",
    [("gptq", _kill_after_first_block, 1, {}),  # forward order
     ("squeezellm", _kill_after_first_block, 1, STREAMED_FISHER),  # reverse order (streamed Fisher)
     ("squeezellm", _kill_after_first_block, 1, {}),  # resident Fisher kept in the work folder, forward order
     ("squeezellm-mixed", _kill_after_first_block, 1, STREAMED_FISHER),  # streamed Fisher, then a model-wide plan
     ("squeezellm", _kill_while_assembling, 2, {})],
)
def test_resume_after_a_kill_gives_the_same_bytes(tmp_path, text, run, kill, finished, engine_options,
                                                  monkeypatch):
    folder = _tiny_folder(tmp_path)
    method = RUNS[run][0]
    _quantize(folder, tmp_path / "whole", run, text, engine_options)

    out = tmp_path / "resumed"
    kill(monkeypatch)
    with pytest.raises(_Killed):
        _quantize(folder, out, run, text, engine_options)
    monkeypatch.undo()
    work = work_folder_for(out)
    assert not out.exists() and len(list((work / "blocks").glob("*.safetensors"))) == finished
    # A whole table (resident pass, or the streamed one a model-wide plan needs) is kept for the resume.
    kept = method == "squeezellm" and (not engine_options or "mixed" in run)
    assert (work / "fisher.safetensors").is_file() == kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".resumed.tmp")]
    code = main(["quantize", str(folder), "--method", method, "--output", str(out), *_cli_options(run, text)])
    assert code == 2  # an unfinished work folder is never reused without --resume
    if kept:  # the resumed run reads the kept table: no second gradient pass
        from sqllm.engine import fisher as fisher_module

        def no_second_pass(*args, **kwargs):
            raise AssertionError("the Fisher pass ran again on resume")

        monkeypatch.setattr(fisher_module, "compute_fisher", no_second_pass)
        monkeypatch.setattr(fisher_module, "streamed_fisher_dict", no_second_pass)
    _quantize(folder, out, run, text, engine_options, resume=True)
    monkeypatch.undo()
    assert _files(out) == _files(tmp_path / "whole")
    assert not work.exists()


def _cli_options(run: str, text: Path) -> list[str]:
    flags = {"bits": "--bits", "group_size": "--group-size", "outlier_pct": "--outliers"}  # gptq, squeezellm
    argv = ["--calib", str(text), "--nsamples", "4", "--calib-seqlen", "32", "--batch-size", "3"]
    for k, v in RUNS[run][1].items():
        argv += ["--mixed"] if k == "mixed" else [flags[k], str(v)]
    return argv


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _one_line(err: str) -> bool:
    """stderr ends with exactly one error line and holds no traceback (progress bars may precede it)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith("sqllm: error:") and "Traceback" not in err and \
        sum(line.startswith("sqllm: error:") for line in lines) == 1


def test_resume_with_other_settings_is_refused(tmp_path, text, capsys, monkeypatch):
    folder = _tiny_folder(tmp_path)
    out = tmp_path / "out"
    _kill_after_first_block(monkeypatch)
    with pytest.raises(_Killed):
        _quantize(folder, out, "gptq", text)
    monkeypatch.undo()
    argv = ["quantize", folder, "--method", "gptq", "--output", out, "--resume", *_cli_options("gptq", text)]
    code, err = _run(capsys, *[a if a != "3" else "4" for a in argv])  # --bits 4 and --batch-size 4
    assert code == 2 and _one_line(err) and "other settings" in err and "bits: 3 then, 4 now" in err, err
    assert not out.exists() and work_folder_for(out).is_dir()


def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, text, capsys):
    folder = _tiny_folder(tmp_path)
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        code, err = _run(capsys, "quantize", folder, "--method", "rtn", "--output", out, "--bits", "4",
                         "--group-size", "32")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert code == 2 and _one_line(err) and "could not write" in err, err
    assert not out.exists() and not work_folder_for(out).exists()  # no block had finished: nothing kept
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".out.tmp")]
    assert not leftovers


def test_missing_shard_and_cuda_without_gpu_are_one_line(tmp_path, capsys):
    folder = _tiny_folder(tmp_path)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    sharded = tmp_path / "sharded"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((folder / f).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded / shard).unlink()
    code, err = _run(capsys, "quantize", sharded, "--method", "rtn", "--bits", "4", "--output", tmp_path / "o")
    assert code == 2 and _one_line(err) and f"shard {shard}" in err and "missing" in err, err
    if not torch.cuda.is_available():
        code, err = _run(capsys, "quantize", folder, "--method", "rtn", "--bits", "4", "--output", tmp_path / "o",
                         "--device", "cuda")
        assert code == 2 and _one_line(err) and "no CUDA GPU" in err, err
    assert not (tmp_path / "o").exists() and not work_folder_for(tmp_path / "o").exists()
