"""Exact weighted 1-D k-means: one lookup table per row of a matrix (SqueezeLLM §3.2, Eq. 4).

Per row ``x: [n]`` with weights ``w: [n] >= 0`` we minimise ``sum_i w_i (x_i - c_{a(i)})^2`` over ``k``
centroids ``c`` and assignments ``a``. In 1-D every cluster of an optimal assignment is a contiguous run
of the sorted row, so the optimum is a dynamic program over sorted prefixes,
``D_m(i) = min_{j < i} D_{m-1}(j) + SSE(j, i)``, with every ``SSE`` a difference of prefix sums. The
cost satisfies the quadrangle inequality, so the best ``j`` never moves left as ``i`` grows and never
lies left of the previous layer's (Knuth's bound): low layers divide and conquer over ``i``
(``O(n log n)`` each), high layers, whose candidate ranges are short, sweep ``i`` with both bounds, and
ranges of a few places are scored for four ``i`` at once. Since ``D_m`` never decreases in ``i``, the
cost of a cheap partition (two Lloyd steps) bounds the optimum and cuts every layer short where
``D_m`` exceeds it. Equal values are merged (their weights summed) before the DP, which shrinks it on
weights that repeat values, e.g. dequantized from a block grid or stored in bf16.

Every row gets the global optimum: the objective equals a brute-force DP's to round-off
(tests/test_kmeans.py). benchmarks/kmeans.py times it against scikit-learn's KMeans, which SqueezeLLM's
reference code runs per row, on SmolLM2's rows.

The solver is C++ (``kmeans_exact.cpp``, AVX2 where the compiler targets it), built on first use with
the system compiler into ``$SQLLM_CACHE/native`` (default ``~/.cache/sqllm/native``), keyed by the
source's hash, and called through ctypes: it needs no torch headers, so it builds in seconds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SqllmError

SOURCE = Path(__file__).with_name("kmeans_exact.cpp")


class NativeBuildError(SqllmError):
    """The k-means solver could not be compiled here."""


def _simd() -> bool:
    """Whether torch found AVX2 (with FMA) on this CPU; F16C comes with every such CPU."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


@functools.cache
def _native(simd: bool) -> ctypes.CDLL:
    """The compiled solver (AVX2 scans if ``simd``), built once per source and flags (a temporary file
    renamed into place, so concurrent first uses cannot see a half-written library).

    ``-ffp-contract=off``: no fused multiply-adds behind the source's back, so both builds round alike.
    """
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise NativeBuildError("the exact k-means needs a C++ compiler: install g++ (or set CXX)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
    flags += ["-mavx2", "-mfma", "-mf16c"] if simd else []
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    root = Path(os.environ.get("SQLLM_CACHE", Path.home() / ".cache" / "sqllm")) / "native"
    lib = root / f"kmeans_exact-{key}.so"
    if not lib.is_file():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                raise NativeBuildError(f"building {SOURCE.name} with {compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    dll.kmeans_rows.argtypes = [p, p, i64, i64, i32, i32, i32, p, p]
    dll.kmeans_rows.restype = None
    dll.kmeans_check.argtypes = [p, p, i64]
    dll.kmeans_check.restype = i32
    dll.kmeans_objective.argtypes = [p, p, p, p, i64, i64, i32, i32, p]
    dll.kmeans_objective.restype = i32
    return dll


def _check_shapes(x: Tensor, weight: Tensor | None, k: int) -> None:
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be [rows, n] with n >= 1, got shape {tuple(x.shape)}")
    if not 2 <= k <= 256:
        raise ValueError(f"k={k} is outside [2, 256] (codes are uint8)")
    if weight is not None and weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}")


def value_faults(x: Tensor, weight: Tensor | None = None) -> tuple[bool, bool]:
    """(whether ``x`` holds a NaN or an infinity, whether ``weight`` (same shape) holds a NaN, an infinity
    or a negative value; -0.0 is fine). For contiguous float32 CPU tensors the solver's library reads
    each value once (torch's isfinite, all and min take four passes, a tenth of the k-means at 3 bits)."""
    if weight is not None and weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}")
    tensors = [x] + ([] if weight is None else [weight])
    if all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        bad = _native(_simd()).kmeans_check(x.data_ptr(), None if weight is None else weight.data_ptr(), x.numel())
        return bool(bad & 1), bool(bad & 2)
    bad_w = weight is not None and not bool((torch.isfinite(weight) & (weight >= 0)).all())
    return not bool(torch.isfinite(x).all()), bad_w


