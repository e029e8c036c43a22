"""Data-parallel statistics: 2 gloo ranks on CPU, each with half the windows, equal one process."""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conftest import tiny_model
from sqllm.codes import QuantizedMatrix
from sqllm.config import RTNConfig
from sqllm.engine import distributed as dist
from sqllm.engine.fisher import compute_fisher, streamed_fisher_dict
from sqllm.engine.loop import EngineOptions, quantize_parts
from sqllm.engine.stream import InMemoryParts
from sqllm.methods import HESSIAN, LayerStats, MethodSpec
from sqllm.models import linear_names


class _Exact:
    def __init__(self, w):
        self.w, self.shape = w.clone(), tuple(w.shape)

    def dequantize(self):
        return self.w


def _statistics(windows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Hessians seen by the block loop and Fisher from both Fisher passes, for this rank's windows."""
    seen: dict[str, torch.Tensor] = {}

    def solve(w, stats: LayerStats, cfg):
        seen[stats.name] = stats.hessian
        return QuantizedMatrix(dense=_Exact(w))

    method = MethodSpec("record", RTNConfig, solve, "", layer_stats=(HESSIAN,))
    model = tiny_model("llama")
    quantize_parts(InMemoryParts(model), method, RTNConfig(4), sink=lambda *a: None, windows=windows,
                   opts=EngineOptions(batch_size=1, progress=False))
    model = tiny_model("llama")
    names = linear_names(model)
    return {"hessian": seen, "streamed_fisher": streamed_fisher_dict(InMemoryParts(model), windows, progress=False),
            "fisher": compute_fisher(model, names, windows, progress=False)}


def _windows() -> torch.Tensor:
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))


def _rank_main(rank: int, rendezvous: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        stats = _statistics(dist.shard_windows(_windows()))
        if dist.is_main():
            torch.save(stats, out)
    finally:
        tdist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    want = _statistics(_windows())
    for kind in want:
        assert sorted(got[kind]) == sorted(want[kind]), kind
        for name, t in want[kind].items():
            torch.testing.assert_close(got[kind][name], t, rtol=1e-5, atol=1e-7 * float(t.abs().max()))
