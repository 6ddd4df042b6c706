"""BitDelta (Liu et al., 2024): alpha * sign(delta), alpha = mean |delta|, per tensor or per row.

The paper then tunes alpha by distillation; deltahub keeps the data-free closed form, which
minimizes the Frobenius error for a fixed sign pattern (D-QRELO, Eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.components import Component, encode_sign
from .base import EncodeContext, Method, register_method


def sign_meta(per_row: bool) -> dict:
    return {"type": "sign", "scale": "row" if per_row else "tensor"}


@register_method
@dataclass
class BitDelta(Method):
    """1 bit per weight plus one float32 scale per tensor (or per row with ``per_row=True``)."""

    name = "bitdelta"
    natural = "bitdelta's natural size, 1 bit per weight plus its scales (ratio=None; CLI: --ratio none)"
    per_row: bool = False

    def smallest(self, p: int, q: int) -> list[dict]:
        return [sign_meta(self.per_row)]

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        if not ctx.fits([sign_meta(self.per_row)]):
            raise ctx.infeasible("bitdelta", [sign_meta(self.per_row)], "bitdelta costs 1 bit per weight: a ratio of 1/16 for 16-bit weights")
        return [encode_sign(delta, self.per_row)]
