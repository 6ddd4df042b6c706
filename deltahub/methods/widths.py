"""Bit widths of singular vectors, chosen by error removed per byte (``auto``'s low-rank part).

Delta-CoMe fixes the widths (8 bits for 2 vectors, 3 for 32, 2 for the rest). Here each singular
vector ``i`` of each tensor is dropped or stored at one of ``levels`` bits, and bytes go, one step
at a time, to the step that removes the most squared error per byte, across every tensor at
once. Storing vector pair ``i`` at ``b`` bits leaves about ``σ_i² · e(b)`` of its energy as
error, ``e(b) = 2 · 2.25 / (2^b - 1)²``: round-to-nearest in groups of 128 leaves 0.25, 0.046,
0.010 and 0.00003 of a unit vector's energy at 2, 3, 4 and 8 bits (measured on random orthonormal
vectors of lengths 576 to 8192), once in U and once in V. Widths never increase along the
spectrum, so each tensor's choice is a handful of contiguous segments, as the spec stores them.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..format.components import Segment

# Bytes of one segment's JSON and header entries (six stored keys), charged when a width first appears.
SEGMENT_OVERHEAD = 720


def width_error(bits: int) -> float:
    """Fraction of a singular vector pair's energy left as error when stored at ``bits`` (0: dropped)."""
    return 1.0 if bits == 0 else min(1.0, 4.5 / ((1 << bits) - 1) ** 2)


@dataclass
class Spectrum:
    """One tensor as the allocator sees it: singular values and the shape of one block."""

    singular_values: Sequence[float]
    p: int
    q: int
    blocks: int = 1
    group_size: int = 128
    counts: list[int] = field(default_factory=list)  # counts[j]: vectors with at least levels[j] bits
    segment_bytes: int = SEGMENT_OVERHEAD  # what a new segment costs besides its data

    def step_bytes(self, levels: Sequence[int], j: int) -> float:
        """Bytes of raising the next vector from ``levels[j-1]`` (or nothing) to ``levels[j]`` bits."""
        prev = levels[j - 1] if j else 0
        cost = (self.p + self.q) * (levels[j] - prev) / 8
        if j == 0:  # a stored vector pays its group scales and zero points, and its singular value
            cost += (math.ceil(self.p / self.group_size) + math.ceil(self.q / self.group_size)) * 3 + 4
        if self.counts[j] == 0:
            cost += self.segment_bytes
        return cost * self.blocks

    def step_gain(self, levels: Sequence[int], j: int) -> float:
        i = self.counts[j]
        prev = levels[j - 1] if j else 0
        return float(self.singular_values[i]) ** 2 * (width_error(prev) - width_error(levels[j])) * self.blocks

    def can_step(self, j: int) -> bool:
        limit = len(self.singular_values) if j == 0 else self.counts[j - 1]
        return self.counts[j] < limit and float(self.singular_values[self.counts[j]]) > 0

    def segments(self, levels: Sequence[int]) -> list[Segment]:
        """The rank segments, widest first: ``[counts[j+1], counts[j])`` at ``levels[j]`` bits."""
        segs = []
        for j in reversed(range(len(levels))):
            start = self.counts[j + 1] if j + 1 < len(levels) else 0
            if self.counts[j] > start:
                segs.append(Segment(start, self.counts[j], bits=levels[j], group_size=self.group_size))
        return segs


def allocate_widths(spectra: Sequence[Spectrum], budget: float, levels: Sequence[int] = (2, 3, 4, 8), start_with_one: bool = False) -> None:
    """Fill each spectrum's ``counts`` greedily within ``budget`` bytes (steps that no longer fit are
    skipped). ``start_with_one`` first gives every tensor one vector at the lowest width, so that
    none is left without a record that fits.

    >>> s = Spectrum([10.0, 1.0, 0.1], p=64, q=64)
    >>> allocate_widths([s], budget=900)
    >>> s.segments((2, 3, 4, 8))
    [Segment(start=0, end=3, bits=2, group_size=128, dtype='F16')]
    """
    heap: list[tuple[float, int, int, int]] = []
    version = [0] * len(spectra)

    def push(t: int) -> None:
        s = spectra[t]
        for j in range(len(levels)):
            if s.can_step(j):
                heapq.heappush(heap, (-s.step_gain(levels, j) / s.step_bytes(levels, j), t, j, version[t]))

    left = float(budget)
    for t, s in enumerate(spectra):
        s.counts = [0] * len(levels)
        if start_with_one and s.can_step(0):
            left -= s.step_bytes(levels, 0)
            s.counts[0] = 1
        push(t)
    while heap:
        _, t, j, v = heapq.heappop(heap)
        s = spectra[t]
        if v != version[t] or not s.can_step(j):
            continue
        cost = s.step_bytes(levels, j)
        if cost > left:
            continue
        left -= cost
        s.counts[j] += 1
        version[t] += 1
        push(t)


def spectrum_of(singular_values: torch.Tensor, p: int, q: int, blocks: int = 1, group_size: int = 128, segment_bytes: int = SEGMENT_OVERHEAD) -> Spectrum:
    return Spectrum(singular_values.double().tolist(), p, q, blocks, group_size, segment_bytes=segment_bytes)
