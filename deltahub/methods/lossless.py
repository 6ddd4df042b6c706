"""Lossless: the fine-tune bit for bit (zstd of the byte planes of ft XOR base, format/components/lossless.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.components import Component, encode_lossless
from .base import EncodeContext, Method, register_method


@register_method
@dataclass
class Lossless(Method):
    """Exact, at its natural size: it takes no target ratio (the CLI refuses one; the Python
    API's default target is ignored for it)."""

    name = "lossless"
    natural = "lossless, which always has its natural size (ratio=None; CLI: --ratio none)"
    takes_ratio = False
    needs_weights = True
    level: int = 10

    def encode_weights(self, base: torch.Tensor, finetuned: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        comp = encode_lossless(base, finetuned, level=self.level)
        if not ctx.fits([comp.meta]):
            raise ctx.infeasible("lossless", [comp.meta], "lossless size depends on the data; raise the ratio or use a lossy method")
        return [comp]
