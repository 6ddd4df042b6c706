"""Magnitude pruning: keep the largest |delta| (ties to the lower position), stored as CSR."""

from __future__ import annotations

import numbers

from dataclasses import dataclass

import torch

from ..format.components import Component, encode_sparse
from .base import EncodeContext, Method, largest_fitting, register_method
from .sparsity import float_value_dtype, float_values, sparse_meta


@register_method
@dataclass
class Magnitude(Method):
    """Top-``nnz`` entries by magnitude, float values (float16 unless that overflows), CSR positions."""

    name = "magnitude"
    natural = "a fixed density instead of a target (ratio=None, params={'density': D}; CLI: --ratio none --param density=0.05)"
    density: float | None = None
    value_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.density is not None and (isinstance(self.density, bool) or not isinstance(self.density, numbers.Real) or not 0 < self.density <= 1):
            raise ValueError(f"magnitude density must be in (0, 1], got {self.density!r}")

    def smallest(self, p: int, q: int) -> list[dict]:
        nnz = max(1, round(self.density * p * q)) if self.density is not None else 1
        # float32 values: the widest the encoder picks (float16 overflows on extreme deltas).
        return [sparse_meta("csr", nnz, float_values(float_value_dtype(0.0, self.value_dtype) if self.value_dtype else torch.float32))]

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        p, q = delta.shape
        n = p * q
        vdt = float_value_dtype(float(delta.abs().max()) if n else 0.0, self.value_dtype)
        metas = lambda k: [sparse_meta("csr", k, float_values(vdt))]  # noqa: E731
        if self.density is not None:
            nnz = max(1, round(self.density * n))
            if not ctx.fits(metas(nnz)):
                raise ctx.infeasible("magnitude", metas(nnz), "lower the density or raise the ratio")
        elif ctx.budget is None:
            raise ValueError(f"tensor {ctx.name!r}: magnitude needs a target ratio or a density")
        else:
            nnz = largest_fitting(1, n, lambda k: ctx.fits(metas(k)))
            if nnz is None:
                raise ctx.infeasible("magnitude", metas(1))
        flat = delta.reshape(-1)
        order = torch.argsort(flat.abs(), descending=True, stable=True)[:nnz]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order] = True
        mask = mask.view(p, q)
        return [encode_sparse(mask, delta[mask], index="csr", value_dtype=vdt)]
