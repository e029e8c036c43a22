"""The ``torch.ops.sqllm`` ops: the compiled CPU kernels (AVX2, and AVX-512 where the CPU has it) against
the pure-torch implementation and the dense reference on every layout (odd shapes, partial groups, empty
sparse rows), the fallbacks, the op registrations (fake, autograd) and ``torch.compile`` of a packed
model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from sqllm.codes import QuantizedMatrix, UniformCodes, expand_groups
from sqllm.formats import pack_matrix
from sqllm.nn import QuantLinear, kernels
from sqllm.nn.kernels import cpu_kernels, ops
from test_layouts import lut_matrix, uniform_matrix, uniform_op_case

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no AVX2, no C++ compiler, or SQLLM_KERNELS=0")


@pytest.fixture(params=["avx2", "avx512"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test with the compiled decode kernels of each instruction set (AVX-512 where the CPU has
    it; the layouts it does not take fall through to the AVX2 kernels, as in use)."""
    try:
        with kernels.cpu_isa(request.param):
            yield request.param
    except RuntimeError as exc:
        if "no AVX-512" not in str(exc):
            raise
        pytest.skip("no AVX-512 F/BW/VL here")


def term_scale(qm: QuantizedMatrix, x: torch.Tensor) -> torch.Tensor:
    """``[m, out]``: sum over j of |x_j| times the magnitude of the terms a kernel may add for weight j
    (|w|, plus |s * z| for uniform codes, whose zero point the kernels apply per group). fp32 round-off
    of any summation order stays below 1e-6 of it for these row lengths."""
    d = qm.dense
    mag = d.dequantize().abs()
    if isinstance(d, UniformCodes):
        n = d.codes.shape[1]
        mag = mag + (expand_groups(d.scales, d.group_size, n) * expand_groups(d.zeros, d.group_size, n)).abs()
    if qm.sparse is not None:
        mag = mag + qm.sparse.to_dense().abs()
    return x.float().abs() @ mag.T


def assert_round_off(y: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> None:
    assert y.shape == expected.shape and y.dtype == torch.float32
    assert bool(((y - expected).abs() <= 1e-6 * scale + 1e-30).all()), float(((y - expected).abs() / scale).max())


TOKENS = [1, 2, 3, 5, 8, 9, 33]  # decode kernels take 1..8 tokens; more is prefill
LUT_SHAPES = [(37, 100), (33, 577), (5, 9), (16, 64), (7, 200)]  # rows ending mid-word, mid-chunk, mid-block


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))  # 1..4: vector readers; wider: the scalar reader
@pytest.mark.parametrize("shape", LUT_SHAPES)
def test_lut_kernel_matches_reference(bits: int, shape: tuple[int, int], isa: str) -> None:
    out, n = shape
    qm = lut_matrix(100 * bits + n, out, n, bits)
    t = pack_matrix(qm, "", torch.float32)
    w = qm.dequantize()
    for m in TOKENS:
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
        y = cpu_kernels().lut_mm(x, t["qweight"], t["lut"], bits, n)
        assert_round_off(y, x @ w.T, term_scale(qm, x))
        assert_round_off(y, ops.lut_mm_torch(x, t["qweight"], t["lut"], bits, n), term_scale(qm, x))


UNIFORM = [  # (out, n, group_size): partial last groups, per-channel, groups that split super-chunks,
    # and group sizes the vector readers do not take (20, 12: the scalar reader). AVX-512 takes groups of
    # 64k columns: g64 with a last group that ends mid-super-chunk (600) and one past the last column
    # (300), g192 straddling 128-column super-chunks, g256 with a partial last group.
    (37, 100, 32), (37, 100, 100), (9, 600, 64), (11, 640, 128), (7, 200, 8), (5, 130, 256), (6, 72, 24),
    (6, 100, 20), (5, 50, 12), (4, 300, 64), (6, 448, 192), (3, 1000, 256),
]


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("case", UNIFORM, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}")
def test_uniform_kernel_matches_reference(bits: int, case: tuple[int, int, int], isa: str) -> None:
    qm, args = uniform_op_case(bits, *case)
    w, n = qm.dequantize(), case[1]
    for m in TOKENS:
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
        y = cpu_kernels().uniform_mm(x, *args)
        assert_round_off(y, x @ w.T, term_scale(qm, x))
        assert_round_off(y, ops.uniform_mm_torch(x, *args), term_scale(qm, x))


