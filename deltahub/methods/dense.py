"""Dense: the delta stored whole in the fine-tune's dtype (deltahub's default for 1-D tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.components import Component, encode_dense
from .base import EncodeContext, Method, register_method


@register_method
@dataclass
class Dense(Method):
    """No compression; norms and biases are tiny and the most sensitive to error (D-QRELO, Section 5)."""

    name = "dense"
    kind = "dense"
    natural = "dense, which always has its natural size"
    takes_ratio = False

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        return [encode_dense(delta, ctx.dtype)]
