"""SliM-LLM+: learnable weight clipping (LWC) on top of SliM-LLM's group bit map.

SliM-LLM+ (Huang et al. 2024, the SliM-LLM variant built on OmniQuant) keeps SliM-LLM's salience-determined bit width of every
column group and learns each group's grid with OmniQuant's learnable weight clipping (Shao et al. 2023,
"OmniQuant", §3.2): every (row, group) of a linear gets two learnable clipping strengths, and the
group's uniform grid spans the *clipped* range

    hi = sigmoid(g_up) * H,   lo = sigmoid(g_low) * L,   scale = (hi - lo) / (2**b - 1),
    zero = round(-lo / scale),     w_q = scale * (clamp(round(r / scale) + zero, 0, 2**b - 1) - zero),

with rounding passed straight through in the backward pass. All clipping parameters of a decoder block
are trained jointly to minimize the MSE between the block's full-precision outputs and its outputs
with the fake-quantized weights (OmniQuant §3.1, block-wise error minimization).

What is rounded, and the bounds ``H``, ``L``, are where we depart from OmniQuant, which rounds the
full-precision weights ``w`` and takes ``H = max(w)``, ``L = min(w)``. On a small model at 2 bits that
learned-clipping round-to-nearest loses to SliM-LLM's GPTQ sweep in every block we measured (SmolLM2:
higher block output error after 10 epochs), because GPTQ's error feedback is worth more than a better
grid. So here:

* ``r`` is what SliM-LLM's GPTQ sweep actually rounded (``QuantizedMatrix.rounded``: each column after
  the error feedback of the columns before it), so the codes on SliM's grid are SliM's codes;
* ``H = s (2**b - 1 - z) / sigmoid(g0)`` and ``L = -s z / sigmoid(g0)`` from SliM's scale ``s`` and integer
  zero ``z``, with the logits initialised at ``g0`` (:data:`CLIP_LOGIT_INIT`): training starts exactly at
  SliM-LLM's grid and codes (its block loss is the starting loss) and learns how much to clip from
  there, as OmniQuant learns it from min-max. The range keeps 0 inside, so zeros stay integers in
  ``[0, 2**b - 1]``.

Further choices, each for a stated reason:

* 1-bit groups keep SliM-LLM's binarization (its codes and the midpoint ``mu`` of its two levels) and
  learn only the half distance ``alpha`` between the levels, as ``alpha * (1/2 + sigmoid(g_alpha))`` with
  ``g_alpha = 0``: training starts exactly at SliM's levels. A min-max grid with two levels would put them
  at the extremes of the group, far worse than the mean-absolute-deviation binarization SliM uses. The
  factor stays in (1/2, 3/2) so that the stored zero ``1/2 - mu / (2 alpha)`` stays within float16 range
  and precision whatever the training does.
* The zero point is rounded with a straight-through estimator too (OmniQuant's rounds it without a
  gradient), so the lower clipping strength gets a gradient of its own through the zero point.
* AdamW runs without weight decay: decay would pull the logits towards 0, i.e. towards clipping half of
  the range, which no data asked for.
* Training lowers the training loss but the exported grid is float16-rounded, so at the end the hook
  keeps, per block, whichever of SliM's result and the LWC result has the lower block output MSE on the
  training windows, and records the choice in each matrix's ``info``.
* Training is compute-bound (a forward and backward of the block per window and epoch), so it runs under
  bfloat16 autocast where the hardware multiplies bf16 natively (:func:`fast_train_dtype`); the losses
  that decide between SliM and LWC are computed in the model's own precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..codes import QuantizedMatrix, UniformCodes, fp16_grid, num_groups
from ..config import SliMConfig
from ..engine.loop import BlockHook
from ..errors import InvalidConfig
from .uniform import group_view

# sigmoid(4) = 0.982: training starts at SliM's grid with room to widen it by 1.8% or to clip it.
CLIP_LOGIT_INIT = 4.0
# Smallest grid step; keeps the division by the scale finite for all-zero groups (OmniQuant's CLIPMIN).
MIN_SCALE = 1e-5


@dataclass
class LinearClip:
    """Everything LWC needs for one linear ``[out, in]`` with ``n_g`` groups of ``G`` columns.

    w:        [out, n_g, G] the values to round, in groups (a partial last group padded with its last column)
    w_max:    [out, n_g, 1] the bound ``H >= 0`` of the upper end;  w_min: [out, n_g, 1] the bound ``L <= 0``
    maxq:     [1, n_g, 1] ``2**bits - 1`` per group (float)
    binary:   [1, n_g, 1] bool, the 1-bit groups
    bin_codes: [out, n_g, G] SliM's codes (float 0/1 in 1-bit groups, ignored elsewhere)
    bin_mid:  [out, n_g, 1] midpoint of SliM's two levels;  bin_step: [out, n_g, 1] their distance (2 alpha)
    up, low:  [out, n_g, 1] clipping logits of the multi-bit groups (trained)
    alpha:    [out, n_g, 1] logit of the 1-bit level distance factor ``1/2 + sigmoid(alpha)`` (trained)
    group_bits: [n_g] int64 and group_size: SliM's bit map and group size, kept unchanged
    """

    w: Tensor
    w_max: Tensor
    w_min: Tensor
    maxq: Tensor
    binary: Tensor
    bin_codes: Tensor
    bin_mid: Tensor
    bin_step: Tensor
    up: Tensor
    low: Tensor
    alpha: Tensor
    group_bits: Tensor
    group_size: int
    n_in: int

    def parameters(self) -> list[Tensor]:
        return [self.up, self.low, self.alpha]


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def init_clip(rounded: Tensor, codes: UniformCodes) -> LinearClip:
    """Clipping state that starts at SliM's ``codes``: ``rounded: [out, in]`` are the values SliM's sweep
    rounded (their nearest codes on SliM's grids are ``codes``), the bounds come from SliM's grids.

    The 1-bit groups' two levels are read back from the codes (``level_c = s * (c - z)``, ``c`` in {0, 1}),
    so nothing is assumed about how SliM-LLM binarized them.
    """
    out, n_in = rounded.shape
    g, n_g = codes.group_size, num_groups(n_in, codes.group_size)
    groups = group_view(rounded.float(), g)[0].reshape(out, n_g, g)
    bin_codes = group_view(codes.codes.float(), g)[0].reshape(out, n_g, g)
    s, z = codes.scales.unsqueeze(-1), codes.zeros.unsqueeze(-1)
    maxq = (2.0 ** codes.group_bits.to(rounded.device) - 1).view(1, n_g, 1)
    start = torch.sigmoid(torch.tensor(CLIP_LOGIT_INIT))

    def logit(value: float) -> Tensor:
        return torch.full((out, n_g, 1), value, device=rounded.device).requires_grad_()

    return LinearClip(
        w=groups,
        w_max=(s * (maxq - z) / start).clamp(min=0),
        w_min=(-s * z / start).clamp(max=0),
        maxq=maxq,
        binary=(codes.group_bits.to(rounded.device) == 1).view(1, n_g, 1),
        bin_codes=bin_codes,
        bin_mid=s * (0.5 - z),
        bin_step=s,
        up=logit(CLIP_LOGIT_INIT),
        low=logit(CLIP_LOGIT_INIT),
        alpha=logit(0.0),
        group_bits=codes.group_bits.clone(),
        group_size=g,
        n_in=n_in,
    )


def clipped_grid(clip: LinearClip) -> tuple[Tensor, Tensor]:
    """Scale and clipped minimum ``[out, n_g, 1]`` of the multi-bit groups' clipped min-max grids
    (OmniQuant §3.2: ``hi = sigmoid(up) max``, ``lo = sigmoid(low) min``, ``scale = (hi - lo) / maxq``)."""
    hi = torch.sigmoid(clip.up) * clip.w_max
    lo = torch.sigmoid(clip.low) * clip.w_min
    return ((hi - lo) / clip.maxq).clamp(min=MIN_SCALE), lo


def binary_step(clip: LinearClip) -> Tensor:
    """Learned distance ``[out, n_g, 1]`` between the two levels of the 1-bit groups."""
    return clip.bin_step * (0.5 + torch.sigmoid(clip.alpha))


def _ungroup(t: Tensor, n_in: int) -> Tensor:
    """``[out, n_g, G]`` back to ``[out, in]`` (dropping the padding of a partial last group)."""
    return t.reshape(t.shape[0], -1)[:, :n_in]


def fake_quantize(clip: LinearClip) -> Tensor:
    """Differentiable quantized weight ``[out, in]`` float32 (straight-through rounding)."""
    scale, lo = clipped_grid(clip)
    zero = round_ste(-lo / scale)
    q = torch.clamp(round_ste(clip.w / scale) + zero, min=torch.zeros_like(clip.maxq), max=clip.maxq)
    multi = scale * (q - zero)
    binary = clip.bin_mid + (clip.bin_codes - 0.5) * binary_step(clip)
    return _ungroup(torch.where(clip.binary, binary, multi), clip.n_in)


@torch.no_grad()
def export_codes(clip: LinearClip) -> UniformCodes:
    """The learned clipping as storable codes: fp16-representable scales and zeros, SliM's bit map.

    Multi-bit groups get integer zeros in ``[0, 2**b - 1]``; 1-bit groups keep SliM's codes and midpoint
    with the learned level distance (``zero = 1/2 - mid / scale``, a fraction as SliM's).
    """
    scale, lo = clipped_grid(clip)
    scale = fp16_grid(scale)
    # lo <= 0 <= hi, so the zero is an integer in [0, maxq]: exactly representable in float16.
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(clip.w / scale) + zero, min=torch.zeros_like(clip.maxq), max=clip.maxq)
    step = fp16_grid(binary_step(clip))
    # A zero step (only where SliM stored a zero scale) dequantizes to 0 whatever the zero: skip the division.
    safe = torch.where(step > 0, step, torch.ones_like(step))
    bin_zero = fp16_grid(torch.where(step > 0, 0.5 - clip.bin_mid / safe, torch.zeros_like(step)))
    codes = torch.where(clip.binary, clip.bin_codes, q)
    return UniformCodes(
        codes=_ungroup(codes, clip.n_in).to(torch.uint8),
        scales=torch.where(clip.binary, step, scale).squeeze(-1),
        zeros=torch.where(clip.binary, bin_zero, zero).squeeze(-1),
        group_bits=clip.group_bits.clone(),
        group_size=clip.group_size,
    )


def block_output_mse(
    block: nn.Module, params: dict[str, Tensor], hidden: Tensor, target: Tensor, kwargs: dict[str, Any],
    batch_size: int,
) -> float:
    """Mean squared error between ``target [n, L, d]`` and the block's outputs on ``hidden [n, L, d]``
    with its parameters replaced by ``params`` (by name), over all windows."""
    total = 0.0
    with torch.no_grad():
        for h, t in zip(hidden.split(batch_size), target.split(batch_size)):
            out = _forward(block, params, h, kwargs)
            total += F.mse_loss(out.float(), t.float(), reduction="sum").item()
    return total / target.numel()


def _forward(block: nn.Module, params: dict[str, Tensor], hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = functional_call(block, params, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def fast_train_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where ``device`` multiplies it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX),
    else float32. bf16 autocast makes clipping training about 2.5x faster on such CPUs with the same
    learned clipping to 3 digits of the loss (measured on SmolLM2); the final comparison stays float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # Private probes of torch.cpu (present since torch 2.2); absent ones count as "not native".
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.bfloat16 if any(p is not None and p() for p in probes) else torch.float32


def train_clipping(
    block: nn.Module,
    base: dict[str, Tensor],
    clips: dict[str, LinearClip],
    hidden: Tensor,
    target: Tensor,
    kwargs: dict[str, Any],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    bar: tqdm,
    train_dtype: torch.dtype = torch.float32,
) -> list[float]:
    """Train every clipping logit of one block jointly (AdamW, no decay) on the block output MSE.

    base:   the block's parameters by name, detached (the linears' entries are replaced by their
            fake-quantized weights at every step);  clips: parameter name of a linear's weight -> its state
    hidden, target: ``[n, L, d]`` block inputs and full-precision outputs
    train_dtype: autocast dtype of the block's forward and backward (float32: none); the loss and the
            clipping parameters stay float32
    Returns the mean training loss of every epoch.
    """
    opt = torch.optim.AdamW([p for c in clips.values() for p in c.parameters()], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(hidden.shape[0], generator=gen).split(batch_size):
            idx = idx.to(hidden.device)
            weights = {name: fake_quantize(c).to(base[name].dtype) for name, c in clips.items()}
            with torch.autocast(hidden.device.type, dtype=train_dtype, enabled=train_dtype != torch.float32):
                out = _forward(block, {**base, **weights}, hidden[idx], kwargs)
            loss = F.mse_loss(out.float(), target[idx].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            total += value * len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3g}")
        history.append(total / hidden.shape[0])
    return history


def _weight_names(block: nn.Module, full_names: list[str]) -> dict[str, str]:
    """Full linear name (``model.layers.3.mlp.up_proj``) -> its weight's parameter name in ``block``
    (``mlp.up_proj.weight``), matching the longest module path the full name ends with."""
    rel = [n for n, m in block.named_modules() if n and isinstance(m, nn.Linear)]
    out = {}
    for full in full_names:
        matches = [r for r in rel if full.endswith("." + r)]
        if not matches:
            raise ValueError(f"{full!r} is not a linear of this block")
        out[full] = max(matches, key=len) + ".weight"
    return out


def _codes_params(block_params: dict[str, Tensor], codes: dict[str, UniformCodes]) -> dict[str, Tensor]:
    """The block's parameters with each quantized weight (by parameter name) replaced by its codes' value."""
    return {**block_params, **{n: c.dequantize().to(block_params[n].dtype) for n, c in codes.items()}}


def make_lwc_block_hook(
    cfg: SliMConfig, *, seed: int = 0, progress: bool = True, batch_size: int = 1,
    train_dtype: torch.dtype | None = None,
) -> BlockHook:
    """The SliM-LLM+ block hook for :func:`sqllm.engine.loop.quantize_blocks` (see the module docstring).

    Trains on the first ``cfg.lwc_samples`` calibration windows for ``cfg.lwc_epochs`` epochs with AdamW
    at ``cfg.lwc_lr``, ``batch_size`` windows per step (OmniQuant trains with 1), window order seeded by
    ``seed + block index``. Each returned matrix's ``info`` gets the block output MSE of SliM's weights
    (``lwc_loss_slim``), of the clipping before and after training (``lwc_loss_before``,
    ``lwc_loss_after``), the mean training loss of every epoch (``lwc_epoch_losses``) and which result
    was kept (``lwc_chosen``: "lwc" or "slim").
    train_dtype: autocast dtype of the training passes (None: :func:`fast_train_dtype` of the block's
    device); the losses compared at the end are always computed in the model's own precision.
    With ``cfg.lwc_epochs == 0`` the hook returns SliM-LLM's results untouched.
    """
    # SliMConfig range-checks the epochs only; check the rest here, before any block is quantized.
    if cfg.lwc_lr <= 0:
        raise InvalidConfig(f"lwc_lr={cfg.lwc_lr} must be > 0; pass e.g. --lwc-lr 0.05")
    if cfg.lwc_samples < 1:
        raise InvalidConfig(f"lwc_samples={cfg.lwc_samples} must be >= 1; pass e.g. --lwc-samples 32")
    if batch_size < 1:
        raise InvalidConfig(f"batch_size={batch_size} must be >= 1")
    eval_batch = max(batch_size, 8)

    def hook(
        block: nn.Module, index: int, inputs: Any, fp_outputs: Tensor, results: dict[str, QuantizedMatrix],
    ) -> dict[str, QuantizedMatrix]:
        if cfg.lwc_epochs == 0:
            return results
        for full, qm in results.items():
            if not isinstance(qm.dense, UniformCodes) or qm.sparse is not None or qm.rounded is None:
                raise InvalidConfig(f"lwc needs uniform group codes without outliers and the values they "
                                    f"rounded; {full} has {type(qm.dense).__name__}, rounded="
                                    f"{qm.rounded is not None}; use it with method slim+")
        n = min(cfg.lwc_samples, inputs.hidden.shape[0])
        hidden, target, kwargs = inputs.hidden[:n], fp_outputs[:n], inputs.kwargs
        names = _weight_names(block, list(results))
        base = {k: v.detach() for k, v in block.named_parameters()}
        clips = {names[f]: init_clip(results[f].rounded, results[f].dense) for f in results}

        def loss_of(codes: dict[str, UniformCodes]) -> float:
            return block_output_mse(block, _codes_params(base, codes), hidden, target, kwargs, eval_batch)

        loss_slim = loss_of({names[f]: qm.dense for f, qm in results.items()})
        loss_before = loss_of({name: export_codes(c) for name, c in clips.items()})
        steps = cfg.lwc_epochs * -(-n // batch_size)
        with tqdm(total=steps, desc=f"lwc block {index}", leave=False, disable=not progress) as bar, \
                torch.enable_grad():
            history = train_clipping(block, base, clips, hidden, target, kwargs, epochs=cfg.lwc_epochs,
                                     lr=cfg.lwc_lr, batch_size=batch_size, seed=seed + index, bar=bar,
                                     train_dtype=train_dtype or fast_train_dtype(hidden.device))
        learned = {f: export_codes(clips[names[f]]) for f in results}
        loss_after = loss_of({names[f]: c for f, c in learned.items()})

        use_lwc = loss_after < loss_slim
        info = {"lwc_loss_slim": loss_slim, "lwc_loss_before": loss_before, "lwc_loss_after": loss_after,
                "lwc_epoch_losses": history, "lwc_chosen": "lwc" if use_lwc else "slim"}
        chosen = {}
        for full, qm in results.items():
            new = QuantizedMatrix(dense=learned[full] if use_lwc else qm.dense, info={**qm.info, **info})
            layer = block.get_submodule(names[full].removesuffix(".weight"))
            layer.weight.data = new.dequantize().to(layer.weight.dtype).to(layer.weight.device)
            chosen[full] = new
        return chosen

    return hook
