"""Fisher information of a tiny Llama against a naive per-window gradient computation; file checks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from conftest import assert_fisher_close
from sqllm.engine.fisher import compute_fisher, load_fisher, save_fisher
from sqllm.engine.lm_loss import causal_lm_loss
from sqllm.errors import CorruptCheckpoint, InvalidConfig

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


def _tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def _windows() -> torch.Tensor:
    return torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))


def _naive_fisher(model, names, windows) -> dict[str, torch.Tensor]:
    """sum over windows of grad**2, one plain backward per window with every parameter trainable."""
    total = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    for window in windows:
        model.zero_grad(set_to_none=True)
        ids = window[None]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for n in names:
            total[n] += model.get_submodule(n).weight.grad ** 2
    model.zero_grad(set_to_none=True)
    return total


@pytest.fixture(scope="module")
def llama_and_reference():
    model = _tiny_llama()
    return model, _naive_fisher(model, NAMES, _windows())


def test_matches_naive_squared_gradients(llama_and_reference):
    model, want = llama_and_reference
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag the pass must restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = compute_fisher(model, NAMES, _windows(), progress=False)
    assert list(got) == NAMES
    for n in NAMES:
        assert got[n].dtype == torch.float32 and got[n].shape == model.get_submodule(n).weight.shape
        assert_fisher_close(got[n], want[n])
        assert bool((got[n] > 0).any())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    model.model.embed_tokens.weight.requires_grad_(True)


def test_gradient_checkpointing_gives_the_same_fisher(llama_and_reference):
    model, want = llama_and_reference
    got = compute_fisher(model, NAMES[:1], _windows(), grad_checkpointing=True, progress=False)
    assert_fisher_close(got[NAMES[0]], want[NAMES[0]])
    assert not model.training and not model.is_activation_checkpointing


def test_bf16_pass_equals_per_window_autocast_bit_for_bit():
    """Casting the weights once for the whole pass changes no bit: the reference enters autocast per window
    (each weight cast again every window) and squares each window's float32 gradient."""
    model = _tiny_llama()
    weights = [model.get_submodule(n).weight for n in NAMES]
    for p in model.parameters():
        p.requires_grad_(any(p is w for w in weights))
    want = {n: torch.zeros_like(w) for n, w in zip(NAMES, weights)}
    for window in _windows():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=window[None], use_cache=False).last_hidden_state
            loss = causal_lm_loss(hidden, model.lm_head, window[None])
        loss.backward()
        for n, w in zip(NAMES, weights):
            want[n] += w.grad.float() ** 2
            w.grad = None
    got = compute_fisher(model, NAMES, _windows(), amp=torch.bfloat16, progress=False)
    for n in NAMES:
        assert torch.equal(got[n], want[n]), n


def test_the_frozen_head_loss_replaces_the_models_own_loss(llama_and_reference):
    """The default pass never runs the head module (its loss is taken at the head's input) and gives the
    Fisher of the model's own forward and loss."""
    model, _ = llama_and_reference
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        fused = compute_fisher(model, NAMES, _windows(), progress=False)
        assert calls == []
        own = compute_fisher(model, NAMES, _windows(), progress=False, frozen_head_loss=False)
        assert len(calls) == len(_windows())
    finally:
        hook.remove()
    for n in NAMES:
        assert_fisher_close(fused[n], own[n])


def test_a_trainable_head_takes_the_models_own_loss(llama_and_reference):
    """With the head among the targets, the pass cannot use the frozen-head loss; it must still be exact."""
    model, _ = llama_and_reference
    names = [NAMES[0], "lm_head"]
    want = _naive_fisher(model, names, _windows())
    got = compute_fisher(model, names, _windows(), progress=False)
    for n in names:
        assert_fisher_close(got[n], want[n])


def test_unknown_linear_and_bad_windows_are_rejected(llama_and_reference):
    model, _ = llama_and_reference
    with pytest.raises(InvalidConfig, match="model.layers.9.mlp.up_proj"):
        compute_fisher(model, ["model.layers.9.mlp.up_proj"], _windows(), progress=False)
    with pytest.raises(InvalidConfig, match="int64"):
        compute_fisher(model, NAMES, _windows().float(), progress=False)


def _fisher() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"a.q_proj": torch.rand(8, 4, generator=g), "b.down_proj": torch.rand(4, 16, generator=g)}


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, _fisher(), {"model": "tiny", "windows": 3, "seed": None})
    got = load_fisher(path, {"a.q_proj": (8, 4), "b.down_proj": (4, 16)})
    for name, t in _fisher().items():
        assert torch.equal(got[name], t)


@pytest.mark.parametrize(
    "expected, message",
    [
        ({"a.q_proj": (8, 4), "b.down_proj": (16, 4)}, r"'b.down_proj'.*\(4, 16\), expected \(16, 4\)"),
        ({"a.q_proj": (8, 4), "b.down_proj": (4, 16), "c.up_proj": (2, 2)}, r"no tensor 'c.up_proj'.*\(2, 2\)"),
        ({"a.q_proj": (8, 4)}, r"'b.down_proj' of shape \(4, 16\)"),
    ],
)
def test_mismatched_file_names_the_tensor(tmp_path, expected, message):
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, _fisher(), {})
    with pytest.raises(InvalidConfig, match=message):
        load_fisher(path, expected)


def test_unreadable_or_missing_file(tmp_path):
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, _fisher(), {})
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CorruptCheckpoint, match="cannot read"):
        load_fisher(path, {"a.q_proj": (8, 4)})
    with pytest.raises(InvalidConfig, match="does not exist"):
        load_fisher(tmp_path / "nope.safetensors", {"a.q_proj": (8, 4)})


def test_negative_values_are_corrupt(tmp_path):
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, {"a.q_proj": -torch.ones(2, 2)}, {})
    with pytest.raises(CorruptCheckpoint, match="negative"):
        load_fisher(path, {"a.q_proj": (2, 2)})
