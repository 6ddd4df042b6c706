"""Safetensors dtype names and their torch equivalents, as used in the spec."""

from __future__ import annotations

import torch

from ..errors import FormatError

# Names are safetensors' own (spec/FORMAT.md, "Dtypes").
_BY_NAME: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
_BY_DTYPE = {v: k for k, v in _BY_NAME.items()}

FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
KNOWN_DTYPES = tuple(_BY_NAME)


def to_torch(name: str) -> torch.dtype:
    """``"BF16"`` -> ``torch.bfloat16``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r}; the format knows {sorted(_BY_NAME)}") from None


def to_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"BF16"``."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} has no safetensors name") from None


def itemsize(name: str) -> int:
    """Bytes per element of a dtype name."""
    return to_torch(name).itemsize


def parse_user_dtype(value: str | torch.dtype) -> torch.dtype:
    """Accept ``"bfloat16"``, ``"bf16"``, ``"BF16"`` or a ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        return value
    v = value.strip()
    if v.upper() in _BY_NAME:
        return _BY_NAME[v.upper()]
    dt = getattr(torch, v.lower(), None)
    if isinstance(dt, torch.dtype):
        return dt
    raise ValueError(f"unknown dtype {value!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
