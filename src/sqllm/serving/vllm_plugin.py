"""vLLM plugin: serve sqllm packed checkpoints with ``vllm serve DIR`` or ``vllm.LLM(model=DIR)``.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``) in every process it starts; from then
on a ``config.json`` whose ``quantization_config.quant_method`` is ``"sqllm"`` builds :class:`SqllmConfig`,
and every linear layer the checkpoint's layer table names computes through :class:`SqllmLinearMethod`.

Loading. vLLM's own loaders cut each checkpoint tensor for the local tensor-parallel rank by the
parameter's ``output_dim`` / ``input_dim`` / ``packed_dim`` before copying it into a preallocated
parameter. Packed sqllm tensors cannot be cut that way (3-bit codes straddle int32 words, CSR outliers
must be re-indexed, a mixed-precision bit map decides which columns each ``qweight_b{b}`` holds, and
their sizes differ from layer to layer), so each layer registers one empty placeholder parameter per
packed tensor name, without those attributes, whose ``weight_loader`` keeps the whole checkpoint tensor
of each fused part (``shard_id`` "q"/"k"/"v" or 0/1). ``process_weights_after_loading`` then cuts the
rank's rows (column-parallel) or columns (row-parallel) with :mod:`sqllm.formats.shard`, stacks fused
parts whose layouts agree, and builds the :class:`~sqllm.nn.QuantLinear` modules that ``apply`` calls:
sqllm's compiled CPU kernels where they apply, its tiled torch path elsewhere (any device).

Errors. A layer table vLLM cannot serve (unknown format version, a malformed layer meta, a
tensor-parallel split that cuts a quantization group, a fused layer with only some parts quantized,
quantized layers inside a non-linear module) raises one :class:`~sqllm.errors.SqllmError` naming the
layer and the reason while vLLM builds the model, before any weight is read.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from ..errors import CorruptCheckpoint, InvalidConfig
from ..formats.checkpoint import check_quantization_config
from ..formats.layouts import LayerMeta, tensor_specs, validate_tensors
from ..formats.shard import check_column_split, fuse_rows, shard_range, split_columns, split_rows
from ..nn import QuantLinear

NAME = "sqllm"
# vLLM's shard ids of fused layers: QKVParallelLinear names its parts, MergedColumnParallelLinear numbers them.
QKV_SHARD_IDS = {"q": 0, "k": 1, "v": 2}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``quant_method: "sqllm"`` known to vLLM."""
    register_quantization_config(NAME)(SqllmConfig)


class SqllmConfig(QuantizationConfig):
    """A checkpoint's ``quantization_config``: the :class:`LayerMeta` of every quantized linear, by name."""

    def __init__(self, layers: dict[str, LayerMeta]) -> None:
        super().__init__()
        self.layers = layers

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # QuantLinear's torch path runs on any device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config, which vLLM passes in

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SqllmConfig:
        qc = check_quantization_config(config, "quantization_config")
        return cls({name: LayerMeta.from_dict(meta, where=name) for name, meta in qc["layers"].items()})

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename the layer table as vLLM renames the model's modules (e.g. a ``language_model.`` prefix)."""
        self.layers = hf_to_vllm_mapper.apply_dict(self.layers)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            parts = self.checkpoint_parts(prefix)
            quantized = [p for p in parts if p in self.layers]
            if not quantized:
                return UnquantizedLinearMethod()
            if len(quantized) < len(parts):
                raise InvalidConfig(
                    f"{prefix} fuses {parts} in vLLM, but the checkpoint quantizes only {quantized}; "
                    "quantize all of them or none"
                )
            return SqllmLinearMethod([(p, self.layers[p]) for p in parts])
        inside = sorted(name for name in self.layers if name.startswith(prefix + "."))
        if inside:
            raise InvalidConfig(
                f"{prefix} is a {type(layer).__name__} in vLLM, which the sqllm plugin cannot serve quantized "
                f"(it serves linear layers); the checkpoint quantizes {inside[0]} in it"
            )
        return None

    def checkpoint_parts(self, prefix: str) -> list[str]:
        """Checkpoint linears a vLLM layer is made of: ``...qkv_proj`` -> ``[...q_proj, ...k_proj, ...v_proj]``
        by the model's ``packed_modules_mapping``; the layer itself when stored whole or not fused."""
        base, _, leaf = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(leaf)
        if prefix in self.layers or not subs:
            return [prefix]
        return [f"{base}.{s}" if base else s for s in subs]