def weighted_kmeans(x: Tensor, weight: Tensor | None, k: int, *, fp16: bool = False) -> tuple[Tensor, Tensor]:
    """Optimal weighted 1-D k-means of every row of ``x: [rows, n]`` with ``weight: [rows, n] >= 0``.

    Minimises ``sum_i weight_i (x_i - c(x_i))^2`` per row (SqueezeLLM Eq. 4) exactly; ``weight=None``
    or an all-zero row means unweighted. ``fp16=True`` rounds the centroids to float16 values before
    codes are assigned, so codes are nearest for the centroids returned (a stored fp16 table
    reproduces them). Values run through float32; runs on ``torch.get_num_threads()`` threads.

    Returns ``centroids: [rows, k]`` (dtype of ``x``, sorted ascending; with fewer than ``k`` distinct
    weighted values the spare centroids repeat the largest) and ``codes: [rows, n]`` uint8, the index
    of a nearest centroid (of the lower one where a value lies exactly between two).
    """
    _check_shapes(x, weight, k)
    device, dtype = x.device, x.dtype
    rows, n = x.shape
    x32 = x.detach().to("cpu", torch.float32).contiguous()
    w32 = None if weight is None else weight.detach().to("cpu", torch.float32).contiguous()
    centroids = torch.empty(rows, k, dtype=torch.float32)
    codes = torch.empty(rows, n, dtype=torch.uint8)
    if rows:
        bad_x, bad_w = value_faults(x32, w32)
        if bad_x:
            raise ValueError("x has NaN or infinite values")
        if bad_w:
            raise ValueError("k-means weights must be finite and >= 0")
        w32 = torch.zeros_like(x32) if w32 is None else w32
        _native(_simd()).kmeans_rows(x32.data_ptr(), w32.data_ptr(), rows, n, k, int(fp16), torch.get_num_threads(),
                                     centroids.data_ptr(), codes.data_ptr())
    return centroids.to(device, dtype), codes.to(device)


def nearest_codes(x: Tensor, centroids: Tensor) -> Tensor:
    """uint8 index of the nearest of the sorted ``centroids: [rows, k]`` for every value of ``x: [rows, n]``."""
    mid = (centroids[:, :-1] + centroids[:, 1:]) / 2
    return torch.searchsorted(mid.contiguous(), x.to(mid.dtype).contiguous()).to(torch.uint8)


_FLOAT32_EXACT = (torch.float32, torch.bfloat16, torch.float16)  # dtypes whose values float32 holds exactly


def weighted_kmeans_objective(x: Tensor, weight: Tensor | None, centroids: Tensor, codes: Tensor) -> Tensor:
    """``[rows]`` float64 ``sum_i weight_i (x_i - centroids[codes_i])^2`` (``weight=None``: all ones) of
    ``x: [rows, n]``, ``centroids: [rows, k]``, ``codes: [rows, n]``.

    Every term is formed in float64. On the CPU, with uint8 codes and float32 (or narrower) values, the
    solver's library sums each row in one pass in column order; torch's float64 path, for everything
    else, takes six passes and a [rows, n] int64 copy of the codes (most of SqueezeLLM's time on a 7B
    model's matrices). The two agree to float64 round-off.
    """
    if codes.shape != x.shape or centroids.dim() != 2 or centroids.shape[0] != x.shape[0]:
        raise ValueError(f"codes {tuple(codes.shape)} and centroids {tuple(centroids.shape)} do not fit x "
                         f"{tuple(x.shape)}: want codes [rows, n] and centroids [rows, k]")
    if weight is not None and weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from x shape {tuple(x.shape)}")
    tensors = [x, centroids] + ([] if weight is None else [weight])
    native = (codes.dtype == torch.uint8 and all(t.device.type == "cpu" for t in [codes, *tensors])
              and all(t.dtype in _FLOAT32_EXACT for t in tensors) and x.numel() > 0)
    if not native:
        err = (x.to(torch.float64) - centroids.to(torch.float64).gather(1, codes.long())) ** 2
        return err.sum(1) if weight is None else (weight.to(torch.float64) * err).sum(1)
    x32, c32, q = x.detach().float().contiguous(), centroids.detach().float().contiguous(), codes.contiguous()
    w32 = None if weight is None else weight.detach().float().contiguous()
    (rows, n), k = x.shape, centroids.shape[1]
    out = torch.empty(rows, dtype=torch.float64)
    if _native(_simd()).kmeans_objective(x32.data_ptr(), None if w32 is None else w32.data_ptr(), c32.data_ptr(),
                                         q.data_ptr(), rows, n, k, torch.get_num_threads(), out.data_ptr()):
        raise ValueError(f"codes index {k} centroids per row; some codes are {k} or more")
    return out
