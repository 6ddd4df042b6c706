"""Delta-CoMe (Ping et al., 2024): SVD of the delta with mixed-precision singular vectors.

Vectors of larger singular values get more bits. The default follows the paper's best
"8+3+2" setting (Section 5.1): the first 2 vectors at 8 bits, the next 32 at 3 bits, the rest
at 2 bits up to the budget, group size 128. The paper quantizes with GPTQ on calibration
data; deltahub's default is data-free round-to-nearest (format/quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.components import Component, Segment, encode_lowrank, lowrank_meta
from .base import EncodeContext, Method, register_method
from .linalg import truncated_svd
from .svd import choose_rank


def mixed_segments(rank: int, bits: tuple[int, ...], counts: tuple[int, ...], group_size: int) -> list[Segment]:
    """Split ``[0, rank)``: ``counts[i]`` vectors at ``bits[i]``, the last width taking the rest."""
    segs: list[Segment] = []
    start = 0
    for i, b in enumerate(bits):
        width = counts[i] if i < len(counts) else rank - start
        end = min(rank, start + width)
        if end > start:
            segs.append(Segment(start, end, bits=b, group_size=group_size))
        start = end
    return segs


@register_method
@dataclass
class DeltaCoMe(Method):
    """Mixed-precision singular vectors: ``bits[i]`` for the next ``counts[i]`` vectors, the last width for the rest."""

    name = "deltacome"
    natural = "a fixed rank instead of a target (ratio=None, params={'rank': R}; CLI: --ratio none --param rank=R)"
    bits: tuple[int, ...] = (8, 3, 2)
    counts: tuple[int, ...] = (2, 32)
    group_size: int = 128
    rank: int | None = None

    def __post_init__(self) -> None:
        self.bits, self.counts = tuple(self.bits), tuple(self.counts)
        if len(self.counts) != len(self.bits) - 1 or not all(1 <= b <= 8 for b in self.bits):
            raise ValueError(f"deltacome needs bits in 1..8 and one count fewer than bit widths, got bits={self.bits} counts={self.counts}")

    def _segs(self, r: int) -> list[Segment]:
        return mixed_segments(r, self.bits, self.counts, self.group_size)

    def smallest(self, p: int, q: int) -> list[dict]:
        return [lowrank_meta(self._segs(self.rank or 1))]

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        rank = choose_rank(self.rank, min(delta.shape), lambda r: [lowrank_meta(self._segs(r))], ctx, "deltacome")
        u, s, v = truncated_svd(delta, rank)
        # Scales fall back to float32 for extreme deltas, which costs bytes: shrink until it fits.
        while True:
            comp = encode_lowrank(u[:, :rank], s[:rank], v[:, :rank], self._segs(rank))
            if ctx.fits([comp.meta]) or rank == 1 or self.rank is not None:
                if not ctx.fits([comp.meta]):
                    raise ctx.infeasible("deltacome", [comp.meta])
                return [comp]
            rank -= 1