class SqllmLinearMethod(LinearMethodBase):
    """Packed linear layer (possibly several fused checkpoint linears) computed by QuantLinear modules.

    parts: ``(checkpoint name, meta)`` of each linear the vLLM layer stacks by rows, in vLLM's order.
    """

    def __init__(self, parts: list[tuple[str, LayerMeta]]) -> None:
        self.parts = parts

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Check the layer against the metas and plan this rank's slice (raising before any weight is
        read), then register one receiving placeholder per packed tensor name."""
        layer.sqllm_rows = self._row_ranges(layer, output_partition_sizes, input_size)
        layer.sqllm_cols = None
        if input_size_per_partition != input_size:  # row-parallel: this rank holds a range of input columns
            layer.sqllm_cols = shard_range(input_size, input_size_per_partition, layer.tp_rank, layer.tp_size)
            for name, meta in self.parts:
                check_column_split(meta, *layer.sqllm_cols, where=name)
        layer.sqllm_received = [{} for _ in self.parts]  # part -> packed tensor name -> whole checkpoint tensor
        names: dict[str, torch.dtype] = {}
        for _, meta in self.parts:
            names.update({n: spec.dtype for n, spec in tensor_specs(meta).items()})
        for n, dtype in names.items():
            placeholder = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            layer.register_parameter(n, placeholder)
            set_weight_attrs(placeholder, {"weight_loader": functools.partial(self._receive, layer, n)})
        layer.sqllm_placeholders = list(names)

    def _row_ranges(self, layer: nn.Module, partition_sizes: list[int], input_size: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of this rank's rows of every part; InvalidConfig when the metas do not fit."""
        for name, meta in self.parts:
            if meta.shape[1] != input_size:
                raise CorruptCheckpoint(f"{name} is {list(meta.shape)} in the checkpoint, but vLLM's layer takes "
                                        f"{input_size} inputs")
        if len(self.parts) != len(partition_sizes):
            if layer.tp_size == 1:  # a fused linear stored whole needs no row split
                return [(0, self.parts[0][1].shape[0])]
            raise InvalidConfig(f"{self.parts[0][0]} is stored fused; the sqllm plugin splits fused checkpoint "
                                "linears across tensor-parallel ranks only when they are stored as parts")
        ranges = []
        for (name, meta), size in zip(self.parts, partition_sizes):
            try:
                ranges.append(shard_range(meta.shape[0], size, layer.tp_rank, layer.tp_size))
            except ValueError as e:
                raise InvalidConfig(
                    f"{name}: {meta.shape[0]} output rows do not split for vLLM's layer ({e})"
                ) from None
        return ranges

    def _receive(self, layer: nn.Module, name: str, param: nn.Parameter, loaded: Tensor,
                 shard_id: str | int | None = None) -> None:
        """weight_loader of placeholder ``name``: keep the whole checkpoint tensor of fused part ``shard_id``."""
        if shard_id is None:
            shard_id = getattr(loaded, "shard_id", None)
        if shard_id is None:
            part = 0 if len(self.parts) == 1 else -1
        else:
            part = QKV_SHARD_IDS.get(shard_id, -1) if isinstance(shard_id, str) else int(shard_id)
        if not 0 <= part < len(self.parts):
            raise CorruptCheckpoint(f"tensor {name} (shard {shard_id!r}) of {layer.prefix} matches none of the "
                                    f"checkpoint linears {[n for n, _ in self.parts]}")
        layer.sqllm_received[part][name] = loaded

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Check every part's tensors, cut this rank's slice, stack parts, build the QuantLinear modules."""
        device = getattr(layer, layer.sqllm_placeholders[0]).device
        shards = []
        for (name, meta), received, rows in zip(self.parts, layer.sqllm_received, layer.sqllm_rows):
            validate_tensors({f"{name}.{k}": v for k, v in received.items()}, f"{name}.", meta)
            tensors = {k: received[k] for k in tensor_specs(meta)}
            if rows != (0, meta.shape[0]):
                tensors, meta = split_rows(tensors, meta, *rows)
            if layer.sqllm_cols is not None:
                tensors, meta = split_columns(tensors, meta, *layer.sqllm_cols, where=name)
            shards.append((tensors, meta))
        modules = []
        for tensors, meta in fuse_rows(shards):
            module = QuantLinear(meta, device="meta")
            module.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True)
            modules.append(module)
        for n in layer.sqllm_placeholders:
            delattr(layer, n)
        del layer.sqllm_received
        layer.sqllm_linears = nn.ModuleList(modules)

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x: [tokens, in_per_rank]`` -> ``[tokens, sum(output_partition_sizes)]`` in ``x.dtype``."""
        linears = layer.sqllm_linears
        y = linears[0](x) if len(linears) == 1 else torch.cat([m(x) for m in linears], dim=-1)
        return y if bias is None else y + bias

    def dequantize_weight(self, layer: nn.Module) -> Tensor:
        """This rank's weight ``[sum(output_partition_sizes), in_per_rank]`` float32 (for re-quantization)."""
        return torch.cat([m.dequantize_weight() for m in layer.sqllm_linears])


def close_llm(llm: Any) -> None:
    """Shut down an in-process ``vllm.LLM`` and its distributed state, so that another can be built in the
    same process (tests and benchmarks build one per checkpoint)."""
    import gc

    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm.llm_engine.engine_core.shutdown()
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
