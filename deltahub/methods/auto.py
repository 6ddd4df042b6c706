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
- The rounding aims at the *merged* weight (methods/rounding.py): light bf16 deltas are one or two
  ulps of the weights, and the decoder's final cast otherwise snaps grid values to the weights'
  own grid, a shrinkage of up to 8%. Aiming at the merged weight took 4-bit values at 1/8 on the
  light pair from 0.987 to 0.999 of the gain.
- Narrow values buy keep rate, wide values less rounding noise: the width (2, 4 or 8 bits) is
  the one with the least expected squared error at the tensor's budget,
  :func:`~deltahub.methods.rounding.sample_variance` (4 bits on the light pair at every ratio).
- The sparse tensors share the budget evenly (one keep rate for all). Keep rates proportional
  to each tensor's RMS delta, the minimum of the summed squared error, did not retain more
  (0.996 against 1.001 at 1/16): the loss does not weigh every tensor's error alike.
- Large deltas (those of longer, higher-learning-rate fine-tunes) keep more under low rank, as
  D-QRELO observes: there ``auto`` stores a ``lowrank`` component whose singular vectors get their
  bit widths (Delta-CoMe's mixed precision) chosen by error removed per byte, across every
  tensor at once (methods/widths.py).
- The allocator counts a kept vector's rounding noise at ``noise_weight`` (0.1) of a dropped
  vector's error, for the reason the sparse family is unbiased: the model loses less to
  zero-mean noise than to a missing direction. Weighed equally (Frobenius error), the bytes went
  to fewer vectors at 3-4 bits, and a fine-tune that learned facts lost them first: its MLP
  deltas need rank ~64 of 576 to keep them (benchmarks/results/knowledge-diagnosis.md). At 0.1 instead of
  1, facts kept went from 0.93/0.38/0.04 to 0.99/0.64/0.14 at 1/32, 1/64, 1/128, and PR on the
  heavy Austen pair from 0.953/0.861 to 0.958/0.894 at 1/64, 1/128, for 0.01 of PR at 1/16
  (1.008 to 0.998). At 1/64, 0.03 kept 0.675, 0.1 0.642 and 0.3 0.583; at 1/128, 0.3 kept 0.100.
- The codes of 2-4-bit singular vectors are far from uniform (round to nearest fills the middle
  codes), so each quantized segment's codes are stored as a zstd frame where that is smaller
  (``zstd_codes``, format 1.2): the 2-bit planes of the heavy Austen pair's delta at 1/64 take
  0.81 of their packed bytes. The encoder spends what coding saves on more vectors (+17% rank
  there), re-planning the tensor for a larger budget until its coded record fills its own
  (at most 4 re-plannings; compress at 1/8 on the heavy pair: 62 s against 46 s uncoded).
- D-QRELO's 1-bit sign part is a fixed price for a different spectrum (the residual's): the plan
  takes it where, at the model's marginal price of a byte, it leaves less error for its bytes.
  On the heavy pair it was 2 tensors of 211 at 1/8 and none at 1/4 when first measured, and is
  37 at 1/16 since the width allocator's fix (benchmarks/README.md, "LoRA-exact auto"); on a
  delta of dense +-c noise, whose spectrum is flat, it is taken.

- Served as LoRA adapters (``lora=True``): every matrix takes the low-rank family and no sign
  part, so ``export_lora`` writes exactly the stored factors (a LoRA adapter holds a low-rank
  product and nothing else); the widths are still chosen for storage. ``max_rank`` caps every
  record's rank (vLLM's ``--max-lora-rank``: the LoRA kernels' cost grows with it).

Every component is one the spec defines (``lowrank``, ``sparse`` with a seeded Bernoulli mask
and k-bit values); coded codes need a format 1.2 reader (``zstd_codes=False`` writes what 1.1
readers decode).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from ..format import prng
from ..format.components import Component, Segment, encode_lowrank, encode_sign, encode_sparse, layout_nbytes, lowrank_meta
from ..format.dtypes import to_name
from ..format.quant import quantize_groups
from ..format.records import delta_from_components, record_layout, record_nbytes
from ..calibration import gptq_quantizer, weighted_singular_values, weighted_svd
from .base import PER_KEY, EncodeContext, Method, PlanEntry, Planned, largest_fitting, register_method
from .bitdelta import sign_meta
from .linalg import singular_values, truncated_svd
from .sparsity import sparse_meta
from .rounding import sample_variance, stochastic_codes
from .widths import SEGMENT_OVERHEAD, Spectrum, allocate_measured, allocate_widths, spectrum_of