@needs_kernels
@pytest.mark.parametrize("group_size", [64, 128])
def test_uniform_kernel_reads_group_ids(group_size: int, isa: str) -> None:
    """A part whose groups use scattered columns of scales/zeros (as one width of a mixed layer does),
    among more columns than 16 (AVX-512 widens them 16 at a time)."""
    qm = uniform_matrix(7, 13, 3 * group_size, group_size, [3])
    t = pack_matrix(qm, "", torch.float32)
    scales = torch.randn(13, 21).half()
    zeros = torch.randn(13, 21).half()
    ids = torch.tensor([5, 20, 3])
    x = torch.randn(4, 3 * group_size)
    args = (t["qweight"], scales, zeros, ids, group_size, 3, 3 * group_size)
    expected = ops.uniform_mm_torch(x, *args)
    qm.dense.scales, qm.dense.zeros = scales[:, ids].float(), zeros[:, ids].float()
    assert_round_off(cpu_kernels().uniform_mm(x, *args), expected, term_scale(qm, x))


@needs_kernels
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_csr_kernel_matches_reference(value_dtype: torch.dtype) -> None:
    """Most rows empty, a few with several outliers; also a matrix with no outliers at all."""
    qm = lut_matrix(3, 41, 150, 2, nnz=30, value_dtype=value_dtype)
    t = pack_matrix(qm, "", value_dtype)
    dense = qm.sparse.to_dense()
    for m in TOKENS:
        x = torch.randn(m, 150)
        y = cpu_kernels().csr_mm(x, t["sp_crow"], t["sp_col"], t["sp_val"])
        assert_round_off(y, x @ dense.T, x.abs() @ dense.abs().T)
    empty = (torch.zeros(6, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=value_dtype))
    assert torch.equal(cpu_kernels().csr_mm(torch.randn(3, 8), *empty), torch.zeros(3, 5))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_take_half_activations(dtype: torch.dtype, isa: str) -> None:
    """fp16/bf16 x is widened exactly; the product is the fp32 one of the widened x (bf16 prefill where
    the CPU multiplies bf16 natively rounds the weights to bf16 instead: tests/test_prefill.py)."""
    qm = uniform_matrix(2, 21, 256, 64, [4])
    t = pack_matrix(qm, "", torch.float32)
    ids = torch.arange(4)
    bf16_prefill = dtype == torch.bfloat16 and cpu_kernels().prefill_in_bf16()
    for m in (1, 8) if bf16_prefill else (1, 12):
        x = torch.randn(m, 256).to(dtype)
        y = cpu_kernels().uniform_mm(x, t["qweight"], t["scales"], t["zeros"], ids, 64, 4, 256)
        assert_round_off(y, x.float() @ qm.dequantize().T, term_scale(qm, x))


@needs_kernels
def test_isa_choice_reaches_the_kernels() -> None:
    """``cpu_isa`` switches the decode kernels and restores the previous choice; on an AVX-512 CPU the two
    paths sum in different orders, so their outputs differ in the last bits (within round-off)."""
    k = cpu_kernels()
    qm = lut_matrix(1, 40, 577, 3)
    t = pack_matrix(qm, "", torch.float32)
    x = torch.randn(1, 577)
    before = k.isa()
    with kernels.cpu_isa("avx2"):
        assert k.isa() == "avx2"
        y2 = k.lut_mm(x, t["qweight"], t["lut"], 3, 577)
    assert k.isa() == before
    with pytest.raises(RuntimeError, match="isa must be 'avx2' or 'avx512', got 'sse'"):
        k.set_isa("sse")
    if before == "avx512":
        y512 = k.lut_mm(x, t["qweight"], t["lut"], 3, 577)
        assert not torch.equal(y512, y2)
        assert_round_off(y512, y2, term_scale(qm, x))


@needs_kernels
def test_kernels_reject_bad_inputs() -> None:
    qm = lut_matrix(0, 4, 64, 3)
    t = pack_matrix(qm, "", torch.float32)
    with pytest.raises(RuntimeError, match="qweight holds 6 words; 65 codes of 3 bits need 7"):
        cpu_kernels().lut_mm(torch.randn(1, 65), t["qweight"], t["lut"], 3, 65)
    with pytest.raises(RuntimeError, match=r"lut must be contiguous float16 \[4, 8\]"):
        cpu_kernels().lut_mm(torch.randn(1, 64), t["qweight"], t["lut"][:, :4].contiguous(), 3, 64)
    with pytest.raises(RuntimeError, match="group_size must be positive, got 0"):
        cpu_kernels().uniform_mm(torch.randn(1, 64), t["qweight"], torch.ones(4, 4).half(), torch.ones(4, 4).half(),
                                 torch.arange(4), 0, 3, 64)
    with pytest.raises(RuntimeError, match="group_ids must index the 2 columns"):
        cpu_kernels().uniform_mm(torch.randn(1, 64), t["qweight"], torch.ones(4, 2).half(), torch.ones(4, 2).half(),
                                 torch.tensor([0, 2]), 32, 3, 64)


