"""The component types of format v1. A compressed tensor is the sum of its components."""

from .base import COMPONENT_TYPES, Component, ComponentType, RowAdder, block_shape, check_fields, check_int, component_type, is_int, layout_nbytes, matrix_view
from .dense import Dense, encode_dense
from .lossless import Lossless, encode_lossless
from .lowrank import LowRank, Segment, encode_lowrank, lowrank_meta, segments_nbytes
from .sign import Sign, encode_sign, sign_nbytes
from .sparse import Sparse, csr_nbytes, encode_sparse

__all__ = [
    "COMPONENT_TYPES", "Component", "ComponentType", "Dense", "Lossless", "LowRank", "RowAdder", "Segment", "Sign", "Sparse",
    "block_shape", "check_fields", "check_int", "component_type", "is_int", "csr_nbytes", "encode_dense", "encode_lossless",
    "encode_lowrank", "lowrank_meta", "encode_sign", "encode_sparse", "layout_nbytes", "matrix_view", "segments_nbytes", "sign_nbytes",
]
