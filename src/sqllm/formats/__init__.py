"""Packed storage of quantized matrices: bit packing, CSR outliers, and the per-linear tensor layout."""

from .bitpack import block_shape, pack_codes, packed_words, planar_columns, unpack_codes, unpack_planar
from .layouts import (
    LayerMeta,
    TensorSpec,
    group_columns,
    matrix_meta,
    pack_matrix,
    storage_bits,
    tensor_specs,
    unpack_matrix,
    validate_tensors,
)
from .sparse import check_csr, coo_to_csr, csr_rows, csr_to_coo

__all__ = [
    "LayerMeta",
    "TensorSpec",
    "block_shape",
    "check_csr",
    "coo_to_csr",
    "csr_rows",
    "csr_to_coo",
    "group_columns",
    "matrix_meta",
    "pack_codes",
    "pack_matrix",
    "packed_words",
    "planar_columns",
    "storage_bits",
    "tensor_specs",
    "unpack_codes",
    "unpack_matrix",
    "unpack_planar",
    "validate_tensors",
]
