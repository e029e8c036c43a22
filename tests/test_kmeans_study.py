"""benchmarks/squeezellm_plus.py's k-means study: the heuristic solver of an earlier commit swapped in for
SqueezeLLM's exact one, and only inside the study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))

import squeezellm_plus
from sqllm.quant import squeezellm
from sqllm.quant.kmeans import weighted_kmeans, weighted_kmeans_objective


def _has_commit(commit: str) -> bool:
    done = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _has_commit(squeezellm_plus.HEURISTIC_COMMIT), reason="shallow clone: no history")
def test_heuristic_swap_is_scoped_and_never_beats_the_exact_optimum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 200, generator=gen)
    w = torch.rand(32, 200, generator=gen)
    with squeezellm_plus.kmeans_solver(squeezellm_plus.HEURISTIC):
        assert squeezellm.weighted_kmeans is not weighted_kmeans
        lut, codes = squeezellm.weighted_kmeans(x, w, 8, fp16=True)
    assert squeezellm.weighted_kmeans is weighted_kmeans
    heuristic = weighted_kmeans_objective(x, w, lut, codes)
    exact = weighted_kmeans_objective(x, w, *weighted_kmeans(x, w, 8, fp16=True))
    assert lut.shape == (32, 8) and codes.shape == (32, 200)
    # fp16 tables: the exact optimum is rounded too, so allow that rounding's share
    assert bool((exact <= heuristic * (1 + 1e-3)).all())
    assert float(heuristic.sum()) > float(exact.sum())


@pytest.mark.skipif(not _has_commit(squeezellm_plus.HEURISTIC_COMMIT), reason="shallow clone: no history")
def test_heuristic_seed_option_reaches_its_random_starts():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 300, generator=gen)
    w = torch.rand(64, 300, generator=gen)

    def tables(choice):
        with squeezellm_plus.kmeans_solver(choice):
            return squeezellm.weighted_kmeans(x, w, 8, fp16=True)

    seed0 = tables(squeezellm_plus.HEURISTIC)
    assert all(torch.equal(a, b) for a, b in zip(seed0, tables(squeezellm_plus.HEURISTIC + ",seed=0")))
    seed1 = tables(squeezellm_plus.HEURISTIC + ",seed=1")
    assert not torch.equal(seed0[0], seed1[0])


@pytest.mark.parametrize("choice", ["heuristic", "exact@24bf6cf", "heuristic@24bf6cf,seed=x"])
def test_bad_kmeans_choice_is_refused(choice):
    with pytest.raises(ValueError, match="expected 'heuristic@<commit>'"):
        with squeezellm_plus.kmeans_solver(choice):
            pass
