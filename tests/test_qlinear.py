"""QuantLinear: the ops path (kernels and torch code) against the dense reference, exact dequantization,
memory = packed size, the meta-device loading route, the module swap."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from sqllm.codes import QuantizedMatrix, UniformCodes
from sqllm.errors import CorruptCheckpoint
from sqllm.formats import matrix_meta, pack_matrix
from sqllm.nn import QuantLinear, kernels, quant_linear_from_meta, replace_linear
from sqllm.nn.kernels import ops
from test_layouts import lut_matrix, lut_rows_matrix, uniform_matrix

KINDS = {
    "lut3": lambda: lut_matrix(0, 37, 100, 3),
    "lut4+sparse": lambda: lut_matrix(1, 37, 100, 4, nnz=90),
    "lut8": lambda: lut_matrix(2, 5, 9, 8),
    "uniform4 g32 partial": lambda: uniform_matrix(3, 37, 100, 32, [4], nnz=5),
    "uniform3 per-channel": lambda: uniform_matrix(4, 37, 100, 100, [3]),
    "uniform3 g20 (groups split blocks)": lambda: uniform_matrix(5, 37, 100, 20, [3]),
    "mixed 1-4 g16 partial": lambda: uniform_matrix(6, 37, 100, 16, [1, 2, 3, 4]),
    "mixed 2,6 g12": lambda: uniform_matrix(7, 37, 100, 12, [2, 6], nnz=10),
    "lut rows 2-4+sparse": lambda: lut_rows_matrix(8, 37, 100, [2, 3, 4], nnz=10),
}


@pytest.fixture(params=list(KINDS))
def qm(request) -> QuantizedMatrix:
    return KINDS[request.param]()


@pytest.fixture(params=["ops", "torch path"])
def compute(request):
    """Run the forward through the registered ops (the CPU kernels where built) or their torch code."""
    return kernels.torch_path() if request.param == "torch path" else contextlib.nullcontext()


@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 64])
def test_forward_matches_dense_reference(qm: QuantizedMatrix, compute, tokens: int) -> None:
    out, n = qm.shape
    bias = torch.randn(out)
    module = QuantLinear.from_matrix(qm, bias)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    expected = x @ qm.dequantize().T + bias
    with compute:
        y = module(x)
    assert y.shape == (tokens, out) and y.dtype == x.dtype
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.allclose(module.reference_forward(x), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


MODULE_KINDS = {  # layers the kernels take whole: mixed widths, outliers in every dtype, partial groups
    "lut2+sparse": lambda: lut_matrix(10, 33, 577, 2, nnz=40),
    "lut4+sparse fp16": lambda: lut_matrix(12, 37, 100, 4, nnz=90, value_dtype=torch.float16),
    "uniform4 g32 partial+sparse": lambda: uniform_matrix(13, 37, 100, 32, [4], nnz=5),
    "mixed 1-4 g16 partial": lambda: uniform_matrix(15, 37, 100, 16, [1, 2, 3, 4]),
    "mixed 1-3 g64 partial": lambda: uniform_matrix(16, 40, 600, 64, [1, 2, 3]),
    "mixed 2,8 g128": lambda: uniform_matrix(17, 20, 700, 128, [2, 8], nnz=9),
    "lut rows 2-4+sparse": lambda: lut_rows_matrix(17, 37, 577, [2, 3, 4], nnz=20),
}


@pytest.mark.parametrize("kind", list(MODULE_KINDS))
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_module_ops_match_reference_forward(kind: str, tokens: int) -> None:
    """Every part of a layer (one ``uniform_mm`` per width, the outliers) against the reference forward."""
    qm = MODULE_KINDS[kind]()
    module = QuantLinear.from_matrix(qm, torch.randn(qm.shape[0]),
                                     value_dtype=torch.float16 if "fp16" in kind else torch.float32)
    x = torch.randn(2, tokens, qm.shape[1], generator=torch.Generator().manual_seed(tokens))  # leading dims kept
    expected = module.reference_forward(x)
    assert (module(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("tokens", [1, 8, 9])
def test_direct_kernel_calls_equal_the_ops(qm: QuantizedMatrix, tokens: int) -> None:
    """Without gradients, the forward calls the compiled kernels directly (:func:`kernels.direct_kernels`):
    bit for bit what the ``torch.ops.sqllm`` ops give; with a gradient wanted it goes through the ops."""
    if kernels.cpu_kernels() is None:
        pytest.skip("no compiled kernels here")
    out, n = qm.shape
    bias = torch.randn(out)
    module = QuantLinear.from_matrix(qm, bias)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    through_ops = module.packed_product(x) + bias
    assert kernels.direct_kernels() is kernels.cpu_kernels()
    assert torch.equal(module(x), through_ops)
    xg = x.clone().requires_grad_()
    y = module(xg)
    assert torch.equal(y.detach(), through_ops) and y.grad_fn is not None


def test_torch_path_tiles_cover_every_row(qm: QuantizedMatrix, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of a few rows (the last one partial), for decode and prefill, still give the full product."""
    module = QuantLinear.from_matrix(qm)
    w = qm.dequantize()
    with kernels.torch_path():
        for tile in (1, 300):
            monkeypatch.setattr(ops, "DECODE_TILE", tile)
            monkeypatch.setattr(ops, "PREFILL_TILE", 3 * tile)
            for tokens in (1, 8, 9):
                x = torch.randn(tokens, qm.shape[1])
                expected = x @ w.T
                assert (module(x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_column_maps_are_rebuilt_after_a_load() -> None:
    """A mixed layer's column maps are built once, and rebuilt after a state dict with another bit map
    (same widths and column counts, different groups)."""
    qm = uniform_matrix(20, 9, 96, 16, [2, 3])
    d = qm.dense
    flipped = UniformCodes(d.codes.flip(1).contiguous(), d.scales.flip(1).contiguous(), d.zeros.flip(1).contiguous(),
                           d.group_bits.flip(0).contiguous(), 16)
    other = QuantizedMatrix(flipped, None)
    assert not torch.equal(d.group_bits, flipped.group_bits)
    module = QuantLinear.from_matrix(qm)
    x = torch.randn(2, 96)
    assert torch.allclose(module(x), x @ qm.dequantize().T, atol=1e-5)
    parts = module._parts(x.device)
    assert module._parts(x.device) is parts
    module.load_state_dict(pack_matrix(other, "", torch.float32))
    assert torch.allclose(module(x), x @ other.dequantize().T, atol=1e-5)


def test_dequantize_weight_is_bit_exact(qm: QuantizedMatrix) -> None:
    assert torch.equal(QuantLinear.from_matrix(qm, value_dtype=torch.float32).dequantize_weight(), qm.dequantize())


def test_memory_is_the_packed_size(qm: QuantizedMatrix) -> None:
    bias = torch.randn(qm.shape[0], dtype=torch.bfloat16)
    module = QuantLinear.from_matrix(qm, bias)
    packed = pack_matrix(qm, "", torch.float32)
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    assert buffer_bytes == sum(t.numel() * t.element_size() for t in packed.values()) + 2 * qm.shape[0]
    assert not list(module.parameters())
    assert module.storage_bits()["total"] == 8 * (buffer_bytes - 2 * qm.shape[0])
    assert module.bits_per_weight() == module.storage_bits()["total"] / (qm.shape[0] * qm.shape[1])


def test_meta_skeleton_loads_through_state_dict() -> None:
    """The checkpoint route: a model skeleton on the meta device, swap, load_state_dict(assign=True)."""
    qm = uniform_matrix(0, 12, 40, 8, [2, 3], nnz=4)
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 12, bias=True))
    state = {"0.weight": model[0].weight.detach().clone(), "0.bias": model[0].bias.detach().clone()}
    bias = torch.randn(12)
    state |= pack_matrix(qm, "2.", torch.float16) | {"2.bias": bias}
    meta = matrix_meta(qm, torch.float16)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 12, bias=True))
    old = replace_linear(skeleton, "2", quant_linear_from_meta(meta.to_dict(), torch.float32, where="2"))
    assert isinstance(old, nn.Linear)
    skeleton.load_state_dict(state, assign=True, strict=True)
    assert torch.equal(skeleton[2].dequantize_weight(), qm.dequantize())
    x = torch.randn(3, 40)
    expected = torch.relu(model[0](x)) @ qm.dequantize().T + bias
    assert torch.allclose(skeleton(x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_activations_compute_in_bf16() -> None:
    qm = lut_matrix(0, 16, 64, 4, nnz=8, value_dtype=torch.bfloat16)
    module = QuantLinear.from_matrix(qm, torch.randn(16, dtype=torch.bfloat16), value_dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = module(x)
    expected = x.float() @ qm.dequantize().T + module.bias.float()
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_dense_cache_is_opt_in_and_dropped_on_load() -> None:
    qm, other = lut_matrix(0, 16, 64, 4), lut_matrix(1, 16, 64, 4)
    module = QuantLinear.from_matrix(qm)
    x = torch.randn(2, 64)
    assert module.dense_cache is None
    module.cache_dense_weight(torch.float32)
    assert torch.equal(module.dense_cache, qm.dequantize())
    assert torch.allclose(module(x), x @ qm.dequantize().T, atol=1e-5)
    module.load_state_dict(pack_matrix(other, "", torch.float32))
    assert module.dense_cache is None
    assert torch.allclose(module(x), x @ other.dequantize().T, atol=1e-5)


def test_replace_linear_checks_the_target() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 16, bias=False)))
    module = QuantLinear.from_matrix(lut_matrix(0, 16, 64, 2))
    with pytest.raises(ValueError, match="is \\[16, 64\\], the quantized module \\[8, 64\\]"):
        replace_linear(model, "0.0", QuantLinear.from_matrix(lut_matrix(0, 8, 64, 2)))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        replace_linear(model, "0", module)
    with pytest.raises(ValueError, match="bias"):
        replace_linear(model, "0.0", QuantLinear.from_matrix(lut_matrix(0, 16, 64, 2), torch.zeros(16)))
    replace_linear(model, "0.0", module)
    assert model[0][0] is module


def test_corrupt_meta_names_the_layer() -> None:
    with pytest.raises(CorruptCheckpoint, match="layers.3.mlp"):
        quant_linear_from_meta({"kind": "lut", "shape": [4, 8]}, where="layers.3.mlp")
