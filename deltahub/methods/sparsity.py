"""Helpers shared by the sparse methods (deltadq, dare, magnitude)."""

from __future__ import annotations

import torch

from ..format.quant import F16_MAX, F16_MIN_NORMAL


def float_value_dtype(values_absmax: float, requested: str | None) -> torch.dtype:
    """float16 unless a value would overflow it or even the largest would be subnormal in it
    (tiny deltas would lose their precision, down to zero): then float32. Or the dtype asked for."""
    if requested is not None:
        from ..format.dtypes import to_torch

        return to_torch(requested)
    return torch.float16 if values_absmax == 0 or F16_MIN_NORMAL <= values_absmax <= F16_MAX else torch.float32


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
