"""benchmarks/scale.py: a failed child run is reported and leaves the results as they were."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale


def test_failed_quantization_records_no_row(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    earlier = '{"shape": "1b", "run": "gptq-4bit-g128", "quantize": {"seconds": 1.0}}\n'
    (results / "scale.jsonl").write_text(earlier)
    log = tmp_path / "q.log"
    log.write_text("progress\nModuleNotFoundError: No module named 'sqllm'\n")
    monkeypatch.setattr(scale, "RESULTS", results)
    monkeypatch.setattr(scale, "measured", lambda argv, _log: {"argv": argv, "seconds": 0.1, "peak_rss_mib": 1.0,
                                                               "exit_code": 1, "log": str(log)})
    with pytest.raises(SystemExit, match=r"1b gptq-4bit-g128: sqllm quantize exited with 1 .*No module named"):
        scale.run_shape("1b", ["gptq-4bit-g128"], tmp_path / "out")
    assert (results / "scale.jsonl").read_text() == earlier
    assert sorted(p.name for p in results.iterdir()) == ["scale.jsonl"]


def test_children_run_this_checkouts_sqllm(tmp_path):
    code = "import sqllm, sys; sys.stdout.write(sqllm.__file__)"
    out = tmp_path / "out.log"
    r = scale.measured([sys.executable, "-c", code], out)
    assert r["exit_code"] == 0
    assert Path(out.read_text()).resolve().is_relative_to((scale.ROOT / "src").resolve())
