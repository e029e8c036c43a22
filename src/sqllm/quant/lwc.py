"""SliM-LLM+: learnable weight clipping (LWC) on top of SliM-LLM's group bit map.

SliM-LLM+ (Huang et al. 2024, the SliM-LLM variant built on OmniQuant) keeps SliM-LLM's salience-determined
bit width of every column group and learns each group's grid with OmniQuant's learnable weight clipping
(Shao et al. 2023, "OmniQuant", §3.2): every (row, group) of a linear gets two learnable clipping strengths, and the
group's uniform grid spans the *clipped* range

    hi = sigmoid(g_up) * H,   lo = sigmoid(g_low) * L,   scale = (hi - lo) / (2**b - 1),
    zero = round(-lo / scale),     w_q = scale * (clamp(round(r / scale) + zero, 0, 2**b - 1) - zero),

with rounding passed straight through in the backward pass. This module is that per-matrix math; the
block-wise training (all clipping parameters of a decoder block trained jointly to minimize the MSE
between the block's full-precision outputs and its outputs with the fake-quantized weights, OmniQuant
§3.1) is the engine's block stage in ``sqllm.engine.refine``.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..codes import UniformCodes, fp16_grid, num_groups
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