def test_ops_check_their_inputs() -> None:
    """The pure-torch implementations (every device) name the bad value."""
    qm = lut_matrix(0, 4, 64, 3)
    t = pack_matrix(qm, "", torch.float32)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[out, 7\] for 65 codes of 3 bits"):
        ops.lut_mm_torch(torch.randn(1, 65), t["qweight"], t["lut"], 3, 65)
    with pytest.raises(ValueError, match=r"group_ids must be int64 \[2\]"):
        ops.uniform_mm_torch(torch.randn(1, 64), t["qweight"], torch.ones(4, 2).half(), torch.ones(4, 2).half(),
                             torch.arange(3), 32, 3, 64)


@needs_kernels
def test_op_dispatch_and_torch_path() -> None:
    """Once loaded, the kernels are the ops' CPU implementation (autograd included); ``torch_path()`` runs
    the torch implementation bit for bit, and leaving it restores the kernels."""
    qm = lut_matrix(5, 19, 130, 3, nnz=7)
    t = pack_matrix(qm, "", torch.float32)
    x = torch.randn(2, 130)
    args = (x, t["qweight"], t["lut"], 3, 130)
    sparse = (x, t["sp_crow"], t["sp_col"], t["sp_val"])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(torch.ops.sqllm.lut_mm(*args), cpu_kernels().lut_mm(*args))
            assert torch.equal(torch.ops.sqllm.csr_mm(*sparse), cpu_kernels().csr_mm(*sparse))
    assert kernels.kernels_registered()
    with kernels.torch_path():
        assert torch.equal(torch.ops.sqllm.lut_mm(*args), ops.lut_mm_torch(*args))
        assert torch.equal(torch.ops.sqllm.csr_mm(*sparse), ops.csr_mm_torch(*sparse))
    assert torch.equal(torch.ops.sqllm.lut_mm(*args), cpu_kernels().lut_mm(*args))


