"""DARE (Yu et al., 2024): drop each delta entry with probability p, rescale survivors by 1/(1-p).

The mask is regenerated from a seed (format/prng.py) by default, so only the surviving values
are stored; ``storage="csr"`` stores explicit positions instead. With a ratio, the drop rate is
the one that fills the budget exactly: the survivors are the elements with the smallest keys.
"""

from __future__ import annotations

import numbers

from dataclasses import dataclass

import torch

from ..format import prng
from ..format.components import Component, encode_sparse
from .base import EncodeContext, Method, largest_fitting, register_method
from .sparsity import float_value_dtype, float_values, sparse_meta


@register_method
@dataclass
class DARE(Method):
    """Random drop with rescale; ``p`` is the drop rate (from the budget when not given)."""

    name = "dare"
    natural = "a fixed drop rate instead of a target (ratio=None, params={'p': P}; CLI: --ratio none --param p=0.9)"
    p: float | None = None
    storage: str = "seeded"
    value_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.storage not in ("seeded", "csr"):
            raise ValueError(f"dare storage must be 'seeded' or 'csr', got {self.storage!r}")
        if self.p is not None and (isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) or not 0 <= self.p < 1):
            raise ValueError(f"dare p must be in [0, 1), got {self.p!r}")

    def smallest(self, p: int, q: int) -> list[dict] | None:
        if self.p is not None:  # a random number of survivors: no size known in advance
            return None
        # One survivor, float32 (the widest value dtype the encoder may fall back to).
        vdt = float_value_dtype(0.0, self.value_dtype) if self.value_dtype else torch.float32
        return [sparse_meta(self.storage, 1, float_values(vdt), {"kind": "bernoulli", "threshold": 1 << prng.KEY_BITS})]

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        p, q = delta.shape
        n = p * q
        full = 1 << prng.KEY_BITS
        if self.p is not None:
            threshold = prng.keep_probability_threshold(1 - self.p)
        else:
            if ctx.budget is None:
                raise ValueError(f"tensor {ctx.name!r}: dare needs a target ratio or a drop rate p")
            threshold = None
        mask_meta = lambda t: {"kind": "bernoulli", "threshold": t}  # noqa: E731
        # float16 values unless the rescaled survivors overflow it or are all subnormal in it; then refit with float32.
        for vdt in ([float_value_dtype(0.0, self.value_dtype)] if self.value_dtype else [torch.float16, torch.float32]):
            t = threshold
            if t is None:
                metas = lambda k: [sparse_meta(self.storage, k, float_values(vdt), mask_meta(full))]  # noqa: E731
                nnz = largest_fitting(1, n, lambda k: ctx.fits(metas(k)))
                if nnz is None:
                    raise ctx.infeasible("dare", metas(1))
                t = prng.bernoulli_threshold(ctx.seed, n, nnz)
            mask = prng.bernoulli_mask(ctx.seed, p, q, t)
            keep_rate = t / full
            values = delta[mask] / keep_rate if keep_rate > 0 else delta[mask]
            if vdt != torch.float16 or values.numel() == 0 or float_value_dtype(float(values.abs().max()), None) == torch.float16:
                break
        threshold = t
        comp = encode_sparse(mask, values, index=self.storage, seed=ctx.seed, mask_meta=mask_meta(threshold), value_dtype=vdt)
        if not ctx.fits([comp.meta]):
            raise ctx.infeasible("dare", [comp.meta], "lower the keep rate (raise p) or raise the ratio")
        return [comp]
