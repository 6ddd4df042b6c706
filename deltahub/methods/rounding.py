"""Unbiased k-bit rounding of sparse values, for ``auto``.

Values are rounded up or down at random (stochastic rounding) so that their expectation is the
value itself. When the encoder knows the base weights and the dtype the decoded tensor is cast
to, it goes one step further and makes the *merged weight* unbiased: a decoder computes
``cast(float32(W) + value)``, and when a grid step is close to the spacing of the dtype at ``W``
(a light fine-tune of a bf16 model: deltas of one or two bf16 ulps), that final cast snaps the
grid values to the weights' own grid, deterministically. On the SmolLM2 light pair this snapping
shrank the delta by 8% on the largest class of weights and cost 1.2 points of retention at 1/8
(benchmarks/README.md). :func:`stochastic_codes` with ``base`` picks, per value, the two codes
whose merged weights bracket the fine-tuned one most tightly and draws between them so the merged
weight is right on average.
"""

from __future__ import annotations

import numpy as np
import torch

from ..format import prng

# The stochastic-rounding stream of a tensor: its seed mixed with this constant, so the rounding
# keys are independent of the mask keys drawn from the seed itself.
ROUNDING_STREAM = 0x5EED_0F_A070_0001


def grid(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """``(scale, zero)`` of a ``bits``-bit grid through 0 that reaches both ``lo`` and ``hi``:
    an integer zero point first, then the scale (rounded up to float32).

    >>> scale, zero = grid(-1.0, 2.0, 2)  # codes 0..3 are -1, 0, 1, 2 steps
    >>> zero, scale >= 1.0
    (1, True)
    """
    qmax = (1 << bits) - 1
    if hi == lo:
        return 1.0, 0
    zero = int(min(max(round(-lo / (hi - lo) * qmax), 0), qmax))
    scale = max(-lo / zero if zero else 0.0, hi / (qmax - zero) if zero < qmax else 0.0)
    return float(np.nextafter(np.float32(scale), np.float32(np.inf))), zero


# Values are rounded a chunk at a time: the merged-weight search keeps about ten float64
# temporaries per value, which for a whole embedding would be gigabytes.
_CHUNK = 1 << 20


def uniforms(seed: int, start: int, count: int) -> torch.Tensor:
    """Rounding draws ``start .. start+count-1`` of a tensor, uniform in [0, 1), float64."""
    return prng.keys(seed ^ ROUNDING_STREAM, start, count).to(torch.float64) / float(1 << prng.KEY_BITS)


def stochastic_codes(
    values: torch.Tensor,
    bits: int,
    seed: int,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Per-tensor ``bits``-bit codes of ``values`` rounded up or down at random, unbiased.

    ``value ≈ scale * (code - zero)``, with ``E[scale * (code - zero)] = value`` inside the range
    (which includes zero). With ``base`` (the base weights at the values' positions) and
    ``dtype`` (what the decoded tensor is cast to), the expectation that is right is that of the
    merged weight ``cast(float32(base) + scale * (code - zero))``, as a decoder computes it.
    Returns ``(codes, scale, zero)``.

    >>> codes, scale, zero = stochastic_codes(torch.tensor([0.0, 0.5, -1.0]), 2, seed=0)
    >>> codes[0].item() == zero  # zero is on the grid: it stays exactly zero
    True
    """
    qmax = (1 << bits) - 1
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8), 1.0, 0
    lo = min(float(values.min()), 0.0)
    hi = max(float(values.max()), 0.0)
    if hi == lo:
        return torch.zeros(values.numel(), dtype=torch.uint8), 1.0, 0
    # The grid reaches both ends of the range: a value clamped at an end would be rounded with a bias.
    scale, zero = grid(lo, hi, bits)
    flat = values.reshape(-1)
    weights = None if base is None or dtype is None else base.reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        v = flat[start : start + _CHUNK]
        u = uniforms(seed, start, v.numel())
        x = v.to(torch.float64) / scale + zero
        if weights is None:
            codes[start : start + v.numel()] = torch.floor(x + u).clamp(0, qmax).to(torch.uint8)
        else:
            codes[start : start + v.numel()] = _merged_codes(v, x, u, weights[start : start + v.numel()], dtype, scale, zero, qmax)
    return codes, scale, zero


def _merged_codes(values, x, u, base, dtype, scale, zero, qmax) -> torch.Tensor:
    w = base.reshape(-1).to(torch.float32)
    scale32 = torch.tensor(scale, dtype=torch.float32)

    def merged(c: torch.Tensor) -> torch.Tensor:
        # Exactly the decoder's arithmetic (format/components/sparse.py): float32 value, one
        # float32 addition onto the base, one cast.
        return (w + scale32 * (c.to(torch.float32) - float(zero))).to(dtype).to(torch.float64)

    target = w.to(torch.float64) + values.to(torch.float64)
    low = torch.floor(x).clamp(0, qmax)
    high = (low + 1).clamp(max=qmax)
    y_low, y_high = merged(low), merged(high)
    # Move the bracket until merged(low) <= target <= merged(high) with neighbouring codes; codes
    # that merge to the same weight are stepped over. A few passes at most in practice.
    for _ in range(qmax + 1):
        up = (y_high < target) & (high < qmax)
        down = (y_low > target) & (low > 0)
        if not bool(up.any() or down.any()):
            break
        low, high = torch.where(up, high, torch.where(down, low - 1, low)), torch.where(up, high + 1, torch.where(down, low, high))
        y_low, y_high = merged(low), merged(high)
    gap = y_high - y_low
    p_high = torch.where(gap > 0, (target - y_low) / torch.where(gap > 0, gap, 1.0), (target > y_low).to(torch.float64))
    return torch.where(u < p_high.clamp(0, 1), high, low).to(torch.uint8)


def sample_variance(delta: torch.Tensor, keep: float, bits: int) -> float:
    """Expected squared error of keeping ``keep`` of ``delta`` (rescaled by ``1/keep``) at ``bits``
    bits with stochastic rounding: ``(1/k - 1) ||Δ||²`` from the drop, plus the rounding's
    ``Σ f (1 - f) s²`` over the kept values (``f`` the fraction of a step ``s`` each value lies
    above its lower grid point; zero, on the grid, costs nothing).

    >>> d = torch.tensor([[0.5, -1.0], [0.25, 2.0]])
    >>> sample_variance(d, 1.0, 8) < sample_variance(d, 0.5, 8)
    True
    """
    energy = float(torch.linalg.vector_norm(delta)) ** 2
    flat = delta.reshape(-1)
    scale, zero = grid(min(float(flat.min()) / keep, 0.0), max(float(flat.max()) / keep, 0.0), bits)
    rounding = 0.0
    for start in range(0, flat.numel(), _CHUNK):
        x = flat[start : start + _CHUNK].to(torch.float64) / keep / scale + zero
        frac = x - torch.floor(x)
        rounding += float((frac * (1 - frac)).sum())
    return (1 / keep - 1) * energy + keep * rounding * scale**2
