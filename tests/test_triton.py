"""Triton kernels under Triton's CPU interpreter, against the reference dequantization.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so this module sets it before it imports the
kernels module (every tensor here lives on the CPU). Skipped when Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton")

import sqllm
from conftest import tiny_model
from sqllm.codes import QuantizedMatrix, SparseOutliers
from sqllm.formats import matrix_meta, pack_matrix, unpack_matrix
from sqllm.formats.bitpack import pack_codes, unpack_codes
from sqllm.formats.layouts import group_columns
from sqllm.formats.sparse import coo_to_csr
from sqllm.nn.kernels import triton_kernels as tk
from sqllm.nn.qlinear import QuantLinear, replace_linear
from test_layouts import lut_matrix, outliers, uniform_matrix

OUT, N = 37, 203  # odd row count, columns not a multiple of any tile


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's tiles (partial and multiple blocks on these small shapes), not the interpreter's."""
    monkeypatch.setattr(tk, "LARGE_INTERPRETER_TILES", False)


def triton_product(qm: QuantizedMatrix, x: torch.Tensor, value_dtype: torch.dtype = torch.float16,
                   split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` of the packed ``qm`` through the kernels alone: ``[m, out]`` float32."""
    t, meta = pack_matrix(qm, "", value_dtype), matrix_meta(qm, value_dtype)
    n = meta.shape[1]
    if meta.kind == "lut":
        y = tk.lut_mm(x, t["qweight"], t["lut"], meta.bits, n, split_k=split_k)
    elif meta.mixed_cols is None:
        gid = torch.arange(meta.n_groups)
        y = tk.uniform_mm(x, t["qweight"], t["scales"], t["zeros"], gid, meta.group_size, meta.bits, n, split_k)
    else:
        gb = t["group_bits"].long()
        y = torch.zeros(x.shape[0], meta.shape[0])
        for b, cols in meta.mixed_cols:
            idx = group_columns(gb, meta.group_size, n, b)
            gid = torch.nonzero(gb == b).flatten()
            y += tk.uniform_mm(x[:, idx], t[f"qweight_b{b}"], t["scales"], t["zeros"], gid, meta.group_size,
                               b, cols, split_k)
    if meta.nnz:
        y += tk.csr_mm(x, t["sp_crow"], t["sp_col"], t["sp_val"])
    return y


def reference_weights(qm: QuantizedMatrix, value_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense, sparse)`` weights ``[out, in]`` float32 after a pack/unpack round trip."""
    back = unpack_matrix(pack_matrix(qm, "", value_dtype), "", matrix_meta(qm, value_dtype))
    sparse = back.sparse.to_dense() if back.sparse is not None else torch.zeros(back.shape)
    return back.dense.dequantize(), sparse


def assert_product(y: torch.Tensor, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``y == x @ (dense + sparse)^T`` within float32 summation round-off, with the dense weight rounded
    to ``x``'s dtype on the tl.dot path (more than ``DECODE_MAX`` tokens) as the kernels document; the
    outliers are always multiplied in float32.

    Bound: ``2n * eps * (|x| @ |w|^T)``, the worst case of the float32 sums (n terms, plus the sparse
    terms added to them); one wrong weight misses it by orders of magnitude.
    """
    dense, sparse = weights
    if x.shape[0] > tk.DECODE_MAX and x.dtype != torch.bfloat16:  # the interpreter runs bf16 in fp32
        dense = dense.to(x.dtype).float()
    xd, wd = x.double(), dense.double() + sparse.double()
    ref = xd @ wd.T
    bound = 2 * x.shape[1] * torch.finfo(torch.float32).eps * (xd.abs() @ wd.abs().T)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert bool((err <= bound + 1e-30).all()), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


@pytest.mark.parametrize("bits", range(1, 9))
def test_code_reader_is_bit_exact(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (OUT, N), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(tk.unpack_codes(packed, bits, N), codes)
    assert torch.equal(unpack_codes(packed, bits, N), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_weight_is_bit_exact(bits: int) -> None:
    qm = lut_matrix(bits, OUT, N, bits)
    t = pack_matrix(qm, "", torch.float16)
    assert torch.equal(tk.lut_dequant(t["qweight"], t["lut"], bits, N), qm.dense.dequantize())


@pytest.mark.parametrize("bits, group_size", [(2, 64), (3, 48), (4, N), (8, 64), (5, 10)])
def test_uniform_weight_is_bit_exact(bits: int, group_size: int) -> None:
    qm = uniform_matrix(bits, OUT, N, group_size, [bits])
    t, meta = pack_matrix(qm, "", torch.float16), matrix_meta(qm, torch.float16)
    w = tk.uniform_dequant(t["qweight"], t["scales"], t["zeros"], torch.arange(meta.n_groups), group_size, bits, N)
    assert torch.equal(w, qm.dense.dequantize())


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_products(bits: int, tokens: int) -> None:
    qm = lut_matrix(10 + bits, OUT, N, bits, nnz=(OUT * N) // 200, value_dtype=torch.float16)  # 0.5%
    x = torch.randn(tokens, N, generator=torch.Generator().manual_seed(tokens))
    assert_product(triton_product(qm, x), x, reference_weights(qm))


# Group sizes: one tile per group (64 divides into the 64/128-column tiles), groups that cut tiles with
# a partial last group (48, 100), per channel (N).
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("bits, group_size", [(2, 64), (3, 48), (4, 64), (4, N), (8, 100)])
def test_uniform_products(bits: int, group_size: int, tokens: int) -> None:
    qm = uniform_matrix(20 + bits, OUT, N, group_size, [bits])
    x = torch.randn(tokens, N, generator=torch.Generator().manual_seed(tokens))
    assert_product(triton_product(qm, x), x, reference_weights(qm))


@pytest.mark.parametrize("tokens", [2, 20])
@pytest.mark.parametrize("widths, group_size", [([1, 2, 3], 64), ([2, 3, 4, 8], 16)])
def test_mixed_precision_with_outliers(widths: list[int], group_size: int, tokens: int) -> None:
    """SliM-LLM layout: one packed part per width, each indexing its own groups, plus CSR outliers."""
    qm = uniform_matrix(30 + tokens, OUT, N, group_size, widths, nnz=40)
    x = torch.randn(tokens, N, generator=torch.Generator().manual_seed(tokens))
    assert_product(triton_product(qm, x), x, reference_weights(qm))


def test_split_k_decode_matches() -> None:
    """Several programs per row block (as on a GPU with long rows), partial sums added in order."""
    qm = lut_matrix(5, 20, 400, 3)
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(5))
    y = triton_product(qm, x, split_k=128)  # 4 splits, the last one partial
    assert_product(y, x, reference_weights(qm))
    assert torch.equal(y, triton_product(qm, x, split_k=128))  # deterministic


@pytest.mark.parametrize("tokens", [3, 70])
def test_csr_outliers_alone(tokens: int) -> None:
    """Dense rows of outliers spanning many chunks, empty rows, several row and token blocks."""
    out, n = 70, 150
    sp = outliers(torch.Generator().manual_seed(tokens), out, n, 1000, torch.float32)
    keep = sp.rows % 7 != 3  # every 7th row empty
    crow, col, val = coo_to_csr(SparseOutliers(sp.rows[keep], sp.cols[keep], sp.values[keep], sp.shape),
                                torch.float32)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1))
    dense = torch.zeros(out, n)
    dense[sp.rows[keep], sp.cols[keep]] = sp.values[keep]
    assert_product(tk.csr_mm(x, crow, col, val), x, (torch.zeros(out, n), dense))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 24])
def test_low_precision_activations(dtype: torch.dtype, tokens: int) -> None:
    qm = lut_matrix(7, OUT, N, 3, nnz=25, value_dtype=dtype)
    x = torch.randn(tokens, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    assert_product(triton_product(qm, x, value_dtype=dtype), x, reference_weights(qm, dtype))


def test_bad_inputs_name_the_tensor() -> None:
    qm = lut_matrix(0, 4, 40, 3)
    t = pack_matrix(qm, "", torch.float16)
    with pytest.raises(ValueError, match="qweight must be"):
        tk.lut_mm(torch.randn(1, 40), t["qweight"], t["lut"], 4, 40)
    with pytest.raises(ValueError, match="lut must be"):
        tk.lut_mm(torch.randn(1, 40), t["qweight"], t["lut"].float(), 3, 40)
    with pytest.raises(ValueError, match=r"x must be a float \[m, 40\]"):
        tk.lut_mm(torch.randn(1, 41), t["qweight"], t["lut"], 3, 40)
    with pytest.raises(ValueError, match="group_ids must be int64"):
        tk.uniform_mm(torch.randn(1, 40), t["qweight"], t["lut"], t["lut"], torch.arange(2), 16, 3, 40)


def op_args(qm: QuantizedMatrix, x: torch.Tensor) -> dict[str, tuple]:
    """Arguments of each ``torch.ops.sqllm`` op for the packed ``qm`` (one uniform part, or LUT)."""
    t, meta = pack_matrix(qm, "", torch.float16), matrix_meta(qm, torch.float16)
    n = meta.shape[1]
    args = {"csr_mm": (x, t["sp_crow"], t["sp_col"], t["sp_val"])} if meta.nnz else {}
    if meta.kind == "lut":
        args["lut_mm"] = (x, t["qweight"], t["lut"], meta.bits, n)
    else:
        args["uniform_mm"] = (x, t["qweight"], t["scales"], t["zeros"], torch.arange(meta.n_groups),
                              meta.group_size, meta.bits, n)
    return args


ROUTING = """
import os, sys, torch
sys.path[:0] = [os.environ["TESTS"]]
import sqllm.nn.kernels
from sqllm.nn.kernels import ops, triton_kernels as tk
from test_layouts import lut_matrix, uniform_matrix
from test_triton import op_args, OUT, N
x = torch.randn(3, N, generator=torch.Generator().manual_seed(0))
args = {**op_args(lut_matrix(1, OUT, N, 3, nnz=50, value_dtype=torch.float16), x),
        **op_args(uniform_matrix(2, OUT, N, 48, [4]), x)}
calls = []
for name in args:
    real = getattr(tk, name)
    setattr(tk, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
for name, a in args.items():
    torch.testing.assert_close(getattr(torch.ops.sqllm, name)(*a), getattr(ops, f"{name}_torch")(*a),
                               rtol=1e-5, atol=1e-5)
print(" ".join(sorted(calls)), sqllm.nn.kernels.kernels_registered())
"""


def test_ops_route_to_triton_when_forced() -> None:
    """A process started with ``SQLLM_KERNELS=triton``: the CPU dispatch of every op runs the Triton kernel
    (counted), agrees with the op's torch implementation, and the compiled CPU kernels never load. (The
    setting is read when the kernels first load, hence a fresh process.)"""
    env = {**os.environ, "SQLLM_KERNELS": "triton", "TRITON_INTERPRET": "1", "TESTS": str(Path(__file__).parent),
           "PYTHONPATH": str(Path(sqllm.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", ROUTING], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["csr_mm", "lut_mm", "uniform_mm", "False"]


def test_cpu_tensors_never_reach_triton_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    from sqllm.nn.kernels import triton_ops

    for setting in ("0", "1"):
        monkeypatch.setenv("SQLLM_KERNELS", setting)
        assert triton_ops.kernels_for(torch.device("cpu")) is None


def test_importing_sqllm_does_not_import_triton() -> None:
    """The kernels module (and with it Triton) loads only when a Triton product is first needed."""
    code = "import sys, sqllm.api, sqllm.nn.qlinear; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(sqllm.__file__).parents[1])})
    assert out.stdout.strip() == "False"


def test_forcing_triton_without_triton_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sqllm.errors import InvalidConfig
    from sqllm.nn.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_triton_module", lambda: None)
    monkeypatch.setenv("SQLLM_KERNELS", "triton")
    with pytest.raises(InvalidConfig, match=r"SQLLM_KERNELS=triton needs Triton.*pip install 'sqllm\[gpu\]'"):
        triton_ops.kernels_for(torch.device("cpu"))
    monkeypatch.setenv("SQLLM_KERNELS", "1")
    assert triton_ops.kernels_for(torch.device("cuda")) is None  # CUDA falls back to torch


def test_opcheck_with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.library's checks (schema, fake implementation, aliasing, autograd registration) pass with
    the Triton implementation behind the op."""
    import sqllm.nn.kernels  # noqa: F401

    monkeypatch.setenv("SQLLM_KERNELS", "triton")
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    for name, a in op_args(lut_matrix(3, 9, 40, 3, nnz=12, value_dtype=torch.float16), x).items():
        torch.library.opcheck(getattr(torch.ops.sqllm, name), a, test_utils=("test_schema", "test_faketensor"))


def packed_tiny_llama() -> torch.nn.Module:
    """The tiny LLaMA with every block linear packed, the three layouts the issue names side by side:
    attention SqueezeLLM LUT 3-bit + 0.45% outliers, gate/up SliM-LLM mixed 1/2/3-bit, down GPTQ 4-bit
    (groups of 16 columns, so that the 64-wide inputs hold several)."""
    model = tiny_model("llama")
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
               and ".layers." in name]
    for seed, (name, linear) in enumerate(linears):
        out, n = linear.weight.shape
        if "attn" in name:
            qm = lut_matrix(seed, out, n, 3, nnz=round(0.0045 * out * n))
        elif "down" in name:
            qm = uniform_matrix(seed, out, n, 16, [4])
        else:
            qm = uniform_matrix(seed, out, n, 16, [1, 2, 3])
        replace_linear(model, name, QuantLinear.from_matrix(qm, linear.bias))
    return model


@pytest.mark.parametrize("tokens", [1, 16])
def test_packed_model_forward_matches_torch_path(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole packed model: logits with ``SQLLM_KERNELS=triton`` within 1e-3 (relative, Frobenius) of
    ``SQLLM_KERNELS=0``, and Triton computed every packed product."""
    from sqllm.nn.kernels import torch_path, triton_path

    model = packed_tiny_llama()
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad(), torch_path():
        ref = model(ids).logits
    calls = []
    for name in ("lut_mm", "uniform_mm", "csr_mm"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setenv("SQLLM_KERNELS", "triton")
    with torch.no_grad(), triton_path():
        got = model(ids).logits
    metas = [m.meta for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(calls) == sum(len(m.mixed_cols or [0]) + bool(m.nnz) for m in metas)
    assert set(calls) == {"lut_mm", "uniform_mm", "csr_mm"}
    assert float((got - ref).norm() / ref.norm()) < 1e-3


def test_gpu_benchmark_runs_tiny(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/gpu.py --tiny`` runs every layout and the end-to-end rows under the interpreter (the
    packed model's products through Triton, even where the compiled CPU kernels are loaded) and writes
    its JSON and markdown."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(tk, "LARGE_INTERPRETER_TILES", True)  # the interpreter's fast tiles, as the script runs
    for var in ("SQLLM_KERNELS", "TRITON_INTERPRET"):  # main() sets them; restored after the test
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--tiny", "--results", str(tmp_path)])
    e2e_calls: list[str] = []  # Triton products of the end-to-end models (the layer rows call Triton directly)
    e2e_rows = bench.e2e_rows

    def counted_e2e(*args):
        for name in ("lut_mm", "uniform_mm", "csr_mm"):
            real = getattr(tk, name)
            monkeypatch.setattr(tk, name, lambda *a, real=real, name=name: e2e_calls.append(name) or real(*a))
        return e2e_rows(*args)

    monkeypatch.setattr(bench, "e2e_rows", counted_e2e)
    bench.main()
    assert set(e2e_calls) == {"lut_mm"}  # the packed model's LUT products went through Triton
    doc = json.loads((tmp_path / "gpu-tiny.json").read_text())
    cfg = bench.TINY
    expected = {(tuple(s), m, name) for s in cfg["shapes"] for m in cfg["batches"] + [cfg["prefill"]]
                for name in ["fp16 torch.matmul"] + [layout.name for layout in bench.LAYOUTS]}
    assert {(tuple(r["shape"]), r["tokens"], r["layout"]) for r in doc["layers"]} == expected
    assert [r["model"] for r in doc["e2e"]] == ["fp16", *cfg["layouts"]]
    assert all(r["seconds"] > 0 for r in doc["layers"]) and all(r["decode_tok_s"] > 0 for r in doc["e2e"])
    assert "say nothing about GPU speed" in (tmp_path / "gpu-tiny.md").read_text()
