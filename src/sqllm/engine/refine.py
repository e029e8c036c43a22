"""Block-level training stages of the engine: SliM-LLM+'s learnable weight clipping (LWC).

The per-matrix clipping math (grids, straight-through fake quantization, export to codes) is
``sqllm.quant.lwc``; here a whole decoder block's clipping parameters are trained jointly on the MSE
between the block's full-precision outputs and its outputs with the fake-quantized weights (OmniQuant
§3.1, block-wise error minimization). Choices made here, each for a stated reason:

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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..codes import QuantizedMatrix, UniformCodes
from ..config import SliMPlusConfig
from ..errors import InvalidConfig
from ..quant.lwc import LinearClip, export_codes, fake_quantize, init_clip
from .loop import BlockStage


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


def lwc_block_stage(
    cfg: SliMPlusConfig, *, seed: int = 0, progress: bool = True, batch_size: int = 1,
    train_dtype: torch.dtype | None = None,
) -> BlockStage:
    """SliM-LLM+'s block stage for :func:`sqllm.engine.loop.quantize_blocks` (see the module docstring).

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
