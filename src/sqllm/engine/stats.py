"""Statistics accumulators fed with a linear layer's inputs, one batch at a time (``update(x)``/``result()``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Column blocks of the Hessian's upper block triangle: at most 512 wide, and wide enough that each
# product stays efficient.
_HESSIAN_BLOCK = 512


class HessianAccumulator:
    """``H = 2/N * sum_t x_t x_t^T`` over all N calibration tokens (GPTQ's layer-wise Hessian), ``[in, in]``.

    H is symmetric, so ``update`` multiplies only the blocks on and above the diagonal of a c x c block
    grid, (c + 1) / 2c of the products (c = 2 at 576 inputs, 8 at 4096), and ``result`` mirrors them."""

    def __init__(self, n_in: int):
        self.sum = torch.zeros(n_in, n_in, dtype=torch.float32)
        self.count = 0
        c = -(-n_in // _HESSIAN_BLOCK)
        self.edges = [n_in * i // c for i in range(c + 1)]

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.sum.device != x.device:  # the sum lives where the block runs (a GPU with --device cuda)
            self.sum = self.sum.to(x.device)
        for a, b in zip(self.edges[:-1], self.edges[1:]):
            self.sum[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
        self.count += x.shape[0]

    def all_reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum ``sum`` and ``count`` over data-parallel ranks with ``reduce`` (an in-place sum)."""
        reduce(self.sum)
        count = torch.tensor([self.count], dtype=torch.float64)
        self.count = int(reduce(count).item())

    def result(self) -> Tensor:
        h = self.sum * (2.0 / max(self.count, 1))
        for a, b in zip(self.edges[1:-1], self.edges[2:]):
            h[a:b, :a] = h[:a, a:b].T
        return h


class InputSampler:
    """A seeded sample of input rows, ``[<= max_rows, in]``: the calibration tokens SliM-LLM's bit
    allocation search evaluates its candidates on. Each batch contributes ``per_batch`` rows."""

    def __init__(self, max_rows: int, per_batch: int, seed: int = 0):
        self.max_rows = max_rows
        self.per_batch = per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list[Tensor] = []
        self.count = 0

    def update(self, x: Tensor) -> None:
        if self.count >= self.max_rows:
            return
        x = x.reshape(-1, x.shape[-1])
        take = min(self.per_batch, x.shape[0], self.max_rows - self.count)
        idx = torch.randperm(x.shape[0], generator=self.gen)[:take]
        self.rows.append(x[idx].float().cpu())
        self.count += take

    def result(self) -> Tensor:
        return torch.cat(self.rows)
