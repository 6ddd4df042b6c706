"""Helpers shared by the sparse methods (deltadq, dare, magnitude)."""

from __future__ import annotations

import torch

from ..format.quant import F16_MAX


def float_value_dtype(values_absmax: float, requested: str | None) -> torch.dtype:
    """float16 unless a value would overflow it (then float32), or the dtype asked for."""
    if requested is not None:
        from ..format.dtypes import to_torch

        return to_torch(requested)
    return torch.float16 if values_absmax <= F16_MAX else torch.float32


def sparse_meta(index: str, nnz: int, values: dict, mask: dict | None = None) -> dict:
    """Skeleton meta of a sparse component, for planning budgets (seed at its full width)."""
    meta: dict = {"type": "sparse", "index": index, "nnz": nnz, "values": values}
    if index == "seeded":
        meta["seed"] = "0" * 16
        meta["mask"] = mask
    return meta


def float_values(dtype: torch.dtype) -> dict:
    from ..format.dtypes import to_name

    return {"dtype": to_name(dtype)}