def test_without_kernels_the_ops_run_torch() -> None:
    """``SQLLM_KERNELS=0`` (or no AVX2, or no compiler) means nothing is built or registered: the ops run
    their torch implementation. A fresh process, since this one may have loaded the kernels."""
    script = (
        "import torch\n"
        "from sqllm.nn import kernels\n"
        "from sqllm.nn.kernels import ops\n"
        "from test_layouts import uniform_matrix\n"
        "from sqllm.formats import pack_matrix\n"
        "t = pack_matrix(uniform_matrix(8, 9, 70, 16, [4], nnz=12), '', torch.float32)\n"
        "x = torch.randn(3, 70)\n"
        "args = (x, t['qweight'], t['scales'], t['zeros'], torch.arange(5), 16, 4, 70)\n"
        "assert torch.equal(torch.ops.sqllm.uniform_mm(*args), ops.uniform_mm_torch(*args))\n"
        "sparse = (x, t['sp_crow'], t['sp_col'], t['sp_val'])\n"
        "assert torch.equal(torch.ops.sqllm.csr_mm(*sparse), ops.csr_mm_torch(*sparse))\n"
        "assert kernels.cpu_kernels() is None and not kernels.kernels_registered()\n"
    )
    env = {**os.environ, "SQLLM_KERNELS": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@needs_kernels
def test_kernels_env_chooses_avx2() -> None:
    """``SQLLM_KERNELS=avx2`` loads the kernels with the AVX2 decoders chosen (a fresh process)."""
    script = "from sqllm.nn.kernels import cpu_kernels\nassert cpu_kernels().isa() == 'avx2'\n"
    env = {**os.environ, "SQLLM_KERNELS": "avx2", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unbuildable_kernels_mean_none(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A failing build (no compiler, no ninja) logs a warning and leaves the torch path."""
    if not kernels.kernels_enabled():
        pytest.skip("no AVX2 here (or SQLLM_KERNELS=0): the build is never tried")
    import torch.utils.cpp_extension as ext

    def fail(**_: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "load_inline", fail)
    with caplog.at_level("WARNING", logger="sqllm.nn.kernels"):
        assert kernels.cpu_kernels.__wrapped__() is None
    assert "Ninja is required" in caplog.text and "torch path" in caplog.text


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 100), (4, 8), (1031, 77), (1, 3)])
def test_dense16_kernel_matches_widened_matmul(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """``dense16_mm`` (16-bit weights widened in registers) against the matmul with the weight widened in
    float64, to fp32 round-off, for every decode token count; odd widths take the scalar tail."""
    out, n = shape
    g = torch.Generator().manual_seed(out * n)
    w = torch.randn(out, n, generator=g).to(dtype)
    for tokens in range(1, 9):
        x = torch.randn(tokens, n, generator=g)
        got = cpu_kernels().dense16_mm(x, w)
        assert got.dtype == torch.float32 and got.shape == (tokens, out)
        expected = x.double() @ w.double().T
        scale = x.double().abs() @ w.double().abs().T
        assert bool(((got.double() - expected).abs() <= 1e-6 * n * scale + 1e-30).all())
    assert torch.equal(cpu_kernels().dense16_mm(x.bfloat16(), w), cpu_kernels().dense16_mm(x.bfloat16().float(), w))


@needs_kernels
def test_dense16_kernel_rejects_bad_inputs() -> None:
    w = torch.randn(16, 32).half()
    for x, weight, message in [
        (torch.randn(9, 32), w, "1..8 tokens"),
        (torch.randn(1, 31), w, "x must be a float"),
        (torch.randn(1, 32), w.float(), "float16 or bfloat16"),
        (torch.randn(1, 16), w.T, "contiguous"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            cpu_kernels().dense16_mm(x, weight)


@needs_kernels
def test_direct_kernels_follow_the_dispatcher() -> None:
    """``direct_kernels()`` is the compiled module exactly when a CPU call of the ops would run it: not
    inside ``torch_path()`` or ``triton_path()``, and again after them."""
    torch.ops.sqllm.csr_mm(torch.randn(1, 4), torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                           torch.zeros(0))  # a first CPU call loads the kernels
    assert kernels.direct_kernels() is cpu_kernels()
    with kernels.torch_path():
        assert kernels.direct_kernels() is None
        with kernels.torch_path():
            assert kernels.direct_kernels() is None
        assert kernels.direct_kernels() is None
    assert kernels.direct_kernels() is cpu_kernels()


@needs_kernels
def test_stream_sum_reads_every_element() -> None:
    t = torch.randn(100_003, dtype=torch.float64)
    assert cpu_kernels().stream_sum(t.float()) == pytest.approx(float(t.float().double().sum()), abs=1e-3)


def test_ops_pass_opcheck() -> None:
    """Schemas, fake implementations and autograd registrations agree with the real ones."""
    qm = uniform_matrix(9, 6, 40, 8, [2], nnz=5)
    t = pack_matrix(qm, "", torch.float16)
    x = torch.randn(3, 40)
    ops_and_args = [
        (torch.ops.sqllm.uniform_mm.default, (x, t["qweight"], t["scales"], t["zeros"], torch.arange(5), 8, 2, 40)),
        (torch.ops.sqllm.csr_mm.default, (x, t["sp_crow"], t["sp_col"], t["sp_val"])),
    ]
    qm = lut_matrix(9, 6, 40, 3)
    t = pack_matrix(qm, "", torch.float32)
    ops_and_args.append((torch.ops.sqllm.lut_mm.default, (x, t["qweight"], t["lut"], 3, 40)))
    for op, args in ops_and_args:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_gradient_flows_to_x() -> None:
    """dL/dx = dL/dy @ W for every op (the packed tensors get none)."""
    qm = uniform_matrix(4, 12, 48, 16, [2, 3], nnz=6)
    module = QuantLinear.from_matrix(qm)
    x = torch.randn(5, 48, requires_grad=True)
    grad_y = torch.randn(5, 12)
    module(x).backward(grad_y)
    assert torch.allclose(x.grad, grad_y @ qm.dequantize(), atol=1e-5)


def test_compiled_model_matches_eager() -> None:
    """``torch.compile`` of a model of packed layers gives the eager logits (fake implementations let it
    trace through the ops)."""
    torch.manual_seed(0)
    layers = [
        QuantLinear.from_matrix(lut_matrix(1, 48, 32, 3, nnz=10), torch.randn(48)),
        torch.nn.SiLU(),
        QuantLinear.from_matrix(uniform_matrix(2, 40, 48, 16, [2, 4])),
        torch.nn.SiLU(),
        QuantLinear.from_matrix(uniform_matrix(3, 24, 40, 8, [3], nnz=4)),
    ]
    model = torch.nn.Sequential(*layers).eval()
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)
