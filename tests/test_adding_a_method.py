"""The README's "Adding a method" section, run as written: a solver, a config and one registry entry give a
method the CLI quantizes with (flags included), whose checkpoint loads and runs."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from sqllm import methods
from sqllm.api import load_model
from sqllm.cli import main
from sqllm.nn import QuantLinear
from sqllm.quant.uniform import quantize_groups_minmax
from test_cli import _tiny_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code() -> list[str]:
    text = README.read_text()
    section = text.split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def readme_method():
    blocks = _section_code()
    assert len(blocks) == 3, "the section shows the solver, the config and the registry entry"
    module = types.ModuleType("readme_example")  # dataclasses and get_type_hints look their module up
    sys.modules[module.__name__] = module
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), module.__dict__)
        yield module.__dict__
    finally:
        methods.METHODS.pop("rtn-clip", None)
        del sys.modules[module.__name__]


def test_the_readme_method_beats_plain_rtn(readme_method):
    cfg = readme_method["RTNClipConfig"](bits=3, group_size=16, grid=30, min_ratio=0.6)
    w = torch.randn(32, 72, generator=torch.Generator().manual_seed(0))
    w[:, 5] *= 8  # an outlier column: min-max grids waste most of their levels on it
    clipped = readme_method["rtn_clip_quantize"](w, cfg).dequantize()
    plain = quantize_groups_minmax(w, 3, 16).dequantize()
    assert (clipped - w).pow(2).sum() < (plain - w).pow(2).sum()


def test_the_cli_runs_the_readme_method(readme_method, tmp_path, capsys):
    tiny = _tiny_folder(tmp_path)
    out = tmp_path / "clip3"
    code = main(["quantize", str(tiny), "--method", "rtn-clip", "--bits", "3", "--group-size", "16",
                 "--clip-grid", "8", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    model, _ = load_model(str(out))
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert qlinears and all(m.meta.bits == 3 and m.meta.group_size == 16 for m in qlinears)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    # A flag of the new method is refused for a method that does not take it, naming both.
    code = main(["quantize", str(tiny), "--method", "rtn", "--bits", "3", "--clip-grid", "8",
                 "--output", str(tmp_path / "x")])
    assert code == 2 and "grid" in capsys.readouterr().err
