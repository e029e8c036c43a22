"""The bf16 prefill of the compiled CPU kernels (bf16 x of 9+ tokens on a CPU with AVX-512 and native
bf16): every layout against the reference, odd shapes, partial groups and tiles, empty sparse rows.

Error bound. The path rounds each dequantized weight to bf16 (relative error <= u = 2**-8, round to
nearest), multiplies in bf16 with fp32 accumulation (<= n * 2**-24 relative to the sum of |terms| for
any summation order), and rounds each op's output to bf16 (<= u). With ``A = |x| @ |W|^T`` (plus the
outliers' terms), one op is within ``(2u + n * 2**-24) * A`` of the exact product; a layer adds at most
one rounding per uniform width (each op's output) and one for its own bf16 output, and
``reference_forward`` rounds its output once more, so a layer of P parts is within
``((P + 3) u + n * 2**-24) * A`` of ``reference_forward``. Tighter, the op's output must equal the fp32
product of bf16-rounded weights up to one bf16 ulp of the output and the fp32 accumulation: that
checks that the kernel rounds the reference's own weights (any other weight would miss by more).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from sqllm.codes import QuantizedMatrix, UniformCodes, expand_groups
from sqllm.formats import pack_matrix
from sqllm.nn import QuantLinear, kernels
from sqllm.nn.kernels import cpu_kernels
from test_layouts import lut_matrix, lut_rows_matrix, uniform_matrix, uniform_op_case

U = 2.0**-8  # unit round-off of bf16

pytestmark = pytest.mark.skipif(
    cpu_kernels() is None or not cpu_kernels().prefill_in_bf16(),
    reason="no compiled kernels, or no AVX-512 with native bf16 (prefill stays fp32 there)",
)

TOKENS = [9, 40]  # the fewest the bf16 prefill takes, and more


@pytest.fixture(params=["default tile", "3-row tiles"])
def tile(request: pytest.FixtureRequest) -> Iterator[None]:
    """The default tile, or tiles of a few rows so that most layers span many, the last one partial."""
    k = cpu_kernels()
    previous = k.set_prefill(0, 0)
    k.set_prefill(0, previous[1] if request.param == "default tile" else 3 * 256)  # <= 128-col rows: 3 rows
    try:
        yield
    finally:
        k.set_prefill(*previous)


def magnitudes(qm: QuantizedMatrix, x: torch.Tensor) -> torch.Tensor:
    """``A [m, out] = |x| @ |W|^T`` with W the dense codes plus the outliers."""
    mag = qm.dequantize().abs()
    return x.float().abs() @ mag.T


def bf16_product(x: torch.Tensor, qm: QuantizedMatrix) -> torch.Tensor:
    """The fp32 product of x with the bf16-rounded dense weight (no outliers): [m, out] fp32."""
    return x.float() @ qm.dense.dequantize().bfloat16().float().T


def assert_rounds_the_reference_weights(y: torch.Tensor, x: torch.Tensor, qm: QuantizedMatrix) -> None:
    """y (one op's output) against the fp32 product of bf16-rounded weights: one bf16 ulp of the output
    (2u of it; the two sums may round to either neighbour) plus twice the fp32 accumulation bound."""
    n = x.shape[1]
    emulated = bf16_product(x, qm)
    a = magnitudes(QuantizedMatrix(qm.dense, None), x)
    bound = 2 * U * emulated.abs() + 2 * n * 2.0**-24 * a + 1e-30
    assert y.dtype == torch.float32 and y.shape == emulated.shape
    assert bool(((y - emulated).abs() <= bound).all()), float(((y - emulated).abs() - bound).max())


def assert_within_bf16_bound(y: torch.Tensor, expected: torch.Tensor, a: torch.Tensor, roundings: int,
                             n: int) -> None:
    bound = (roundings * U + n * 2.0**-24) * a + 1e-30
    diff = (y.float() - expected.float()).abs()
    assert bool((diff <= bound).all()), float((diff - bound).max())


LUT_SHAPES = [(37, 100), (33, 577), (5, 9), (16, 64), (7, 200), (3, 1000)]


@pytest.mark.parametrize("bits", range(1, 9))  # 1..4: the vpermw reader; wider: rows in fp32, rounded
@pytest.mark.parametrize("shape", LUT_SHAPES)
def test_lut_prefill_rounds_the_reference_weights(bits: int, shape: tuple[int, int], tile: None) -> None:
    out, n = shape
    qm = lut_matrix(100 * bits + n, out, n, bits)
    t = pack_matrix(qm, "", torch.float32)
    for m in TOKENS:
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(m)).bfloat16()
        y = cpu_kernels().lut_mm(x, t["qweight"], t["lut"], bits, n)
        assert_rounds_the_reference_weights(y, x, qm)
        assert_within_bf16_bound(y, x.float() @ qm.dequantize().T, magnitudes(qm, x), 2, n)


UNIFORM = [  # (out, n, group_size): partial last groups, per-channel, g64 halves (a last group ending
    # mid-super-chunk, one past the last column), g192 across super-chunks, and groups the vpermw reader
    # does not take (8, 20, 32: rows in fp32, rounded)
    (37, 100, 32), (37, 100, 100), (9, 600, 64), (11, 640, 128), (7, 200, 8), (5, 130, 256),
    (6, 100, 20), (4, 300, 64), (6, 448, 192), (3, 1000, 256),
]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("case", UNIFORM, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}")
def test_uniform_prefill_rounds_the_reference_weights(bits: int, case: tuple[int, int, int], tile: None) -> None:
    qm, args = uniform_op_case(bits, *case)
    n = case[1]
    for m in TOKENS:
        x = torch.randn(m, n, generator=torch.Generator().manual_seed(m)).bfloat16()
        y = cpu_kernels().uniform_mm(x, *args)
        assert_rounds_the_reference_weights(y, x, qm)
        assert_within_bf16_bound(y, x.float() @ qm.dequantize().T, magnitudes(qm, x), 2, n)


@pytest.mark.parametrize("group_size", [64, 128])
def test_uniform_prefill_reads_group_ids(group_size: int, tile: None) -> None:
    """A part whose groups use scattered columns of scales/zeros, as one width of a mixed layer does."""
    qm = uniform_matrix(7, 13, 3 * group_size, group_size, [3])
    t = pack_matrix(qm, "", torch.float32)
    scales, zeros = torch.rand(13, 21).half() * 0.1, torch.randn(13, 21).half()
    ids = torch.tensor([5, 20, 3])
    x = torch.randn(12, 3 * group_size).bfloat16()
    y = cpu_kernels().uniform_mm(x, t["qweight"], scales, zeros, ids, group_size, 3, 3 * group_size)
    d = qm.dense
    picked = UniformCodes(d.codes, scales[:, ids].float(), zeros[:, ids].float(), d.group_bits, group_size)
    assert_rounds_the_reference_weights(y, x, QuantizedMatrix(picked, None))


LAYERS = {  # (matrix, uniform parts): every layout QuantLinear runs, with outliers (some rows empty)
    "lut3": (lambda: lut_matrix(0, 37, 100, 3), 1),
    "lut4+sparse": (lambda: lut_matrix(1, 37, 577, 4, nnz=90), 1),
    "lut3+sparse bf16": (lambda: lut_matrix(2, 40, 300, 3, nnz=20, value_dtype=torch.bfloat16), 1),
    "uniform4 g128 partial": (lambda: uniform_matrix(3, 37, 700, 128, [4]), 1),
    "uniform4 g32 partial+sparse": (lambda: uniform_matrix(4, 37, 100, 32, [4], nnz=5), 1),
    "SliM 1-3 g64 partial": (lambda: uniform_matrix(5, 40, 600, 64, [1, 2, 3]), 3),
    "mixed 1-4 g16 partial": (lambda: uniform_matrix(6, 37, 100, 16, [1, 2, 3, 4]), 4),
    "mixed 2,8 g128+sparse": (lambda: uniform_matrix(7, 20, 700, 128, [2, 8], nnz=9), 2),
    "lut rows 2-4+sparse": (lambda: lut_rows_matrix(8, 37, 577, [2, 3, 4], nnz=20), 1),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("tokens", TOKENS + [256])
def test_layer_prefill_matches_reference_forward(kind: str, tokens: int, tile: None) -> None:
    make, parts = LAYERS[kind]
    qm = make()
    out, n = qm.shape
    value_dtype = torch.bfloat16 if "bf16" in kind else torch.float32
    module = QuantLinear.from_matrix(qm, torch.randn(out).bfloat16(), value_dtype=value_dtype)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, out)
    a = magnitudes(qm, x) + module.bias.float().abs()
    assert_within_bf16_bound(y, module.reference_forward(x), a, parts + 3, n)


def test_fp32_and_fp16_activations_keep_fp32() -> None:
    """Only bf16 x takes the bf16 prefill: fp32 and fp16 x keep the fp32 product (fp32 round-off)."""
    qm = uniform_matrix(9, 21, 256, 64, [4])
    t = pack_matrix(qm, "", torch.float32)
    d = qm.dense
    n = 256
    offsets = (expand_groups(d.scales, 64, n) * expand_groups(d.zeros, 64, n)).abs()
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(40, n).to(dtype)
        y = cpu_kernels().uniform_mm(x, t["qweight"], t["scales"], t["zeros"], torch.arange(4), 64, 4, n)
        scale = x.float().abs() @ (qm.dequantize().abs() + offsets).T
        assert bool(((y - x.float() @ qm.dequantize().T).abs() <= 1e-6 * scale + 1e-30).all())


def test_settings_choose_the_path() -> None:
    """Below the token threshold, or with the AVX2 kernels chosen, bf16 x keeps the fp32 product; the
    threshold never reaches into decode (8 tokens or fewer)."""
    k = cpu_kernels()
    qm = lut_matrix(3, 33, 577, 3)
    t = pack_matrix(qm, "", torch.float32)
    x = torch.randn(40, 577).bfloat16()
    args = (t["qweight"], t["lut"], 3, 577)
    exact = x.float() @ qm.dequantize().T
    fp32_bound = 1e-6 * magnitudes(qm, x) + 1e-30
    previous = k.set_prefill(41, 0)
    try:
        assert bool(((k.lut_mm(x, *args) - exact).abs() <= fp32_bound).all())
        assert k.set_prefill(1, 0)[0] == 41 and k.set_prefill(0, 0)[0] == 9  # clamped past decode
    finally:
        k.set_prefill(*previous)
    with kernels.cpu_isa("avx2"):
        assert not k.prefill_in_bf16()
        assert bool(((k.lut_mm(x, *args) - exact).abs() <= fp32_bound).all())
    assert_rounds_the_reference_weights(k.lut_mm(x, *args), x, qm)