_SLACK = 16

VALUE_WIDTHS = (2, 4, 8)
# Rounding noise against a dropped vector's error, measured against retention (module docstring).
NOISE_WEIGHT = 0.1
# Re-plannings that spend what zstd-coded codes saved (_spend_what_coding_saved): each costs a
# quantization and a coding of the tensor's vectors.
CODED_SEARCH_STEPS = 4


def _coded_fraction(comp: Component, p: int, q: int) -> float:
    """Stored bytes of the component's codes over their packed bytes (1: nothing coded)."""
    stored = packed = 0
    for f, length in (("u", p), ("v", q)):
        for j, seg in enumerate(comp.meta[f]):
            if "bits" in seg:
                stored += comp.tensors[f"{f}.{j}.codes"].numel()
                packed += -(-(seg["end"] - seg["start"]) * length * seg["bits"] // 8)
    return stored / packed if packed else 1.0


@register_method
@dataclass
class Auto(Method):
    """Per tensor: an unbiased seeded sample with ``value_bits``-bit values (default: 2, 4 or 8,
    whichever gives the least expected error at the budget, :func:`sample_variance`), or, for a delta whose
    RMS exceeds ``lowrank_above`` times the base's, mixed-precision low rank whose singular vectors
    get widths among ``levels`` bits by error removed per byte (methods/widths.py), on top of a
    1-bit sign part (D-QRELO's) where that removes more error for its bytes (``sign_part="auto"``;
    ``"always"`` or ``"never"`` to force it). ``noise_weight`` (in (0, 1]) is how much a kept
    vector's rounding noise counts against a dropped vector's error: lower buys more vectors at
    fewer bits (1: plain Frobenius error). ``zstd_codes`` (default true) stores each quantized
    segment's codes as a zstd frame where smaller and spends the bytes saved on more vectors
    (format 1.2: a reader of 1.0 or 1.1 refuses such a repo by name, from its `requires`).
    ``lora=True``: low rank for every matrix and no sign part, so that ``export_lora`` is exact
    (many deltas served as LoRA adapters on one vLLM); ``max_rank`` caps the rank of every record.
    ``compress`` spreads the whole model's budget first (:meth:`plan`); alone, each tensor fills
    its own budget.

    >>> import torch
    >>> from deltahub import encode_tensor
    >>> base = torch.randn(256, 256) * 0.02
    >>> enc = encode_tensor("w", base, base + torch.randn(256, 256) * 1e-3, "auto", ratio=1 / 8)
    >>> enc.ratio <= 1 / 8
    True
    """

    name = "auto"
    plans = True
    value_bits: int | None = None
    lowrank_above: float = 4e-3
    levels: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    sign_part: str = "auto"
    lora: bool = False
    max_rank: int | None = None
    noise_weight: float = NOISE_WEIGHT
    zstd_codes: bool = True

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if self.value_bits is not None and (isinstance(self.value_bits, bool) or not isinstance(self.value_bits, int) or not 1 <= self.value_bits <= 8):
            raise ValueError(f"auto value_bits must be an integer in 1..8 (or None: 2, 4 or 8 by expected error), got {self.value_bits!r}")
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or not all(2 <= b <= 8 for b in self.levels):
            raise ValueError(f"auto levels must be increasing bit widths in 2..8, got {self.levels}")
        if self.sign_part not in ("auto", "always", "never"):
            raise ValueError(f"auto sign_part must be 'auto', 'always' or 'never', got {self.sign_part!r}")
        if not isinstance(self.zstd_codes, bool):
            raise ValueError(f"auto zstd_codes must be true or false, got {self.zstd_codes!r}")
        if not isinstance(self.lora, bool):
            raise ValueError(f"auto lora must be true or false, got {self.lora!r}")
        if self.lora:
            if self.sign_part == "always":
                raise ValueError("auto lora=true stores no sign part (a LoRA adapter cannot hold it); drop sign_part=always")
            self.sign_part = "never"
        if isinstance(self.noise_weight, bool) or not isinstance(self.noise_weight, numbers.Real) or not 0 < self.noise_weight <= 1:
            raise ValueError(f"auto noise_weight must be a number in (0, 1], got {self.noise_weight!r}")
        self.noise_weight = float(self.noise_weight)
        if self.max_rank is not None and (isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1):
            raise ValueError(f"auto max_rank must be a positive integer, got {self.max_rank!r}")

    # -- which family -------------------------------------------------------------------------

    def uses_lowrank(self, delta_rms: float, base_rms: float | None) -> bool:
        """D-QRELO's observation, measured on our pairs: small deltas keep most of their gain under
        random sparsification, large ones under low rank. The RMS ratio tells them apart.
        Served as LoRA (``lora``), every matrix is low rank."""
        return self.lora or delta_rms > self.lowrank_above * (base_rms or 0.0)

    # -- planning -------------------------------------------------------------------------------

    def statistics(self, delta: torch.Tensor, base_rms: float, hessian: torch.Tensor | None = None) -> dict:
        delta_rms = float(torch.linalg.vector_norm(delta)) / math.sqrt(max(delta.numel(), 1))
        stats = {"lowrank": self.uses_lowrank(delta_rms, base_rms)}
        if stats["lowrank"]:
            # With calibration, the spectrum of Δ L: errors measured on the layer's output.
            spectrum = (lambda x: weighted_singular_values(x, hessian)) if hessian is not None else singular_values
            stats["singular_values"] = spectrum(delta)[: self.max_rank]
            if self.sign_part != "never":
                stats["residual_singular_values"] = spectrum(self._sign_residual(delta)[1])[: self.max_rank]
        return stats

    @staticmethod
    def _sign_residual(delta: torch.Tensor) -> tuple[Component, torch.Tensor]:
        """D-QRELO's first step: per-row alpha * sign(Δ), and what it leaves for the low rank."""
        sign = encode_sign(delta, per_row=True)
        return sign, delta - delta_from_components(tuple(delta.shape), [sign])

    def plan(self, entries: list[PlanEntry], budget: int) -> dict[str, Planned]:
        """Spread ``budget`` bytes: each family gets its tensors' share of the dense bytes; sparse
        tensors share theirs evenly, low-rank tensors get singular vectors and widths by the
        squared error each byte removes (methods/widths.py)."""
        dense = {e.name: e.numel * e.dtype.itemsize for e in entries}
        total = sum(dense.values()) or 1
        low = [e for e in entries if e.stats["lowrank"]]
        sparse = [e for e in entries if not e.stats["lowrank"]]
        low_budget = budget * sum(dense[e.name] for e in low) // total
        planned = self._plan_lowrank(low, low_budget, dense)
        planned.update(self._plan_sparse(sparse, budget - low_budget, dense))
        return planned

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

    def _plan_sparse(self, entries: list[PlanEntry], budget: int, dense: dict[str, int]) -> dict[str, Planned]:
        values_meta = self._values_meta(8)
        metas = {e.name: [sparse_meta("seeded", e.numel, values_meta, {"kind": "bernoulli", "threshold": 1 << prng.KEY_BITS})] for e in entries}
        fixed = {e.name: self._overhead(e, metas[e.name]) for e in entries}
        # One keep rate for all: the value bytes are shared in proportion to the tensors' sizes.
        per_element = max(budget - sum(fixed.values()), 0) / max(sum(e.numel for e in entries), 1)
        # The encoder measures the record alone (as for low-rank tensors): its index lines, which
        # the budget counted in `fixed`, are not its to spend (they were once, and a plan that
        # fills its budget to the byte then missed the target by ~100 bytes a tensor).
        index = {e.name: e.blocks * PER_KEY * len(record_layout(e.name, self._block_record(e, metas[e.name]))) for e in entries}
        # At least one byte of values: a tensor that keeps nothing would not fit and fall back to dense.
        return {e.name: Planned((fixed[e.name] - index[e.name] + max(per_element * e.numel, 1)) / dense[e.name]) for e in entries}

    def _plan_lowrank(self, entries: list[PlanEntry], budget: int, dense: dict[str, int]) -> dict[str, Planned]:
        spectra = [self._spectrum(e, e.stats["singular_values"]) for e in entries]
        signed: set[str] = set()
        rate, _ = allocate_widths(spectra, budget - self._fixed_bytes(entries, spectra, signed), self.levels, start_with_one=True)
        if self.sign_part == "always":
            signed = {e.name for e in entries if "residual_singular_values" in e.stats}
            spectra = [self._spectrum(e, e.stats["residual_singular_values"]) if e.name in signed else sp for e, sp in zip(entries, spectra)]
        elif math.isfinite(rate):
            # A sign part is a fixed price for a new spectrum (the residual's). At the model's price
            # of a byte (the error the last byte bought), take it where error + price * bytes is lower.
            for i, e in enumerate(entries):
                if "residual_singular_values" not in e.stats:
                    continue
                plain, residual = self._spectrum(e, e.stats["singular_values"]), self._spectrum(e, e.stats["residual_singular_values"])
                plain_bytes = allocate_widths([plain], math.inf, self.levels, start_with_one=True, min_rate=rate)[1]
                residual_bytes = allocate_widths([residual], math.inf, self.levels, start_with_one=True, min_rate=rate)[1] + self._sign_bytes(e)
                if residual.error_left(self.levels) + rate * residual_bytes < plain.error_left(self.levels) + rate * plain_bytes:
                    signed.add(e.name)
                    spectra[i] = residual
        # The allocator counts bytes by estimate (segment overheads at their widest); measure the
        # records it chose and hand what is left back to it, keeping the best allocation that fits.
        allocate_measured(
            spectra, budget, budget - self._fixed_bytes(entries, spectra, signed),
            lambda: sum(self._tensor_bytes(e, sp.segments(self.levels), e.name in signed) for e, sp in zip(entries, spectra)),
            0.001 * budget, self.levels,
        )
        # The sign choice goes to the encoder with the ratio, so it is not made a second time.
        return {
            e.name: Planned(self._record_bytes(e, sp.segments(self.levels), e.name in signed) / dense[e.name], {"sign_part": "always" if e.name in signed else "never"})
            for e, sp in zip(entries, spectra)
        }

    def _fixed_bytes(self, entries: list[PlanEntry], spectra: list[Spectrum], signed: set[str]) -> int:
        """The records around their segments (the allocator charges the first segment itself), and the sign parts."""
        one = lowrank_meta([Segment(0, 1, bits=self.levels[0], group_size=self.group_size)])
        return sum(self._overhead(e, [one]) - e.blocks * sp.segment_bytes + (self._sign_bytes(e) if e.name in signed else 0) for e, sp in zip(entries, spectra))

    def _tensor_bytes(self, e: PlanEntry, segs: list[Segment], sign: bool) -> int:
        """A planned record's honest bytes with its index entries."""
        metas = ([sign_meta(True)] if sign else []) + [lowrank_meta(segs)]
        return self._record_bytes(e, segs, sign) + e.blocks * PER_KEY * len(record_layout(e.name, self._block_record(e, metas)))

    def _spectrum(self, e: PlanEntry, singular_values: torch.Tensor) -> Spectrum:
        q = e.shape[-1]
        p = e.numel // max(q, 1) // e.blocks
        # A new segment costs its JSON and header entries and, in the index, an entry per key.
        price = self._segment_price(p, q, lambda segs: self._tensor_bytes(e, segs, False) // e.blocks)
        return spectrum_of(singular_values, p, q, e.blocks, self.group_size, price, self.noise_weight)

    def _segment_price(self, p: int, q: int, record_bytes: Callable[[list[Segment]], int]) -> int:
        """What one more rank segment adds to a block's record, measured: the same vectors in two
        segments against one, at the widest offsets (a segment's JSON grows with their digits), so
        that the allocator's byte counts match the records that the plan and the encoder measure."""
        r = min(p, q)
        if r < 2:
            return SEGMENT_OVERHEAD
        seg = lambda a, b: Segment(a, b, bits=self.levels[0], group_size=self.group_size)  # noqa: E731
        return max(record_bytes([seg(0, r - 1), seg(r - 1, r)]) - record_bytes([seg(0, r)]), 0)

    def _sign_bytes(self, e: PlanEntry) -> int:
        """What a sign part adds to the tensor's record and index: its plane, row scales, JSON."""
        one = lowrank_meta([Segment(0, 1, bits=self.levels[0], group_size=self.group_size)])
        with_sign = record_nbytes(e.name, self._block_record(e, [sign_meta(True), one]))
        return e.blocks * (with_sign - record_nbytes(e.name, self._block_record(e, [one])) + 2 * PER_KEY)

    def _record_bytes(self, e: PlanEntry, segs: list[Segment], sign: bool = False) -> int:
        metas = ([sign_meta(True)] if sign else []) + [lowrank_meta(segs)]
        return e.blocks * (record_nbytes(e.name, self._block_record(e, metas)) + _SLACK)

    def _values_meta(self, bits: int) -> dict:
        # The widest zero point, so that planning never undercounts the JSON of the real one.
        return {"bits": bits, "zero": (1 << bits) - 1, "offset": 0}

    def smallest(self, p: int, q: int) -> list[dict]:
        """A sparse record of one value at the narrowest width: the least any tensor can take
        (a lower bound for low-rank tensors), so ``compress`` refuses a target below it early;
        with ``lora``, a rank-1 record at the narrowest width."""
        if self.lora:
            return [lowrank_meta([Segment(0, 1, bits=self.levels[0], group_size=self.group_size)])]
        bits = self.value_bits or VALUE_WIDTHS[0]
        return [sparse_meta("seeded", 1, self._values_meta(bits), {"kind": "bernoulli", "threshold": 1 << prng.KEY_BITS})]

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
        one = [Segment(0, 1, bits=self.levels[0], group_size=self.group_size)]
        sign, target = self._choose_sign(delta, ctx, one)
        extra = [sign] if sign is not None else []
        most = min(p, q, self.max_rank or p)
        if ctx.hessian is not None:
            u, s, v = weighted_svd(target, ctx.hessian, most)
            quantizer = gptq_quantizer(ctx.hessian)
        else:
            u, s, v = truncated_svd(target, most)
            quantizer = quantize_groups
        # Vector-major once: every trial below encodes a prefix of these rows (a tall factor's
        # transpose, copied per trial, cost more than its quantization).
        u, v = u.t().contiguous().to(torch.float32).t(), v.t().contiguous().to(torch.float32).t()
        metas = [c.meta for c in extra]

        def encoded(room: EncodeContext, tries: int) -> Component | None:
            """The record the allocator chooses for ``room``'s budget that fits ``ctx``'s, dropping
            the last vectors (at most ``tries`` times) where the estimate was too large."""
            spectrum = self._fit(self._encoder_spectrum(s, p, q, room, metas), room, metas, one)
            rank = spectrum.counts[0]
            for _ in range(tries):
                if rank < 1:
                    break
                spectrum.counts = [min(c, rank) for c in spectrum.counts]
                comp = encode_lowrank(u[:, :rank], s[:rank], v[:, :rank], spectrum.segments(self.levels), v_quantizer=quantizer, coded=self.zstd_codes)
                if ctx.fits(metas + [comp.meta]):
                    return comp
                rank -= 1
            return None

        comp = encoded(ctx, most)
        if comp is None:
            if sign is not None and ctx.fits([sign.meta]):
                return [sign]
            raise ctx.infeasible("auto", [lowrank_meta(one)])
        if self.zstd_codes:
            comp = self._spend_what_coding_saved(comp, ctx, metas, encoded, p, q)
        return extra + [comp]

    @staticmethod
    def _spend_what_coding_saved(
        comp: Component, ctx: EncodeContext, metas: list[dict], encoded: Callable[[EncodeContext, int], Component | None], p: int, q: int,
    ) -> Component:
        """Coded codes take fewer bytes than the allocator counted: plan again for a budget larger
        by what is left, scaled by how much coding shrank the codes, and keep the largest record
        that still fits (a few secant steps: the record's other bytes do not shrink)."""
        budget = lo = ctx.budget
        hi = None
        for _ in range(CODED_SEARCH_STEPS):
            left = budget - ctx.measure(metas + [comp.meta])
            shrink = _coded_fraction(comp, p, q)
            if shrink >= 1 or left <= 0:
                break
            guess = lo + int(left / shrink)
            if hi is not None:
                guess = min(guess, (lo + hi) // 2)
            if guess <= lo:
                break
            trial = encoded(dataclasses.replace(ctx, budget=guess), 1)
            if trial is None:
                hi = guess
            else:
                comp, lo = trial, guess
        return comp

    def _choose_sign(self, delta: torch.Tensor, ctx: EncodeContext, one: list[Segment]) -> tuple[Component | None, torch.Tensor]:
        """A sign part and the residual, or ``(None, delta)``: whichever the allocator expects to leave
        the least error at this tensor's budget (the plan's choice, see :meth:`_plan_lowrank`)."""
        if self.sign_part == "never" or not ctx.fits([sign_meta(True), lowrank_meta(one)]):
            return None, delta
        sign, residual = self._sign_residual(delta)
        if self.sign_part == "always":
            return sign, residual
        spectrum = (lambda x: weighted_singular_values(x, ctx.hessian)) if ctx.hessian is not None else singular_values
        p, q = delta.shape
        errors = []
        for metas, x in (([], delta), ([sign.meta], residual)):
            errors.append(self._fit(self._encoder_spectrum(spectrum(x)[: self.max_rank], p, q, ctx, metas), ctx, metas, one).error_left(self.levels))
        return (sign, residual) if errors[1] < errors[0] else (None, delta)

    def _encoder_spectrum(self, singular_values: torch.Tensor, p: int, q: int, ctx: EncodeContext, extra: list[dict]) -> Spectrum:
        """This tensor as the allocator sees it, a segment priced as the encoder's record measures it."""
        price = self._segment_price(p, q, lambda segs: ctx.measure(extra + [lowrank_meta(segs)]))
        return spectrum_of(singular_values, p, q, 1, self.group_size, price, self.noise_weight)

    def _fit(self, spectrum: Spectrum, ctx: EncodeContext, extra: list[dict], one: list[Segment]) -> Spectrum:
        """Widths for this tensor's budget: the allocator's estimate, then corrected by the measured
        record (a few passes), so that the budget is spent and not exceeded."""
        spectrum.counts = [0] * len(self.levels)
        # The record of one vector, less that vector's own step: what the allocator's steps add to.
        room = ctx.budget - ctx.measure(extra + [lowrank_meta(one)]) + spectrum.step_bytes(self.levels, 0)
        # Done when less is left than one more bit for one vector pair: nothing more to buy.
        allocate_measured([spectrum], ctx.budget, room, lambda: ctx.measure(extra + [lowrank_meta(spectrum.segments(self.levels) or one)]), (spectrum.p + spectrum.q) / 8, self.levels)
        return spectrum

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
        threshold = prng.bernoulli_threshold(ctx.seed, n, nnz)
        mask = prng.bernoulli_mask(ctx.seed, p, q, threshold)
        values = delta[mask] / (threshold / full)
        base = None if ctx.base is None else ctx.base.reshape(p, q)[mask]
        codes, scale, zero = stochastic_codes(values, bits, ctx.seed, base, ctx.dtype)
        comp = encode_sparse(mask, None, index="seeded", seed=ctx.seed, mask_meta={"kind": "bernoulli", "threshold": threshold}, codes=codes, bits=bits, scale=scale, zero=zero)
        if not ctx.fits([comp.meta]):
            raise ctx.infeasible("auto", [comp.meta], "raise the ratio")
        return [comp]
