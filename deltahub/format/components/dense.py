"""``dense``: the values of the block stored as they are, in a float dtype."""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import FormatError
from ..dtypes import FLOAT_NAMES, to_name
from .base import Component, ComponentType, Layout, register_component


@register_component
class Dense(ComponentType):
    name = "dense"

    @classmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        dt = meta.get("dtype")
        if dt not in FLOAT_NAMES:
            raise FormatError(f"dense dtype must be one of {FLOAT_NAMES}, got {dt!r}")
        return {"values": (dt, tuple(block))}

    @classmethod
    def decode(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> torch.Tensor:
        return tensors["values"].to(torch.float32)


def encode_dense(values: torch.Tensor, dtype: torch.dtype) -> Component:
    return Component({"type": "dense", "dtype": to_name(dtype)}, {"values": values.to(dtype).contiguous()})
