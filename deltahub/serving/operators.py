"""Delta operators: one fine-tune's change to one parameter, kept compressed and applied to
activations without rebuilding the dense delta matrix.

A record (spec/FORMAT.md §5) is a sum of components (§6). For a weight used as a matrix
(``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``) each component is an operator on its
stored form:

- ``sign``: the packed bitplane stays packed (uint8, 1 bit per element); each forward looks
  slices of its bytes up in a 256x8 sign table and multiplies, so at most one slice of signs
  (about 1 MiB on a CPU) exists at a time;
- ``lowrank``: ``((x V) S) Uᵀ``; float factors stay in their stored dtype (F16 for ``svd`` and
  ``dqrelo``) and quantized ones (``deltacome``) stay packed, dequantized per forward
  (``r·(p+q)`` elements, small next to the ``p·q`` product);
- ``sparse``: a torch sparse CSR product; CSR arrays stay as stored (U16 column indices), seeded
  masks (``dare``) are turned into CSR arrays once at load (regenerating a SplitMix64 mask per
  forward would cost ``p·q`` hashes), quantized values stay packed;
- ``dense``: the stored delta, cast per forward.

Small tensors (norms, biases: at most one dimension) and ``lossless`` records are decoded once
against the base and kept as the fine-tuned values (:class:`ValueDelta`): lossless stores
``finetuned XOR base``, which is no linear operator, so a lossless delta costs a full copy of
the tensors it changes when served unmerged (it saves disk and transfer, not serving memory);
in exchange its layers compute exactly what the merged model computes.

Products run in float32 on a CPU (where float32 matrix products are the fast ones and sparse
products only exist in float32) and in the input's dtype elsewhere. Operators keep their
tensors on the wrapped module's device and follow ``model.to(device)``, but never
``model.to(dtype)``: the stored tensors keep the dtypes the spec gives them, which is what lets
:meth:`TensorDelta.merged` reproduce the merged model bit for bit.
"""

from __future__ import annotations

import math
import warnings
from abc import ABCMeta, abstractmethod
from typing import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..format.components import Component, LowRank, Sparse, block_shape, check_fields, component_type, matrix_view
from ..format.components.sparse import csr_from_mask
from ..errors import FormatError
from ..format.config import CONFIG_NAME
from ..format.dtypes import to_torch
from ..format.quant import dequantize_groups
from ..format.records import decode_record, stored_key, validate_record
from .errors import ServingError
from .unpack import sign_table, unpack_codes

