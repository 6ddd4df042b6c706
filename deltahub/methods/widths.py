"""Bit widths of singular vectors, chosen by error removed per byte (``auto``'s low-rank part).

Delta-CoMe fixes the widths (8 bits for 2 vectors, 3 for 32, 2 for the rest). Here each singular
vector ``i`` of each tensor is dropped or stored at one of ``levels`` bits, and bytes go, one step
at a time, to the step that removes the most squared error per byte, across every tensor at
once. A step raises a tensor's next vector below some width straight to that width, so that a
segment's overhead is paid only for the segments the record keeps. Storing vector pair ``i`` at ``b`` bits leaves about ``σ_i² · e(b)`` of its energy as
error, ``e(b) = 2 · 2.25 / (2^b - 1)²``: round-to-nearest in groups of 128 leaves 0.25, 0.046,
0.010 and 0.00003 of a unit vector's energy at 2, 3, 4 and 8 bits (measured on random orthonormal
vectors of lengths 576 to 8192), once in U and once in V; ``auto`` counts that noise at a weight
(``noise_weight``, 0.1 by default) against a dropped vector's error (methods/auto.py). Widths never increase along the
spectrum, so each tensor's choice is a handful of contiguous segments, as the spec stores them.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..format.components import Segment

# Bytes of one segment's JSON and header entries (six stored keys), charged when a width first appears.
SEGMENT_OVERHEAD = 720


def width_error(bits: int, noise_weight: float = 1.0) -> float:
    """Fraction of a singular vector pair's energy left as error when stored at ``bits`` (0: dropped),
    the rounding noise counted ``noise_weight`` times."""
    return 1.0 if bits == 0 else min(1.0, noise_weight * 4.5 / ((1 << bits) - 1) ** 2)


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
    noise_weight: float = 1.0  # rounding noise's weight against a dropped vector's error

    def _tables(self, levels: Sequence[int]) -> None:
        # The allocator asks millions of times: per-level costs and error factors computed once.
        if getattr(self, "_levels", None) == tuple(levels):
            return
        self._levels = tuple(levels)
        self._squares = [float(v) ** 2 for v in self.singular_values]
        self._cost, self._factor = [], []
        for j, bits in enumerate(levels):
            prev = levels[j - 1] if j else 0
            cost = (self.p + self.q) * (bits - prev) / 8
            if j == 0:  # a stored vector pays its group scales and zero points, and its singular value
                cost += (math.ceil(self.p / self.group_size) + math.ceil(self.q / self.group_size)) * 3 + 4
            self._cost.append(cost)
            self._factor.append(width_error(prev, self.noise_weight) - width_error(bits, self.noise_weight))

    def _width_of_next(self, j: int) -> int:
        """The level index of vector ``counts[j]`` now (-1: dropped)."""
        i = self.counts[j]
        return max((l for l in range(j) if self.counts[l] > i), default=-1)

    def step_bytes(self, levels: Sequence[int], j: int) -> float:
        """Bytes of raising the next vector below ``levels[j]`` (vector ``counts[j]``) from its width
        (or nothing) straight to ``levels[j]`` bits: its data, plus a segment's overhead if the step
        opens the ``levels[j]`` segment, less one if it empties the segment the vector leaves. The
        record holds only its nonempty segments, so only those are charged: a dominant vector's
        way up to 8 bits costs its data, not a segment for every width it passes (charged so, a
        tight budget bought near-zero vectors at the lowest width instead)."""
        self._tables(levels)
        i, l = self.counts[j], self._width_of_next(j)
        above = self.counts[j + 1] if j + 1 < len(levels) else 0
        opens = i == above  # the levels[j] segment [counts[j+1], counts[j]) is empty
        empties = l >= 0 and self.counts[l] == i + 1
        data = sum(self._cost[l + 1 : j + 1])
        return (data + self.segment_bytes * (int(opens) - int(empties))) * self.blocks

    def step_gain(self, levels: Sequence[int], j: int) -> float:
        self._tables(levels)
        l = self._width_of_next(j)
        return self._squares[self.counts[j]] * sum(self._factor[l + 1 : j + 1]) * self.blocks

    def can_step(self, j: int) -> bool:
        i = self.counts[j]
        return i < len(self.singular_values) and float(self.singular_values[i]) > 0

    def step(self, j: int) -> None:
        """Raise vector ``counts[j]`` to level ``j``: it joins every level between its width and ``j``."""
        for k in range(self._width_of_next(j) + 1, j + 1):
            self.counts[k] += 1

    def error_left(self, levels: Sequence[int]) -> float:
        """The squared error the current ``counts`` leave, as the allocator models it."""
        bits = [0] * len(self.singular_values)
        for j, c in enumerate(self.counts):
            bits[:c] = [levels[j]] * c
        return sum(float(sv) ** 2 * width_error(b, self.noise_weight) for sv, b in zip(self.singular_values, bits)) * self.blocks

    def segments(self, levels: Sequence[int]) -> list[Segment]:
        """The rank segments, widest first: ``[counts[j+1], counts[j])`` at ``levels[j]`` bits."""
        segs = []
        for j in reversed(range(len(levels))):
            start = self.counts[j + 1] if j + 1 < len(levels) else 0
            if self.counts[j] > start:
                segs.append(Segment(start, self.counts[j], bits=levels[j], group_size=self.group_size))
        return segs


def allocate_widths(
    spectra: Sequence[Spectrum],
    budget: float,
    levels: Sequence[int] = (2, 3, 4, 8),
    start_with_one: bool = False,
    min_rate: float = 0.0,
) -> tuple[float, float]:
    """Fill each spectrum's ``counts`` greedily within ``budget`` bytes (steps that no longer fit are
    skipped), taking no step that removes less than ``min_rate`` squared error per byte.
    ``start_with_one`` first gives every tensor one vector at the lowest width, so that none is
    left without a record that fits. Returns ``(rate, spent)``: the error removed per byte by the
    last step taken (``inf`` if none), the marginal price of a byte, and the bytes spent.

    >>> s = Spectrum([10.0, 1.0, 0.1], p=64, q=64)
    >>> rate, spent = allocate_widths([s], budget=900)
    >>> s.segments((2, 3, 4, 8)), spent <= 900  # the dominant vector at 8 bits, not three at 2
    ([Segment(start=0, end=1, bits=8, group_size=128, dtype='F16')], True)
    """
    heap: list[tuple[float, int, int, int]] = []
    # One version per tensor: a step changes that tensor's next steps (which vector, from which
    # width, which segments open or empty) and no other tensor's. A step that did not fit is
    # dropped (the bytes left only shrink, but for the rare step that empties a segment).
    version = [0] * len(spectra)

    def push(t: int, j: int) -> None:
        s = spectra[t]
        if s.can_step(j):
            cost = s.step_bytes(levels, j)
            # A step that empties a segment may free more bytes than its data takes: take it first.
            heapq.heappush(heap, (-s.step_gain(levels, j) / cost if cost > 0 else -math.inf, t, j, version[t]))

    spent = 0.0
    rate = math.inf
    for t, s in enumerate(spectra):
        s.counts = [0] * len(levels)
        if start_with_one and s.can_step(0):
            spent += s.step_bytes(levels, 0)
            s.counts[0] = 1
        for j in range(len(levels)):
            push(t, j)
    while heap:
        neg_rate, t, j, v = heapq.heappop(heap)
        s = spectra[t]
        if v != version[t] or not s.can_step(j):
            continue
        if -neg_rate < min_rate:
            break
        cost = s.step_bytes(levels, j)
        if cost > budget - spent:
            continue
        spent += cost
        if cost > 0:  # the price of a byte: what the last step that bought bytes removed per byte
            rate = -neg_rate
        s.step(j)
        version[t] += 1
        for k in range(len(levels)):
            push(t, k)
    return rate, spent


def allocate_measured(
    spectra: Sequence[Spectrum],
    budget: float,
    room: float,
    measure: Callable[[], float],
    tolerance: float,
    levels: Sequence[int] = (2, 3, 4, 8),
) -> None:
    """:func:`allocate_widths` with its byte estimates corrected: allocate ``room`` bytes, ``measure()``
    what the chosen records really take, hand the difference to ``budget`` back, up to four passes
    or until less than ``tolerance`` is left; the last allocation within ``budget`` is kept (the
    first one if none is)."""
    best: list[list[int]] | None = None
    for _ in range(4):
        allocate_widths(spectra, room, levels, start_with_one=True)
        real = measure()
        if real <= budget:
            best = [list(s.counts) for s in spectra]
        if 0 <= budget - real < tolerance:
            break
        room += budget - real
    if best is not None:
        for s, counts in zip(spectra, best):
            s.counts = counts


def spectrum_of(
    singular_values: torch.Tensor, p: int, q: int, blocks: int = 1, group_size: int = 128, segment_bytes: int = SEGMENT_OVERHEAD, noise_weight: float = 1.0
) -> Spectrum:
    return Spectrum(singular_values.double().tolist(), p, q, blocks, group_size, segment_bytes=segment_bytes, noise_weight=noise_weight)
