"""``sparse``: some elements of the block, the rest zero (DeltaDQ, DARE, magnitude pruning).

Positions come from CSR arrays (``index: "csr"``) or from a mask regenerated from a seed
(``index: "seeded"``, see prng.py). Values are floats, or k-bit codes with a float32 scale and
integer zero point and offset: ``value = scale * (code + offset - zero)``.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch

from ...errors import FormatError
from .. import bitpack, prng
from ..dtypes import FLOAT_NAMES, itemsize, to_name, to_torch
from .base import Component, ComponentType, Layout, RowAdder, check_int, matrix_view, register_component

_ADD_CHUNK = 1 << 20


def indices_dtype(q: int) -> str:
    return "U16" if q <= 1 << 16 else ("I32" if q <= 1 << 31 else "I64")


def indptr_dtype(nnz: int) -> str:
    return "I32" if nnz < 1 << 31 else "I64"


def _values_layout(meta: Mapping, nnz: int) -> Layout:
    values = meta.get("values")
    if not isinstance(values, Mapping):
        raise FormatError(f"sparse needs a 'values' object, got {type(values).__name__}")
    if "bits" in values:
        bits = check_int("values.bits", values["bits"], 1, 8)
        check_int("values.zero", values.get("zero"), 0, 255)
        check_int("values.offset", values.get("offset", 0), 0, 255)  # optional, default 0
        return {"codes": ("U8", (bitpack.packed_nbytes(nnz, bits),)), "scale": ("F32", (1,))}
    dt = values.get("dtype")
    if not isinstance(dt, str) or dt not in FLOAT_NAMES:
        raise FormatError(f"sparse values need 'bits' or a float 'dtype' ({list(FLOAT_NAMES)}), got {str(dict(values))[:80]}")
    return {"values": (dt, (nnz,))}


def _mask_nnz(meta: Mapping, p: int, q: int) -> int:
    mask = meta["mask"]
    if mask.get("kind") == "group":
        g, keep = mask["group_size"], mask["keep"]
        full, tail = divmod(q, g)
        return p * (full * keep + (prng.group_keep_count(tail, g, keep) if tail else 0))
    return int(meta["nnz"])  # bernoulli: counted when decoding and checked against this


@register_component
class Sparse(ComponentType):
    name = "sparse"

    @classmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        p, q = matrix_view(block, meta)
        nnz = check_int("nnz", meta.get("nnz"), 0, p * q)
        index = meta.get("index")
        if index == "csr":
            out: Layout = {"indptr": (indptr_dtype(nnz), (p + 1,)), "indices": (indices_dtype(q), (nnz,))}
        elif index == "seeded":
            mask = meta.get("mask")
            if not isinstance(meta.get("seed"), str) or not re.fullmatch(r"[0-9a-f]{16}", meta["seed"]) or not isinstance(mask, Mapping):
                raise FormatError(f"seeded sparse needs a 'seed' of 16 lowercase hex digits and a 'mask' object, got seed {str(meta.get('seed'))[:40]!r}")
            if mask.get("kind") == "group":
                g = check_int("mask.group_size", mask.get("group_size"), 1)
                check_int("mask.keep", mask.get("keep"), 0, g)
            elif mask.get("kind") == "bernoulli":
                check_int("mask.threshold", mask.get("threshold"), 0, 1 << prng.KEY_BITS)
            else:
                raise FormatError(f"unknown sparse mask kind {str(mask.get('kind'))[:40]!r}; known: group, bernoulli")
            if _mask_nnz(meta, p, q) != nnz:
                raise FormatError(f"sparse nnz {nnz} does not match its group mask ({_mask_nnz(meta, p, q)})")
            out = {}
        else:
            raise FormatError(f"sparse index must be 'csr' or 'seeded', got {str(index)[:40]!r}")
        out.update(_values_layout(meta, nnz))
        return out

    @classmethod
    def mask(cls, meta: Mapping, p: int, q: int) -> torch.Tensor:
        seed = int(meta["seed"], 16)
        m = meta["mask"]
        if m["kind"] == "group":
            return prng.group_mask(seed, p, q, m["group_size"], m["keep"])
        return prng.bernoulli_mask(seed, p, q, m["threshold"])

    @classmethod
    def flat_positions(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], p: int, q: int) -> torch.Tensor:
        """Row-major flat positions of the stored values, int64 [nnz]."""
        nnz = meta["nnz"]
        if meta["index"] == "seeded":
            pos = _positions(cls.mask(meta, p, q))
            if pos.numel() != nnz:
                raise FormatError(f"seeded mask selects {pos.numel()} elements, the record says {nnz}")
            return pos
        indptr = tensors["indptr"].to(torch.int64)
        cols = tensors["indices"].to(torch.int64)
        counts = indptr[1:] - indptr[:-1]
        if int(indptr[0]) != 0 or int(indptr[-1]) != nnz or bool((counts < 0).any()):
            raise FormatError("CSR indptr must start at 0, never decrease, and end at nnz")
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= q):
            raise FormatError(f"CSR column index out of range 0..{q - 1}")
        rows = torch.repeat_interleave(torch.arange(p, dtype=torch.int64), counts)
        pos = rows * q + cols
        if nnz > 1 and not bool((pos[1:] > pos[:-1]).all()):
            raise FormatError("CSR column indices must be strictly increasing within each row")
        return pos

    @classmethod
    def values(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        v = meta["values"]
        if "bits" in v:
            bits, shift, scale = v["bits"], float(v.get("offset", 0) - v["zero"]), tensors["scale"].to(torch.float32)
            if bits in (1, 2, 4):
                # 2**bits values, each computed as the spec computes every element's, then looked up.
                return bitpack.lookup(tensors["codes"], bits, meta["nnz"], scale * (torch.arange(1 << bits, dtype=torch.float32) + shift))
            codes = bitpack.unpack(tensors["codes"], bits, meta["nnz"]).to(torch.float32)
            # In place: no new memory per step (products commute, so x * scale is scale * x).
            return codes.add_(shift).mul_(scale)
        return tensors["values"].to(torch.float32)

    @classmethod
    def row_adder(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> RowAdder:
        p, q = matrix_view(block, meta)
        values = cls.values(meta, tensors)
        if meta["index"] == "csr":
            return _CsrRows(cls.flat_positions(meta, tensors, p, q), tensors["indptr"].to(torch.int64), values, q)
        seed, mask = int(meta["seed"], 16), meta["mask"]
        if mask["kind"] == "group":
            return _GroupRows(seed, mask["group_size"], mask["keep"], values, q)
        return _BernoulliRows(seed, mask["threshold"], values, q, meta["nnz"])


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Row-major flat positions (int64) of a bool mask's True elements; numpy's flatnonzero is
    faster at this than torch.nonzero."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _add_at(flat: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """``flat += P`` where P holds ``values`` at ``positions`` (distinct) and +0.0 elsewhere: one
    float32 addition per element, as the spec's sum. Adding +0.0 changes only a -0.0 (to +0.0),
    so the stored positions are summed from the accumulator as it was before."""
    before = flat.index_select(0, positions)
    flat.add_(0.0)
    flat.index_copy_(0, positions, before.add_(values))


class _CsrRows(RowAdder):
    def __init__(self, positions: torch.Tensor, indptr: torch.Tensor, values: torch.Tensor, q: int) -> None:
        self.positions, self.indptr, self.values, self.q = positions, indptr, values, q

    def add(self, out: torch.Tensor, r0: int, r1: int) -> None:
        a0, a1 = int(self.indptr[r0]), int(self.indptr[r1])
        _add_at(out.view(-1), self.positions[a0:a1] - r0 * self.q, self.values[a0:a1])


class _GroupRows(RowAdder):
    def __init__(self, seed: int, group_size: int, keep: int, values: torch.Tensor, q: int) -> None:
        self.seed, self.group_size, self.keep, self.values, self.q = seed, group_size, keep, values, q
        full, tail = divmod(q, group_size)
        self.per_row = full * keep + (prng.group_keep_count(tail, group_size, keep) if tail else 0)

    def add(self, out: torch.Tensor, r0: int, r1: int) -> None:
        mask = prng.group_mask(self.seed, r1 - r0, self.q, self.group_size, self.keep, row0=r0)
        _add_at(out.view(-1), _positions(mask), self.values[r0 * self.per_row : r1 * self.per_row])


class _BernoulliRows(RowAdder):
    """A Bernoulli mask has no fixed count per row, so its rows must come in order: each stretch's
    values follow those of the stretches before it. The mask is made 1M elements at a time."""

    def __init__(self, seed: int, threshold: int, values: torch.Tensor, q: int, nnz: int) -> None:
        self.seed, self.threshold, self.values, self.q, self.nnz = seed, threshold, values, q, nnz
        self.next_row, self.used = 0, 0

    def add(self, out: torch.Tensor, r0: int, r1: int) -> None:
        if r0 != self.next_row:
            raise ValueError(f"a Bernoulli mask decodes its rows in order: expected row {self.next_row}, got {r0}")
        flat = out.view(-1)
        for s in range(0, flat.numel(), _ADD_CHUNK):
            count = min(_ADD_CHUNK, flat.numel() - s)
            positions = _positions(torch.from_numpy(prng.bernoulli_keep(self.seed, r0 * self.q + s, count, self.threshold)))
            if self.used + positions.numel() > self.nnz:
                raise FormatError(f"seeded mask selects more elements than the record's nnz {self.nnz}")
            _add_at(flat[s : s + count], positions, self.values[self.used : self.used + positions.numel()])
            self.used += positions.numel()
        self.next_row = r1

    def finish(self) -> None:
        if self.used != self.nnz:
            raise FormatError(f"seeded mask selects {self.used} elements, the record says {self.nnz}")


def csr_from_mask(mask2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """indptr and column indices (dtypes of the spec) of a bool mask [p, q]."""
    p, q = mask2d.shape
    counts = mask2d.sum(dim=1, dtype=torch.int64)
    indptr = torch.zeros(p + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    nnz = int(indptr[-1])
    cols = torch.nonzero(mask2d)[:, 1]
    return indptr.to(to_torch(indptr_dtype(nnz))), cols.to(to_torch(indices_dtype(q)))


def csr_nbytes(p: int, q: int, nnz: int) -> int:
    return itemsize(indptr_dtype(nnz)) * (p + 1) + itemsize(indices_dtype(q)) * nnz


def encode_sparse(
    mask2d: torch.Tensor,
    values: torch.Tensor,
    *,
    index: str = "csr",
    seed: int | None = None,
    mask_meta: dict | None = None,
    value_dtype: torch.dtype | None = None,
    codes: torch.Tensor | None = None,
    bits: int | None = None,
    scale: float | None = None,
    zero: int | None = None,
    offset: int = 0,
) -> Component:
    """Encode the ``values`` at the True positions of ``mask2d`` (row-major order).

    Give either ``value_dtype`` (float values) or ``codes``/``bits``/``scale``/``zero``/``offset``.
    For ``index="seeded"`` give the ``seed`` and ``mask_meta`` that regenerate ``mask2d``.
    """
    nnz = int(mask2d.sum())
    meta: dict = {"type": "sparse", "index": index, "nnz": nnz}
    tensors: dict[str, torch.Tensor] = {}
    if index == "csr":
        tensors["indptr"], tensors["indices"] = csr_from_mask(mask2d)
    else:
        meta["seed"] = f"{seed:016x}"
        meta["mask"] = mask_meta
    if codes is not None:
        meta["values"] = {"bits": bits, "zero": zero, "offset": offset}
        tensors["codes"] = bitpack.pack(codes, bits)
        tensors["scale"] = torch.tensor([scale], dtype=torch.float32)
    else:
        meta["values"] = {"dtype": to_name(value_dtype)}
        tensors["values"] = values.to(value_dtype).contiguous()
    return Component(meta, tensors)
