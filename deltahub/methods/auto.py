"""``auto``: deltahub's own method. Per tensor, an unbiased sparse sample of a small delta or
mixed-precision low rank of a large one, with the whole model's budget spread where it removes
the most error.

Why this shape (measured on the SmolLM2/Austen pairs, ``benchmarks/README.md``):

- Fine-tune loss is much more robust to zero-mean noise in the weights than to removing part of
  the delta. DARE's random drop-and-rescale keeps more of the gain than an SVD of far smaller
  Frobenius error. So the core is an *unbiased* estimator of the delta.
- Quantizing the kept values with seeded *stochastic* rounding keeps the estimate unbiased, and
  4-bit values let four times as many values survive as bf16 values at the same bytes; with
  round-to-nearest instead, the bias cost 5 points of retention (0.933 against 0.988).
- Narrow values buy keep rate, wide values less rounding noise: the width (2, 4 or 8 bits) is
  the one with the least expected squared error at the tensor's budget,
  :func:`sample_variance`. On the light pair at 1/8, 2 bits at keep 1 and 4 bits at keep 1/2
  kept 1.015/1.013 and 1.003/1.004 of the gain (two seeds each), 8 bits at keep 1/4 0.984; at
  1/16, 4 bits 1.001 and 8 bits 0.996.
- The sparse tensors share the budget evenly (one keep rate for all). Keep rates proportional
  to each tensor's RMS delta, the minimum of the summed squared error, did not retain more
  (0.996 against 1.001 at 1/16): the loss does not weigh every tensor's error alike.
- Large deltas (those of longer, higher-learning-rate fine-tunes) keep more under low rank, as
  D-QRELO observes: there ``auto`` stores a ``lowrank`` component whose singular vectors get their
  bit widths (Delta-CoMe's mixed precision) chosen by error removed per byte, across every
  tensor at once (methods/widths.py).

Every component is one the spec already defines (``lowrank``, ``sparse`` with a seeded
Bernoulli mask and k-bit values), so every reader decodes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..format import prng
from ..format.components import Component, Segment, encode_lowrank, encode_sparse, layout_nbytes, lowrank_meta
from ..format.dtypes import to_name
from ..format.quant import quantize_groups
from ..format.records import record_layout, record_nbytes
from ..calibration import gptq_quantizer, weighted_singular_values, weighted_svd
from .base import PER_KEY, EncodeContext, Method, PlanEntry, largest_fitting, register_method
from .linalg import singular_values, truncated_svd
from .sparsity import sparse_meta
from .widths import SEGMENT_OVERHEAD, allocate_widths, spectrum_of

# The stochastic-rounding stream of a tensor: its seed mixed with this constant, so the rounding
# keys are independent of the mask keys drawn from the seed itself.
_ROUNDING_STREAM = 0x5EED_0F_A070_0001


_SLACK = 16


def stochastic_codes(values: torch.Tensor, bits: int, seed: int) -> tuple[torch.Tensor, float, int]:
    """Per-tensor ``bits``-bit codes of ``values`` rounded up or down at random, unbiased.

    The range includes zero (as format/quant.py's); ``value ≈ scale * (code - zero)`` with
    ``E[scale * (code - zero)] = value`` inside the range. Returns ``(codes, scale, zero)``.
    """
    qmax = (1 << bits) - 1
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8), 1.0, 0
    lo = min(float(values.min()), 0.0)
    hi = max(float(values.max()), 0.0)
    if hi == lo:
        return torch.zeros(values.numel(), dtype=torch.uint8), 1.0, 0
    # The grid reaches both ends of the range: a value clamped at an end would be rounded with a bias.
    scale, zero = _grid(lo, hi, bits)
    u = torch.from_numpy(prng.keys(seed ^ _ROUNDING_STREAM, 0, values.numel()).astype(np.float64) / float(1 << prng.KEY_BITS))
    x = values.to(torch.float64) / scale + zero
    codes = torch.floor(x + u).clamp(0, qmax)
    return codes.to(torch.uint8), scale, zero


VALUE_WIDTHS = (2, 4, 8)


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
    values = delta.reshape(-1).to(torch.float64) / keep
    scale, zero = _grid(min(float(values.min()), 0.0), max(float(values.max()), 0.0), bits)
    x = values / scale + zero
    frac = x - torch.floor(x)
    return (1 / keep - 1) * energy + keep * float((frac * (1 - frac)).sum()) * scale**2


def _grid(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """``(scale, zero)`` of a ``bits``-bit grid through 0 that reaches both ``lo`` and ``hi``:
    an integer zero point first, then the scale (rounded up to float32)."""
    qmax = (1 << bits) - 1
    if hi == lo:
        return 1.0, 0
    zero = int(min(max(round(-lo / (hi - lo) * qmax), 0), qmax))
    scale = max(-lo / zero if zero else 0.0, hi / (qmax - zero) if zero < qmax else 0.0)
    return float(np.nextafter(np.float32(scale), np.float32(np.inf))), zero


@register_method
@dataclass
class Auto(Method):
    """Per tensor: an unbiased seeded sample with ``value_bits``-bit values (default: 2, 4 or 8,
    whichever gives the least expected error at the budget, :func:`sample_variance`), or, for a delta whose
    RMS exceeds ``lowrank_above`` times the base's, mixed-precision low rank whose singular vectors
    get widths among ``levels`` bits by error removed per byte (methods/widths.py). ``compress`` spreads the
    whole model's budget first (:meth:`plan`); alone, each tensor fills its own budget.
    """

    name = "auto"
    plans = True
    value_bits: int | None = None
    lowrank_above: float = 4e-3
    levels: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if self.value_bits is not None and not 1 <= self.value_bits <= 8:
            raise ValueError(f"auto value_bits must be in 1..8 (or None: 2 or 4 by budget), got {self.value_bits}")
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or not all(2 <= b <= 8 for b in self.levels):
            raise ValueError(f"auto levels must be increasing bit widths in 2..8, got {self.levels}")

    # -- which family -------------------------------------------------------------------------

    def uses_lowrank(self, delta_rms: float, base_rms: float | None) -> bool:
        """D-QRELO's observation, measured on our pairs: small deltas keep most of their gain under
        random sparsification, large ones under low rank. The RMS ratio tells them apart."""
        return delta_rms > self.lowrank_above * (base_rms or 0.0)

    # -- planning -------------------------------------------------------------------------------

    def statistics(self, delta: torch.Tensor, base_rms: float, hessian: torch.Tensor | None = None) -> dict:
        delta_rms = float(torch.linalg.vector_norm(delta)) / math.sqrt(max(delta.numel(), 1))
        stats = {"lowrank": self.uses_lowrank(delta_rms, base_rms)}
        if stats["lowrank"]:
            # With calibration, the spectrum of Δ L: errors measured on the layer's output.
            stats["singular_values"] = weighted_singular_values(delta, hessian) if hessian is not None else singular_values(delta)
        return stats

    def plan(self, entries: list[PlanEntry], budget: int) -> dict[str, float]:
        """Spread ``budget`` bytes: each family gets its tensors' share of the dense bytes; sparse
        tensors share theirs evenly, low-rank tensors get singular vectors and widths by the
        squared error each byte removes (methods/widths.py)."""
        dense = {e.name: e.numel * e.dtype.itemsize for e in entries}
        total = sum(dense.values()) or 1
        low = [e for e in entries if e.stats["lowrank"]]
        sparse = [e for e in entries if not e.stats["lowrank"]]
        low_budget = budget * sum(dense[e.name] for e in low) // total
        ratios = self._plan_lowrank(low, low_budget, dense)
        ratios.update(self._plan_sparse(sparse, budget - low_budget, dense))
        return ratios

    def _block_record(self, e: PlanEntry, metas: list[dict]) -> dict:
        """The record one block is measured as when encoded (the experts of a 3-D tensor one by one)."""
        comps = [dict(m, **({"rows": [0, 1]} if e.blocks > 1 else {})) for m in metas]
        return {"kind": "compressed", "shape": list(e.shape), "dtype": to_name(e.dtype), "method": self.name, "components": comps}

    def _overhead(self, e: PlanEntry, metas: list[dict]) -> int:
        """Bytes of the tensor's blocks with these metas but no data, with their index entries."""
        record = self._block_record(e, metas)
        layout = record_layout(e.name, record)
        # + slack for the float rounding of ratio * dense bytes back into a budget
        return e.blocks * (record_nbytes(e.name, record) - layout_nbytes(layout) + PER_KEY * len(layout) + _SLACK)

    def _plan_sparse(self, entries: list[PlanEntry], budget: int, dense: dict[str, int]) -> dict[str, float]:
        values_meta = self._values_meta(8)
        fixed = {e.name: self._overhead(e, [sparse_meta("seeded", e.numel, values_meta, {"kind": "bernoulli", "threshold": 1 << prng.KEY_BITS})]) for e in entries}
        # One keep rate for all: the value bytes are shared in proportion to the tensors' sizes.
        per_element = max(budget - sum(fixed.values()), 0) / max(sum(e.numel for e in entries), 1)
        # At least one byte of values: a tensor that keeps nothing would not fit and fall back to dense.
        return {e.name: (fixed[e.name] + max(per_element * e.numel, 1)) / dense[e.name] for e in entries}

    def _plan_lowrank(self, entries: list[PlanEntry], budget: int, dense: dict[str, int]) -> dict[str, float]:
        spectra = []
        for e in entries:
            q = e.shape[-1]
            p = e.numel // max(q, 1) // e.blocks
            # A new segment costs its JSON and header entries and, in the index, an entry per key.
            spectra.append(spectrum_of(e.stats["singular_values"], p, q, e.blocks, self.group_size, SEGMENT_OVERHEAD + 6 * PER_KEY))
            # The record around its segments (the allocator charges the first segment itself).
            budget -= self._overhead(e, [lowrank_meta([Segment(0, 1, bits=self.levels[0], group_size=self.group_size)])]) - e.blocks * spectra[-1].segment_bytes
        allocate_widths(spectra, budget, self.levels, start_with_one=True)
        return {e.name: self._record_bytes(e, sp.segments(self.levels)) / dense[e.name] for e, sp in zip(entries, spectra)}

    def _record_bytes(self, e: PlanEntry, segs: list[Segment]) -> int:
        return e.blocks * (record_nbytes(e.name, self._block_record(e, [lowrank_meta(segs)])) + _SLACK)

    def _values_meta(self, bits: int) -> dict:
        # The widest zero point, so that planning never undercounts the JSON of the real one.
        return {"bits": bits, "zero": (1 << bits) - 1, "offset": 0}

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        if ctx.budget is None:
            raise ValueError(f"tensor {ctx.name!r}: auto needs a target ratio")
        delta_rms = float(torch.linalg.vector_norm(delta)) / math.sqrt(delta.numel()) if delta.numel() else 0.0
        if self.uses_lowrank(delta_rms, ctx.base_rms):
            return self._encode_lowrank(delta, ctx)
        return self._encode_sparse(delta, ctx)

    def _encode_lowrank(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        p, q = delta.shape
        full = min(p, q)
        if ctx.hessian is not None:
            u, s, v = weighted_svd(delta, ctx.hessian, full)
            quantizer = gptq_quantizer(ctx.hessian)
        else:
            u, s, v = truncated_svd(delta, full)
            quantizer = quantize_groups
        spectrum = spectrum_of(s, p, q, 1, self.group_size)
        one = [Segment(0, 1, bits=self.levels[0], group_size=self.group_size)]
        spectrum.counts = [0] * len(self.levels)
        # The record of one vector, less that vector's own step: what the allocator's steps add to.
        allocate_widths([spectrum], ctx.budget - ctx.measure([lowrank_meta(one)]) + spectrum.step_bytes(self.levels, 0), self.levels, start_with_one=True)
        rank = spectrum.counts[0]
        while rank >= 1:  # the allocator's byte counts are estimates: drop the last vectors until the record fits
            spectrum.counts = [min(c, rank) for c in spectrum.counts]
            comp = encode_lowrank(u[:, :rank], s[:rank], v[:, :rank], spectrum.segments(self.levels), v_quantizer=quantizer)
            if ctx.fits([comp.meta]):
                return [comp]
            rank -= 1
        raise ctx.infeasible("auto", [lowrank_meta(one)])

    def _encode_sparse(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        p, q = delta.shape
        n = p * q
        full = 1 << prng.KEY_BITS
        metas = lambda k, b: [sparse_meta("seeded", k, self._values_meta(b), {"kind": "bernoulli", "threshold": full})]  # noqa: E731
        fitting = {b: largest_fitting(1, n, lambda k, b=b: ctx.fits(metas(k, b))) for b in ((self.value_bits,) if self.value_bits else VALUE_WIDTHS)}
        fitting = {b: k for b, k in fitting.items() if k is not None}
        if not fitting:
            raise ctx.infeasible("auto", metas(1, self.value_bits or VALUE_WIDTHS[0]))
        bits = min(fitting, key=lambda b: sample_variance(delta, fitting[b] / n, b))
        nnz = fitting[bits]
        keys = prng.keys(ctx.seed, 0, n)
        # The (nnz+1)-th smallest key keeps exactly the nnz smallest keys.
        threshold = full if nnz >= n else int(np.partition(keys, nnz)[nnz])
        mask = torch.from_numpy(keys < np.uint64(threshold)).view(p, q)
        values = delta[mask] / (threshold / full)
        codes, scale, zero = stochastic_codes(values, bits, ctx.seed)
        comp = encode_sparse(mask, None, index="seeded", seed=ctx.seed, mask_meta={"kind": "bernoulli", "threshold": threshold}, codes=codes, bits=bits, scale=scale, zero=zero)
        if not ctx.fits([comp.meta]):
            raise ctx.infeasible("auto", [comp.meta], "raise the ratio")
        return [comp]
