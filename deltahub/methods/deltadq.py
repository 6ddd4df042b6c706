"""DeltaDQ (Jiang et al., 2024): group-wise dropout, then separate quantization into CSR parts.

Group-wise dropout (Section 3.3): each row is cut into groups of ``group_size`` consecutive
elements and exactly ``keep`` of every group survive (chosen by the seeded keys of
format/prng.py), rescaled by ``group_size / keep``. Separate quantization (Section 3.4,
Eqs. 6-12): survivors are quantized per tensor to ``bits`` bits, then split by value into
``parts`` ranges of ``2**bits / parts`` codes; each part is its own CSR component storing
``bits - log2(parts)``-bit codes and its offset. Unlike the paper's ratios, every CSR index
and indptr (which also encode part membership) counts towards deltahub's ratio.
The paper searches the group size on calibration data; deltahub's default is 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import prng
from ..format.components import Component, encode_sparse
from ..format.quant import quantize_tensor
from .base import EncodeContext, Method, largest_fitting, register_method
from .sparsity import sparse_meta


def dropout_nnz(p: int, q: int, group_size: int, keep: int) -> int:
    full, tail = divmod(q, group_size)
    return p * (full * keep + (prng.group_keep_count(tail, group_size, keep) if tail else 0))


@register_method
@dataclass
class DeltaDQ(Method):
    """Keep ``keep`` of every ``group_size`` (from the budget when not given), ``bits``-bit values in ``parts`` parts."""

    name = "deltadq"
    natural = "a fixed keep count instead of a target (ratio=None, params={'keep': K}, K of every group_size values; CLI: --ratio none --param keep=K)"
    group_size: int = 128
    bits: int = 8
    parts: int = 4
    storage: str = "csr"
    keep: int | None = None

    def __post_init__(self) -> None:
        if self.storage not in ("csr", "seeded"):
            raise ValueError(f"deltadq storage must be 'csr' or 'seeded', got {self.storage!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"deltadq bits must be in 1..8, got {self.bits}")
        if self.parts < 1 or self.parts & (self.parts - 1) or self.parts >= 1 << self.bits:
            raise ValueError(f"deltadq parts must be a power of two below 2**bits={1 << self.bits}, got {self.parts}")
        if self.storage == "seeded" and self.parts != 1:
            raise ValueError("deltadq with storage='seeded' needs parts=1: a regenerated mask cannot say which part a value is in")

    @property
    def part_bits(self) -> int:
        return self.bits - (self.parts.bit_length() - 1)

    def _metas(self, p: int, q: int, g: int, keep: int, slack: int = 0) -> list[dict]:
        nnz = dropout_nnz(p, q, g, keep)
        per = -(-nnz // self.parts) + slack
        width = (1 << self.bits) // self.parts
        values = lambda j: {"bits": self.part_bits, "zero": (1 << self.bits) - 1, "offset": j * width}  # noqa: E731
        if self.storage == "seeded":
            return [sparse_meta("seeded", nnz, values(0), {"kind": "group", "group_size": g, "keep": keep})]
        # Planning assumes an even split; the real split is checked after encoding.
        return [sparse_meta("csr", per, values(j)) for j in range(self.parts)]

    def smallest(self, p: int, q: int) -> list[dict]:
        # An even split over the parts plus a few values each: an uneven split packs each part's
        # codes separately (a byte of padding each) and writes longer counts in its JSON.
        g = max(1, min(self.group_size, q))
        return self._metas(p, q, g, min(self.keep or 1, g), slack=8 if self.parts > 1 else 0)

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:
        p, q = delta.shape
        g = max(1, min(self.group_size, q))
        if self.keep is not None:
            if not 1 <= self.keep <= g:
                raise ValueError(f"tensor {ctx.name!r}: deltadq keep must be in 1..{g}, got {self.keep}")
            keep = self.keep
        elif ctx.budget is None:
            raise ValueError(f"tensor {ctx.name!r}: deltadq needs a target ratio or 'keep'")
        else:
            keep = largest_fitting(1, g, lambda k: ctx.fits(self._metas(p, q, g, k)))
            if keep is None:
                raise ctx.infeasible("deltadq", self._metas(p, q, g, 1))
        while True:
            comps = self._encode_keep(delta, ctx, g, keep)
            if ctx.fits([c.meta for c in comps]):
                return comps
            if self.keep is not None or keep == 1:
                raise ctx.infeasible("deltadq", [c.meta for c in comps])
            keep -= 1

    def _encode_keep(self, delta: torch.Tensor, ctx: EncodeContext, g: int, keep: int) -> list[Component]:
        p, q = delta.shape
        mask = prng.group_mask(ctx.seed, p, q, g, keep)
        # Rescale by group length / kept in that group (the short last group keeps proportionally fewer).
        full, tail = divmod(q, g)
        rescale = torch.full((q,), g / keep, dtype=torch.float32)
        if tail:
            tk = prng.group_keep_count(tail, g, keep)
            rescale[full * g :] = tail / tk if tk else 0.0
        values = (delta * rescale)[mask]
        codes, scale, zero = quantize_tensor(values, self.bits)
        mask_meta = {"kind": "group", "group_size": g, "keep": keep}
        if self.storage == "seeded":
            return [encode_sparse(mask, values, index="seeded", seed=ctx.seed, mask_meta=mask_meta, codes=codes, bits=self.bits, scale=scale, zero=zero)]
        width = (1 << self.bits) // self.parts
        part_of = codes.to(torch.int64) // width
        flat_pos = torch.nonzero(mask.reshape(-1)).reshape(-1)
        comps = []
        for j in range(self.parts):
            sel = part_of == j
            pm = torch.zeros(p * q, dtype=torch.bool)
            pm[flat_pos[sel]] = True
            comps.append(encode_sparse(pm.view(p, q), None, index="csr", codes=codes[sel] - j * width, bits=self.part_bits, scale=scale, zero=zero, offset=j * width))
        return comps