# Elements of one slice of unpacked signs: about 1 MiB of float32 on a CPU (stays in cache),
# larger on accelerators where launches, not caches, are the cost.
_SLICE_CPU = 1 << 18
_SLICE_ACCEL = 1 << 24


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 on a CPU, the activation's own dtype on accelerators."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def _slice_rows(q: int, device: torch.device) -> int:
    return max(1, (_SLICE_CPU if device.type == "cpu" else _SLICE_ACCEL) // max(q, 1))


class DeviceBound(nn.Module):
    """A module whose buffers follow ``.to(device)``/``.cuda()`` but keep their dtypes under
    ``.to(dtype)``/``.half()``: stored tensors must keep the spec's dtypes."""

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        for key, buf in self._buffers.items():
            if buf is not None:
                # Where ``fn`` sends a float tensor from this buffer's device: probing from the
                # CPU would read ``.half()`` or ``.to(dtype)`` on a GPU model as a move to the CPU.
                device = fn(torch.zeros((), dtype=torch.float32, device=buf.device)).device
                self._buffers[key] = buf.to(device)
        if recurse:
            for m in self.children():
                m._apply(fn)
        return self


class ComponentOp(DeviceBound, metaclass=ABCMeta):
    """One stored component over rows ``[start, stop)`` of dimension 0, as a ``[p, q]`` matrix.

    ``mm_t(x)`` is ``x Pᵀ`` (x ``[N, q]``), ``mm(x)`` is ``x P`` (x ``[N, p]``), ``rows(ids)`` is
    ``P[ids]`` and ``add_dense(out)`` adds ``P`` into a float32 ``[p, q]`` view.
    """

    def __init__(self, meta: Mapping, stored: Mapping[str, torch.Tensor], start: int, stop: int, p: int, q: int) -> None:
        super().__init__()
        self.meta = dict(meta)
        self.start, self.stop, self.p, self.q = start, stop, p, q
        self.fields = list(stored)
        for i, f in enumerate(self.fields):
            self.register_buffer(f"t{i}", stored[f], persistent=False)

    def field(self, name: str) -> torch.Tensor:
        return getattr(self, f"t{self.fields.index(name)}")

    def stored(self) -> dict[str, torch.Tensor]:
        """The component's tensors as the spec stores them (for merging)."""
        return {f: self.field(f) for f in self.fields}

    @abstractmethod
    def mm_t(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def mm(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...

    @abstractmethod
    def add_dense(self, out: torch.Tensor) -> None: ...


class SignOp(ComponentOp):
    """``diag(s) · sign``: the packed bitplane, unpacked one slice of rows at a time."""

    def _scale(self) -> torch.Tensor:
        return self.field("scale").to(torch.float32).reshape(-1)

    def _signs(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        # Row slice [r0, r1) of the ±1 matrix: its bits are stream positions [r0·q, r1·q).
        q = self.q
        e0, e1 = r0 * q, r1 * q
        bits = self.field("bits")[e0 // 8 : -(-e1 // 8)]
        signs = F.embedding(bits.to(torch.int32), sign_table(bits.device, dtype)).view(-1)
        return signs[e0 % 8 : e0 % 8 + e1 - e0].view(r1 - r0, q)

    def _slices(self):
        step = _slice_rows(self.q, self.field("bits").device)
        for r0 in range(0, self.p, step):
            yield r0, min(self.p, r0 + step)

    @property
    def per_row(self) -> bool:
        return self.meta.get("scale", "tensor") == "row"

    def mm_t(self, x: torch.Tensor) -> torch.Tensor:
        # Fill out^T [p, N] by row slices (contiguous writes), then scale its rows by s.
        out_t = torch.empty(self.p, x.shape[0], dtype=x.dtype, device=x.device)
        xt = x.t()
        for r0, r1 in self._slices():
            torch.mm(self._signs(r0, r1, x.dtype), xt, out=out_t[r0:r1])
        s = self._scale().to(x.dtype)
        out_t.mul_(s[:, None] if self.per_row else s)
        return out_t.t()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        s = self._scale().to(x.dtype)
        if self.per_row:
            x = x * s
        out = torch.zeros(x.shape[0], self.q, dtype=x.dtype, device=x.device)
        for r0, r1 in self._slices():
            out.addmm_(x[:, r0:r1], self._signs(r0, r1, x.dtype))
        return out if self.per_row else out.mul_(s)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        pos = ids[:, None] * self.q + torch.arange(self.q, device=ids.device)
        bits = (self.field("bits")[pos >> 3] >> (pos & 7).to(torch.uint8)) & 1
        signs = bits.to(dtype) * 2 - 1
        s = self._scale().to(dtype)
        return signs * (s[ids][:, None] if self.per_row else s)

    def add_dense(self, out: torch.Tensor) -> None:
        s = self._scale()
        for r0, r1 in self._slices():
            signs = self._signs(r0, r1, torch.float32)
            out[r0:r1] += signs * (s[r0:r1, None] if self.per_row else s)


class LowRankOp(ComponentOp):
    """``U diag(S) Vᵀ`` applied as ``((x V) S) Uᵀ``; factors decoded per forward from their stored form
    (zstd-coded codes are decompressed once, here: a forward unpacks bits, it does not decompress)."""

    def __init__(self, meta: Mapping, stored: Mapping[str, torch.Tensor], start: int, stop: int, p: int, q: int) -> None:
        meta, stored = LowRank.uncoded(meta, stored, p, q)
        super().__init__(meta, stored, start, stop, p, q)

    def factor(self, which: str, dtype: torch.dtype) -> torch.Tensor:
        """The factor vector-major, ``[r, L]`` (L = p for ``u``, q for ``v``), in ``dtype``."""
        length = self.p if which == "u" else self.q
        parts = []
        for j, seg in enumerate(self.meta[which]):
            key = f"{which}.{j}"
            width = seg["end"] - seg["start"]
            if "bits" in seg:
                codes = unpack_codes(self.field(f"{key}.codes"), seg["bits"], width * length).view(width, length)
                parts.append(dequantize_groups(codes, self.field(f"{key}.scale"), self.field(f"{key}.zero"), seg["group_size"]).to(dtype))
            else:
                parts.append(self.field(f"{key}.values").to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _s(self, dtype: torch.dtype) -> torch.Tensor:
        return self.field("s").to(dtype)

    def mm_t(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.factor("v", x.dtype).t()) * self._s(x.dtype)) @ self.factor("u", x.dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.factor("u", x.dtype).t()) * self._s(x.dtype)) @ self.factor("v", x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.factor("u", dtype)[:, ids].t() * self._s(dtype)) @ self.factor("v", dtype)

    def add_dense(self, out: torch.Tensor) -> None:
        # The spec's order: US rounded to float32 first, then the product (§6.3).
        us = self.factor("u", torch.float32).t() * self.field("s").to(torch.float32)
        out.addmm_(us, self.factor("v", torch.float32))


class SparseOp(ComponentOp):
    """A torch sparse CSR matrix built per forward over the resident CSR arrays (products in float32)."""

    def __init__(self, meta: Mapping, stored: Mapping[str, torch.Tensor], start: int, stop: int, p: int, q: int) -> None:
        super().__init__(meta, stored, start, stop, p, q)
        if meta["index"] == "seeded":
            # Regenerating the mask costs a SplitMix64 hash per element of the view: done once
            # here, kept as the CSR arrays the spec would have stored.
            mask = torch.zeros(p * q, dtype=torch.bool)
            mask[Sparse.flat_positions(meta, stored, p, q)] = True
            crow, col = csr_from_mask(mask.view(p, q))
            self.register_buffer("crow", crow, persistent=False)
            self.register_buffer("col", col, persistent=False)
        else:
            self.crow, self.col = None, None

    def _index(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        crow = self.crow if self.crow is not None else self.field("indptr")
        col = self.col if self.col is not None else self.field("indices")
        dtype = dtype or (torch.int32 if crow.dtype == torch.int32 else torch.int64)
        return crow.to(dtype), col.to(dtype)

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        v = self.meta["values"]
        if "bits" in v:
            codes = unpack_codes(self.field("codes"), v["bits"], self.meta["nnz"]).to(torch.float32)
            vals = self.field("scale").to(torch.float32) * (codes + float(v.get("offset", 0) - v["zero"]))
            return vals.to(dtype)
        return self.field("values").to(dtype)

    def _csr(self) -> torch.Tensor:
        crow, col = self._index()
        with warnings.catch_warnings():  # torch calls its sparse CSR support "beta" on every construction
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, self.values(torch.float32), (self.p, self.q), check_invariants=False)

    def mm_t(self, x: torch.Tensor) -> torch.Tensor:
        if self.meta["nnz"] == 0:
            return x.new_zeros(x.shape[0], self.p)
        return (self._csr() @ x.to(torch.float32).t()).t().to(x.dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.meta["nnz"] == 0:
            return x.new_zeros(x.shape[0], self.q)
        return (self._csr().t() @ x.to(torch.float32).t()).t().to(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        crow, col = self._index(torch.int64)
        starts = crow[ids]
        counts = crow[ids + 1] - starts
        out = torch.zeros(ids.shape[0], self.q, dtype=dtype, device=ids.device)
        total = int(counts.sum())
        if total == 0:
            return out
        first = torch.cumsum(counts, 0) - counts
        entry = (starts - first).repeat_interleave(counts) + torch.arange(total, device=ids.device)
        row_of = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(counts)
        out[row_of, col[entry]] = self.values(dtype)[entry]
        return out

    def add_dense(self, out: torch.Tensor) -> None:
        crow, col = self._index(torch.int64)
        rows = torch.arange(self.p, device=crow.device).repeat_interleave(crow.diff())
        out[rows, col] += self.values(torch.float32)  # positions are distinct


class DenseOp(ComponentOp):
    """The stored dense block, cast per forward."""

    def _m(self, dtype: torch.dtype) -> torch.Tensor:
        return self.field("values").reshape(self.p, self.q).to(dtype)

    def mm_t(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._m(x.dtype).t()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._m(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.field("values").reshape(self.p, self.q)[ids].to(dtype)

    def add_dense(self, out: torch.Tensor) -> None:
        out += self._m(torch.float32)


class MaterializedOp(DenseOp):
    """A component whose stored matrix view is not the weight's rows x columns (a custom
    ``view``), decoded once to a float32 block in the weight's own layout. Its stored tensors
    are kept as well, for merging. Deltas written by deltahub never need this."""

    def __init__(self, original: ComponentOp, p: int, q: int) -> None:
        dense = torch.zeros(original.p, original.q, dtype=torch.float32, device=original.field(original.fields[0]).device)
        original.add_dense(dense)
        super().__init__({"type": "dense"}, {"values": dense.reshape(p, q)}, original.start, original.stop, p, q)
        self.original = original

    def stored(self) -> dict[str, torch.Tensor]:
        return self.original.stored()


OPS: dict[str, type[ComponentOp]] = {"sign": SignOp, "lowrank": LowRankOp, "sparse": SparseOp, "dense": DenseOp}


class TensorDelta(DeviceBound):
    """The compressed delta of one tensor as a sum of component operators.

    The tensor is seen as a matrix ``[P, Q]`` (P = dimension 0, Q = the product of the others).
    """

    kind = "components"

    def __init__(self, name: str, record: Mapping, comps: list[ComponentOp]) -> None:
        super().__init__()
        self.name, self.record = name, dict(record)
        self.shape = tuple(record["shape"])
        self.dtype = to_torch(record["dtype"])
        self.comps = nn.ModuleList(comps)
        self.P = self.shape[0]
        self.Q = math.prod(self.shape[1:])

    def as_matrix(self) -> "TensorDelta":
        """Make every component a ``[rows, Q]`` block of the weight (see :class:`MaterializedOp`)."""
        for i, c in enumerate(self.comps):
            if (c.p, c.q) != (c.stop - c.start, self.Q):
                self.comps[i] = MaterializedOp(c, c.stop - c.start, self.Q)
        return self

    def _full(self, c: ComponentOp) -> bool:
        return c.start == 0 and c.stop == self.P

    def mm_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x Δᵀ`` for ``x`` [N, Q]: an ``nn.Linear`` weight's delta (Δ is [out, in])."""
        out = None
        for c in self.comps:
            if self._full(c):
                y = c.mm_t(x)
                out = y if out is None else out.add_(y)
            else:
                if out is None:
                    out = x.new_zeros(x.shape[0], self.P)
                out[:, c.start : c.stop] += c.mm_t(x)
        return out

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """``x Δ`` for ``x`` [N, P]: a GPT-2 ``Conv1D`` weight's delta (Δ is [in, out])."""
        out = None
        for c in self.comps:
            y = c.mm(x if self._full(c) else x[:, c.start : c.stop])
            out = y if out is None else out.add_(y)
        return out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``Δ[ids]`` for a flat index tensor: an embedding's delta, only the rows looked up."""
        out = None
        for c in self.comps:
            if self._full(c):
                y = c.rows(ids, dtype)
                out = y if out is None else out.add_(y)
                continue
            if out is None:
                out = torch.zeros(ids.shape[0], self.Q, dtype=dtype, device=ids.device)
            hit = ((ids >= c.start) & (ids < c.stop)).nonzero().reshape(-1)
            if hit.numel():
                out[hit] += c.rows(ids[hit] - c.start, dtype)
        return out

    def add_into(self, acc: torch.Tensor) -> None:
        """``acc += Δ`` for a float32 tensor of the record's shape, component by component in
        the spec's order (so ``base + Δ`` rounds like the merged model, low-rank order aside)."""
        for c in self.comps:
            block = acc[c.start : c.stop] if not self._full(c) else acc
            c.add_dense(block.view(c.p, c.q))

    def full(self, base: torch.Tensor) -> torch.Tensor:
        """The fine-tuned tensor ``base + Δ`` in the base's dtype (decoded on the base's device)."""
        acc = base.detach().to(torch.float32, copy=True)
        self.add_into(acc)
        return acc.to(base.dtype)

    def merged(self, base: torch.Tensor) -> torch.Tensor:
        """The fine-tuned tensor exactly as ``DeltaModel.from_pretrained`` decodes it (CPU)."""
        stored: dict[str, torch.Tensor] = {}
        for i, c in enumerate(self.comps):
            for f, t in c.stored().items():
                stored[stored_key(self.name, i, f)] = t.cpu()
        # The components as the ops hold them (coded codes already decompressed: their metas say so).
        record = {**self.record, "components": [getattr(c, "original", c).meta for c in self.comps]}
        return decode_record(self.name, record, stored.__getitem__, base.detach().cpu())


class ValueDelta(DeviceBound):
    """A tensor kept as its decoded fine-tuned values: norms, biases, lossless records."""

    kind = "value"

    def __init__(self, name: str, record: Mapping, value: torch.Tensor) -> None:
        super().__init__()
        self.name, self.record = name, dict(record)
        self.register_buffer("value", value, persistent=False)

    def full(self, base: torch.Tensor) -> torch.Tensor:
        return self.value.to(device=base.device, dtype=base.dtype)

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        """``finetuned - base`` in float32."""
        return self.value.to(device=base.device, dtype=torch.float32) - base.detach().to(torch.float32)

    def merged(self, base: torch.Tensor) -> torch.Tensor:
        return self.value.cpu()


def build_operator(name: str, record: Mapping, get: Callable[[str], torch.Tensor], base: torch.Tensor, *, matrix: bool) -> TensorDelta | ValueDelta | None:
    """The operator of one record of an existing tensor (``MultiDeltaModel.load_delta`` refuses
    added ones) against the base parameter ``base`` (``None`` if unchanged).

    ``get(key)`` reads a stored tensor by its full key. ``matrix`` says the parameter is used as
    a matrix (Linear, Conv1D, Embedding weight), which needs its components as row blocks.
    """
    validate_record(name, record)
    kind = record["kind"]
    if kind in ("unchanged", "removed"):
        return None
    shape = tuple(record["shape"])
    if record.get("base_shape") is not None or tuple(base.shape) != shape:
        was = record.get("base_shape") or list(base.shape)
        raise ServingError(
            f"the delta changes the shape of {name!r} ({list(was)} in the base, {list(shape)} in the fine-tune, e.g. a resized vocabulary); "
            "unmerged serving keeps the base's modules: load this delta merged (DeltaModel.from_pretrained(delta))"
        )
    comps = record["components"]
    if len(shape) <= 1 or any(c["type"] not in OPS for c in comps):
        # Tiny tensors, and lossless (no linear operator): the decoded fine-tuned values.
        value = decode_record(name, record, get, base.detach().cpu())
        return ValueDelta(name, record, value)
    ops: list[ComponentOp] = []
    for i, c in enumerate(stored_components(name, record, get)):
        p, q = matrix_view(block_shape(shape, c.meta), c.meta)
        rows = c.meta.get("rows") or [0, shape[0]]
        try:
            ops.append(OPS[c.type](c.meta, c.tensors, rows[0], rows[1], p, q))
        except FormatError as e:  # a field that does not decode (coded codes that lie): name the tensor
            raise type(e)(f"{CONFIG_NAME}: tensor {name!r} component {i} ({c.type}): {e}") from None
    op = TensorDelta(name, record, ops)
    return op.as_matrix() if matrix else op


def stored_components(name: str, record: Mapping, get: Callable[[str], torch.Tensor]) -> list[Component]:
    """The components of a (validated) record with their stored tensors, read with ``get(key)``
    and checked against the spec's layouts (a truncated or rewritten file fails here)."""
    shape = tuple(record["shape"])
    out = []
    for i, meta in enumerate(record["components"]):
        layout = component_type(meta["type"]).layout(meta, block_shape(shape, meta))
        stored = {f: get(stored_key(name, i, f)) for f in layout}
        check_fields(f"tensor {name!r} component {i} ({meta['type']})", layout, stored)
        out.append(Component(meta, stored))
    return out
