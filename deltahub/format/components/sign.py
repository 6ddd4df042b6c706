"""``sign``: a 1-bit bitplane times a scale per tensor or per row (BitDelta, D-QRELO)."""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import FormatError
from .. import bitpack
from .base import Component, ComponentType, Layout, matrix_view, register_component


@register_component
class Sign(ComponentType):
    name = "sign"

    @classmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        p, q = matrix_view(block, meta)
        scale = meta.get("scale", "tensor")
        if scale not in ("tensor", "row"):
            raise FormatError(f"sign scale must be 'tensor' or 'row', got {scale!r}")
        return {
            "bits": ("U8", (bitpack.packed_nbytes(p * q, 1),)),
            "scale": ("F32", (1,) if scale == "tensor" else (p,)),
        }

    @classmethod
    def decode(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> torch.Tensor:
        p, q = matrix_view(block, meta)
        bits = bitpack.unpack(tensors["bits"], 1, p * q).view(p, q)
        signs = bits.to(torch.float32) * 2.0 - 1.0
        scale = tensors["scale"].to(torch.float32)
        scale = scale.view(1, 1) if meta.get("scale", "tensor") == "tensor" else scale.view(p, 1)
        return (signs * scale).reshape(block)

    @classmethod
    def add_into(cls, out: torch.Tensor, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> None:
        # b * 2s - s is exactly +s or -s in float32 (a doubling, then Sterbenz), so adding it
        # rounds once, as the spec's sum does; it is about twice as fast as torch.where.
        p, q = matrix_view(block, meta)
        bits = bitpack.unpack(tensors["bits"], 1, p * q).view(p, q)
        scale = tensors["scale"].to(torch.float32)
        scale = scale.view(1, 1) if meta.get("scale", "tensor") == "tensor" else scale.view(p, 1)
        out.view(p, q).add_(bits.to(torch.float32).mul_(scale * 2).sub_(scale))


def encode_sign(delta2d: torch.Tensor, per_row: bool = False) -> Component:
    """alpha * sign(delta) with alpha = mean |delta| (per row if asked); delta <= 0 maps to -1."""
    p, q = delta2d.shape
    if per_row:
        alpha = delta2d.abs().mean(dim=1) if q else torch.zeros(p)
    else:
        alpha = delta2d.abs().mean().reshape(1) if p * q else torch.zeros(1)
    bits = bitpack.pack((delta2d > 0).to(torch.uint8), 1)
    meta = {"type": "sign", "scale": "row" if per_row else "tensor"}
    return Component(meta, {"bits": bits, "scale": alpha.to(torch.float32).contiguous()})


def sign_nbytes(p: int, q: int, per_row: bool) -> int:
    return bitpack.packed_nbytes(p * q, 1) + 4 * (p if per_row else 1)


