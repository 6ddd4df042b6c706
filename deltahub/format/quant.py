"""Uniform asymmetric quantization with integer zero points (spec/FORMAT.md, "Quantization").

Decoding is exact and fixed by the spec: ``value = scale * (code - zero)`` in float32.
Encoding is the writer's choice; deltahub's is data-free round-to-nearest:
the range of each group is ``[min(x, 0), max(x, 0)]`` (so zero is always representable),
``scale = (hi - lo) / (2**bits - 1)`` rounded up to the stored scale dtype,
``zero = clamp(round(-lo / scale))`` and ``code = clamp(round(x / scale) + zero)``,
rounding half to even, with the *stored* scale so the error is the one readers see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError

F16_MIN_NORMAL = 2.0**-14
F16_MAX = 65504.0


@dataclass(frozen=True)
class GroupQuant:
    """Codes of ``n`` vectors of length ``length``, quantized in groups along the vector."""

    codes: torch.Tensor  # uint8 [n, length]
    scale: torch.Tensor  # float16 or float32 [n, ngroups]
    zero: torch.Tensor  # uint8 [n, ngroups]


def _pick_scale_dtype(scale: torch.Tensor) -> torch.dtype:
    """F16 when every scale is a normal float16 number, else F32 (tiny or huge deltas)."""
    s = scale[scale != 1.0] if scale.numel() else scale  # 1.0 marks all-zero groups
    if s.numel() == 0 or (float(s.min()) >= F16_MIN_NORMAL and float(s.max()) <= F16_MAX):
        return torch.float16
    return torch.float32


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None) -> GroupQuant:
    """Quantize each row of ``x`` [n, length] in groups of ``group_size`` consecutive elements.

    >>> q = quantize_groups(torch.tensor([[0.5, -1.0, 0.75]]), bits=2, group_size=2)
    >>> dequantize_groups(q.codes, q.scale, q.zero, 2).tolist()
    [[0.5, -1.0, 0.75]]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    x = x.to(torch.float32)
    n, length = x.shape
    ngroups = -(-length // group_size) if length else 0
    padded = torch.zeros(n, ngroups * group_size, dtype=torch.float32)
    padded[:, :length] = x
    g = padded.view(n, ngroups, group_size)
    lo = g.amin(dim=2).clamp(max=0.0)
    hi = g.amax(dim=2).clamp(min=0.0)
    qmax = (1 << bits) - 1
    exact = (hi.to(torch.float64) - lo.to(torch.float64)) / qmax
    exact = torch.where(exact > 0, exact, torch.ones_like(exact))
    sdt = scale_dtype or _pick_scale_dtype(exact)
    # Round the scale up to the stored dtype, never down: a smaller scale would leave the
    # group's extreme values outside the code range, clamped by more than half a step.
    stored = exact.to(sdt)
    stored = torch.where(stored.to(torch.float64) < exact, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    scale = stored.to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    codes = (torch.round(g / scale[:, :, None]) + zero[:, :, None]).clamp(0, qmax)
    codes = codes.reshape(n, ngroups * group_size)[:, :length]
    return GroupQuant(codes.to(torch.uint8), scale.to(sdt), zero.to(torch.uint8))


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scale * (code - zero)`` per group, in float32; ``codes`` is [n, length]. Runs on the
    tensors' device (serving dequantizes on the GPU in every forward).

    Memory is bounded by the codes, never by ``group_size`` (which comes from the file): a
    group longer than the vector is one group over the vector, with the same values.

    >>> dequantize_groups(torch.tensor([[3, 0]], dtype=torch.uint8), torch.tensor([[0.5]]), torch.tensor([[1]], dtype=torch.uint8), 1 << 31).tolist()
    [[1.0, -0.5]]
    """
    n, length = codes.shape
    g = max(1, min(group_size, length))
    ngroups = -(-length // g)
    if scale.shape != (n, ngroups) or zero.shape != (n, ngroups):
        raise FormatError(f"quantized vectors of length {length} in groups of {group_size} need scale and zero of shape {[n, ngroups]}, got {list(scale.shape)} and {list(zero.shape)}; the file is corrupted")
    # Groups as a dimension of their own, so scale and zero broadcast instead of being
    # gathered out to every element (3x faster); the arithmetic is the same, element by element.
    # Padding the last group costs less than one group, which is at most the vector's length.
    x = torch.zeros(n, ngroups * g, dtype=torch.float32, device=codes.device)
    x[:, :length] = codes
    x = x.view(n, ngroups, g).sub_(zero.to(torch.float32)[:, :, None]).mul_(scale.to(torch.float32)[:, :, None])
    return x.view(n, ngroups * g)[:, :length]


def quantize_tensor(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, int]:
    """Per-tensor quantization (one group, float32 scale): ``(codes, scale, zero)``."""
    flat = x.reshape(1, -1)
    q = quantize_groups(flat, bits, max(flat.shape[1], 1), scale_dtype=torch.float32)
    return q.codes.reshape(-1), float(q.scale.reshape(-1)[0]) if q.scale.numel() else 1.0, int(q.zero.reshape(-1)[0]) if q.zero.numel() else 0
