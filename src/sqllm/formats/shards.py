"""Packed checkpoints written as blocks finish: one shard per decoder block, then the index.

A streamed quantization never holds the packed model: each finished block's packed tensors go to
their own safetensors file at once (:func:`write_block_shard`, with a JSON sidecar of the block's
layer metas and storage bits), and :func:`assemble_packed` turns the finished files into a folder that
loads like any packed checkpoint: ``model-00001-of-000NN.safetensors`` (embeddings), one shard per
block, a last shard (final norm, head), ``model.safetensors.index.json`` and ``config.json`` with the
``quantization_config``. Block files are hard-linked into the folder (copied where links are not
possible), so assembling costs no second write of the model.

Every file is written under a temporary name and renamed; a failed write (a full disk) removes the
temporary file and raises :class:`~sqllm.errors.WriteFailed`. Shard headers carry only
``{"format": "pt"}``: safetensors writes metadata keys in hash order, so a second key would make two
runs' bytes differ.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..codes import QuantizedMatrix
from ..errors import CorruptCheckpoint, WriteFailed
from .checkpoint import INDEX_NAME, store_dense_in_16_bits
from .layouts import matrix_meta, pack_matrix


def save_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` to ``path`` as safetensors atomically; WriteFailed (and no file) on any I/O error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {path}: {str(exc).splitlines()[0]}; free disk space or choose "
                          "another output folder") from None


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` atomically; WriteFailed on any I/O error."""
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {path}: {exc.strerror or exc}; free disk space or choose "
                          "another output folder") from None


def layer_record(qm: QuantizedMatrix, value_dtype: torch.dtype) -> dict[str, Any]:
    """What the assembled checkpoint and its summary need of one matrix once its codes are gone."""
    out, n_in = qm.shape
    return {"meta": matrix_meta(qm, value_dtype).to_dict(), "storage_bits": qm.storage_bits(),
            "weights": out * n_in, "sparse_nnz": qm.sparse.nnz if qm.sparse is not None else None}


def write_block_shard(
    path: Path, matrices: dict[str, QuantizedMatrix], plain: dict[str, Tensor], value_dtypes: dict[str, torch.dtype],
) -> None:
    """One block's shard: the packed tensors of ``matrices`` (full linear name -> codes, outliers in
    ``value_dtypes[name]``) and the block's other tensors ``plain`` (norms, biases) as given, and beside
    it ``<path>.json`` with each matrix's :func:`layer_record`."""
    tensors = dict(plain)
    records = {}
    for name, qm in matrices.items():
        tensors.update(pack_matrix(qm, f"{name}.", value_dtypes[name]))
        records[name] = layer_record(qm, value_dtypes[name])
    save_shard(path, tensors)
    write_text(_records_path(path), json.dumps(records, sort_keys=True))


def _records_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def read_block_records(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``(layer records by name, tensor bytes by name)`` of a block shard and its sidecar."""
    from safetensors import SafetensorError, safe_open

    try:
        records = json.loads(_records_path(path).read_text())
        with safe_open(str(path), framework="pt") as f:
            sizes = {k: _nbytes(f.get_slice(k)) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"block shard {path} is unreadable ({type(exc).__name__}); delete the work "
                                "folder and start over") from None
    return records, sizes


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(sl: Any) -> int:
    n = 1
    for s in sl.get_shape():
        n *= s
    return n * _ITEMSIZE[sl.get_dtype()]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        try:
            shutil.copyfile(src, dst)
        except OSError as exc:
            raise WriteFailed(f"could not write {dst}: {exc.strerror or exc}; free disk space or choose "
                              "another output folder") from None


def assemble_packed(
    dest: Path, first: dict[str, Tensor], block_files: list[Path], last: dict[str, Tensor],
    config: dict[str, Any], qconfig: dict[str, Any],
) -> dict[str, Any]:
    """Fill the empty folder ``dest`` with the shards and index of a packed checkpoint.

    first, last: the tensors before and after the blocks (embeddings; final norm and head), as stored
    by the source; their matrices go to 16 bits (:func:`store_dense_in_16_bits`) like ``write_packed``
    stores them. block_files: :func:`write_block_shard` files in block order. config: the model's
    ``config.json`` dict; ``qconfig`` gains ``dense16`` and ``layers`` and is written into it.
    Returns ``{"quantization_config": ..., "records": {linear name: layer_record}}``.
    """
    dense = {**first, **last}
    dense16 = store_dense_in_16_bits(dense, [n for n, t in dense.items() if t.dim() == 2])
    first = {n: dense[n] for n in first}
    last = {n: dense[n] for n in last}
    n = len(block_files) + 2
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    records: dict[str, Any] = {}
    for tensors, fname in ((first, names[0]), (last, names[-1])):
        save_shard(dest / fname, tensors)
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    for src, fname in zip(block_files, names[1:-1]):
        block_records, sizes = read_block_records(src)
        _link_or_copy(src, dest / fname)
        records.update(block_records)
        weight_map.update({k: fname for k in sizes})
        total += sum(sizes.values())
    weight_map = dict(sorted(weight_map.items()))
    write_text(dest / INDEX_NAME, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    qc = {**qconfig, "dense16": dense16, "layers": {k: r["meta"] for k, r in records.items()}}
    write_text(dest / "config.json", json.dumps({**config, "quantization_config": qc}, indent=2, default=str))
    return {"quantization_config": qc, "records": records}
