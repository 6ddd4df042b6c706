"""Decoding helpers for operators that ``deltahub.format`` cannot provide on a GPU.

Operators keep their tensors on the wrapped module's device (a GPU when the base is there)
and decode slices of them on every forward. Group dequantization is ``format.quant``'s
(device-agnostic already) and the sign table is ``format.components.sign.SIGN_TABLE``; only
unpacking k-bit codes needs its own torch version, as ``format.bitpack.unpack`` works in numpy
on the CPU.
"""

from __future__ import annotations

import torch

from ..format.components.sign import SIGN_TABLE


def unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``count`` codes of ``bits`` bits from a packed uint8 stream (LSB first), as uint8, on
    ``data``'s device: the same codes as ``format.bitpack.unpack`` (spec/FORMAT.md §7), which
    runs in numpy and so would copy a GPU tensor to the host and back on every forward.

    >>> from deltahub.format import bitpack
    >>> unpack_codes(bitpack.pack(torch.tensor([5, 2, 7]), 3), 3, 3).tolist()
    [5, 2, 7]
    """
    data = data.reshape(-1)
    if bits == 8:
        return data[:count]
    if 8 % bits == 0:  # whole codes per byte: shift every byte at once
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
        return ((data[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    stream = ((data[:, None] >> torch.arange(8, dtype=torch.uint8, device=data.device)) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits, device=data.device)).to(torch.int32)
    return (stream.view(count, bits).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``SIGN_TABLE`` on ``device`` in ``dtype``, copied there once (not on every forward)."""
    key = (torch.device(device), dtype)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = SIGN_TABLE.to(device=device, dtype=dtype)
    return t
