"""Truncated SVD of the delta (Ryu et al., 2023; mergekit's LoRA extraction): the best rank-r
approximation in Frobenius norm (Eckart-Young), factors stored as floats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.components import Component, Segment, encode_lowrank, lowrank_meta
from .base import EncodeContext, Method, largest_fitting, register_method
from .linalg import truncated_svd


@register_method
@dataclass
class SVD(Method):
    """Rank from the budget (or ``rank``); U and V in ``factor_dtype``, S in float32.

    ``randomized=True`` uses a randomized SVD with ``oversample`` extra probes and ``niter``
    power iterations: faster on wide matrices, slightly worse on long-tailed spectra.
    """

    name = "svd"
    natural = "a fixed rank instead of a target (ratio=None, params={'rank': R}; CLI: --ratio none --param rank=R)"
    rank: int | None = None
    factor_dtype: str = "F16"
    randomized: bool = False
    oversample: int = 16
    niter: int = 4

    def _metas(self, r: int) -> list[dict]:
        return [lowrank_meta([Segment(0, r, dtype=self.factor_dtype)])]

    def smallest(self, p: int, q: int) -> list[dict]:
        return self._metas(self.rank or 1)

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        rank = choose_rank(self.rank, min(delta.shape), self._metas, ctx, "svd")
        u, s, v = truncated_svd(delta, rank, randomized=self.randomized, oversample=self.oversample, niter=self.niter, seed=ctx.seed)
        return [encode_lowrank(u, s, v, [Segment(0, rank, dtype=self.factor_dtype)])]


def choose_rank(rank: int | None, max_rank: int, metas, ctx: EncodeContext, method: str, extra: list[dict] | None = None) -> int:
    """The given rank (checked against the budget) or the largest rank the budget holds."""
    extra = extra or []
    if rank is not None:
        if not 1 <= rank <= max_rank:
            raise ValueError(f"tensor {ctx.name!r}: {method} rank must be in 1..{max_rank}, got {rank}")
        if not ctx.fits(extra + metas(rank)):
            raise ctx.infeasible(method, extra + metas(rank), f"rank {rank} does not fit; lower the rank or raise the ratio")
        return rank
    if ctx.budget is None:
        raise ValueError(f"tensor {ctx.name!r}: {method} needs a target ratio or an explicit rank")
    best = largest_fitting(1, max_rank, lambda r: ctx.fits(extra + metas(r)))
    if best is None:
        raise ctx.infeasible(method, extra + metas(1))
    return best
