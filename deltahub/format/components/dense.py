"""``dense``: the values of the block stored as they are, in a float dtype."""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import FormatError
from ..dtypes import FLOAT_NAMES, to_name
from .base import Component, ComponentType, Layout, RowAdder, matrix_view, register_component


@register_component
class Dense(ComponentType):
    name = "dense"

    @classmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        dt = meta.get("dtype")
        if not isinstance(dt, str) or dt not in FLOAT_NAMES:
            raise FormatError(f"dense dtype must be one of {FLOAT_NAMES}, got {str(dt)[:40]!r}")
        return {"values": (dt, tuple(block))}

    @classmethod
    def view(cls, meta: Mapping, block: tuple[int, ...]) -> tuple[int, int]:
        return matrix_view(block, {})  # dense ignores "view" (spec §6.1)

    @classmethod
    def row_adder(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> RowAdder:
        return _DenseRows(tensors["values"].reshape(cls.view(meta, block)))


class _DenseRows(RowAdder):
    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def add(self, out: torch.Tensor, r0: int, r1: int) -> None:
        out += self.values[r0:r1]  # float32 arithmetic: the stored values widen exactly


def encode_dense(values: torch.Tensor, dtype: torch.dtype) -> Component:
    return Component({"type": "dense", "dtype": to_name(dtype)}, {"values": values.to(dtype).contiguous()})
