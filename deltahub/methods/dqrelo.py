"""D-QRELO (2025): one-bit quantization of the delta, then truncated SVD of the residual.

Delta ~= alpha * Sign(Delta) + U_r S_r V_r^T, with Sign(x) = +1 for x > 0 and -1 for x <= 0,
alpha = mean |Delta| (Eqs. 6-8) and U_r S_r V_r^T the best rank-r approximation of the residual
R = Delta - alpha * Sign(Delta) (Eqs. 10-14). The paper's ratio is rho = rho_1 + 1/b (Eq. 16),
so with b-bit weights a ratio at or below 1/b leaves nothing for the residual and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InfeasibleRatioError
from ..format.components import Component, Segment, encode_lowrank, encode_sign, lowrank_meta
from ..format.records import delta_from_components
from .base import EncodeContext, Method, register_method
from .bitdelta import sign_meta
from .linalg import truncated_svd
from .svd import choose_rank


@register_method
@dataclass
class DQRELO(Method):
    """Sign plane plus the residual's best rank-r approximation (float factors in ``factor_dtype``)."""

    name = "dqrelo"
    natural = "a fixed rank instead of a target (ratio=None, params={'rank': R}; CLI: --ratio none --param rank=R)"
    per_row: bool = False
    rank: int | None = None
    factor_dtype: str = "F16"
    randomized: bool = False
    oversample: int = 16
    niter: int = 4

    def check_ratio(self, ratio: float | None, dtype: torch.dtype, name: str = "") -> None:
        bits = 8 * dtype.itemsize
        if ratio is not None and ratio <= 1 / bits:
            where = f"tensor {name!r}: " if name else ""
            raise InfeasibleRatioError(
                f"{where}dqrelo stores a 1-bit sign plane (1/{bits} of a {bits}-bit delta) plus a low-rank "
                f"residual, so its ratio must be above 1/{bits}; got {ratio:.4g}. Use 'bitdelta' for 1/{bits} or less."
            )

    def smallest(self, p: int, q: int) -> list[dict]:
        # Without a fixed rank the smallest record is the sign plane alone (a rank-0 residual).
        low = [lowrank_meta([Segment(0, self.rank, dtype=self.factor_dtype)])] if self.rank else []
        return [sign_meta(self.per_row)] + low

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        self.check_ratio(ctx.ratio, ctx.dtype, ctx.name)
        sign = encode_sign(delta, self.per_row)
        residual = delta - delta_from_components(tuple(delta.shape), [sign])
        metas = lambda r: [lowrank_meta([Segment(0, r, dtype=self.factor_dtype)])]  # noqa: E731
        if self.rank is None and ctx.budget is not None and not ctx.fits([sign_meta(self.per_row)] + metas(1)):
            # Room for the sign plane only: D-QRELO with a rank-0 residual, i.e. BitDelta.
            if not ctx.fits([sign_meta(self.per_row)]):
                raise ctx.infeasible("dqrelo", [sign_meta(self.per_row)])
            return [sign]
        rank = choose_rank(self.rank, min(delta.shape), metas, ctx, "dqrelo", extra=[sign_meta(self.per_row)])
        u, s, v = truncated_svd(residual, rank, randomized=self.randomized, oversample=self.oversample, niter=self.niter, seed=ctx.seed)
        return [sign, encode_lowrank(u, s, v, [Segment(0, rank, dtype=self.factor_dtype)])]
