"""benchmarks/common.py's cache keys: a run is keyed by the damping it used, whatever the defaults were."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common
from sqllm.config import GPTQConfig, SliMConfig


def test_runs_at_the_implicit_damping_keep_their_old_keys():
    # a SliM-LLM run that never set percdamp used 0.01 then and now: one key, with or without the option
    assert SliMConfig(bits=3).percdamp == common.KEYED_DEFAULTS["percdamp"]
    assert common.keyed_options("slim", {"bits": 3}) == {"bits": 3}
    assert common.keyed_options("slim", {"bits": 3, "percdamp": 0.01}) == {"bits": 3}


def test_a_moved_default_is_keyed_by_its_value():
    g3 = {"bits": 3, "group_size": 64}
    default = GPTQConfig(**g3).percdamp
    assert default != common.KEYED_DEFAULTS["percdamp"]
    # GPTQ at its present default is the same run as GPTQ with that damping set, not the older default's
    assert common.keyed_options("gptq", g3) == common.keyed_options("gptq", {**g3, "percdamp": default})
    assert common.keyed_options("gptq", g3) != common.keyed_options("gptq", {**g3, "percdamp": 0.01})
    assert common.keyed_options("gptq", {**g3, "percdamp": 0.01}) == g3


def test_methods_without_the_option_and_unknown_methods_are_left_alone():
    assert common.keyed_options("rtn", {"bits": 4}) == {"bits": 4}
    assert common.keyed_options(None, {"x": 1}) == {"x": 1}
    assert common.keyed_options("gptq-ref", {"bits": 3}) == {"bits": 3}
