"""Encode one tensor pair into a record, and decode it back.

This is where the rules that hold for every method live: the delta is computed in float32,
NaN and Inf are refused, unchanged tensors cost nothing, a grown or shrunk dimension 0 (a
resized vocabulary) is stored as a delta on the overlap plus dense new rows, 3-D tensors
(fused Mixture-of-Experts weights) are compressed one slice at a time, and the honest size
of the record is checked against the budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InfeasibleRatioError, InvalidTensorError, ShapeMismatchError
from .format import prng
from .format.components import Component, encode_dense
from .format.dtypes import itemsize, to_name
from .format.records import decode_record, make_record, record_layout, record_nbytes
from .methods import EncodeContext, Method, get_method


@dataclass
class EncodedTensor:
    """One tensor's record and its stored tensors (keyed ``"{i}.{field}"``), with honest sizes."""

    name: str
    record: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Stored bytes: data, header entries and JSON record."""
        return record_nbytes(self.name, self.record)

    @property
    def index_nbytes(self) -> int:
        """Bytes of the record's keys in ``delta.safetensors.index.json`` (:func:`index_nbytes`)."""
        return index_nbytes(self.name, self.record)

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense delta in the fine-tune's dtype."""
        return math.prod(self.record["shape"]) * itemsize(self.record["dtype"])

    @property
    def ratio(self) -> float:
        """Achieved ratio: stored bytes over dense bytes."""
        return self.nbytes / self.dense_nbytes if self.dense_nbytes else 0.0

    def decode(self, base: torch.Tensor | None) -> torch.Tensor | None:
        """The fine-tuned tensor rebuilt from ``base`` (see :func:`decode_tensor`)."""
        return decode_tensor(self, base)


# A shard's name in the index: "delta-00001-of-00002.safetensors" (5-digit counters), quoted.
_SHARD_NAME_JSON = 34


def index_nbytes(name: str, record: dict) -> int:
    """What a record's stored keys add to ``delta.safetensors.index.json`` (one
    ``"key": "shard",`` line each, as the writer indents it): bytes a repo's ratio counts
    that the record's own honest bytes (:func:`record_nbytes`) do not."""
    return sum(len(json.dumps(key)) + _SHARD_NAME_JSON + 8 for key in record_layout(name, record))


def _check_finite(name: str, which: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel():
        # torch has no isfinite for float8; widening is exact.
        finite = torch.isfinite(t.float() if t.element_size() == 1 else t)
        if bool(finite.all()):
            return
        bad = int((~finite).sum())
        raise InvalidTensorError(f"tensor {name!r}: the {which} weight holds {bad} NaN or Inf value(s); fix the checkpoint before compressing")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal calls -0.0 and +0.0 equal, and NaN unequal to itself)."""
    if a.numel() == 0:
        return True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().reshape(-1).view(bits), b.contiguous().reshape(-1).view(bits))


def _blocks(shape: tuple[int, ...], rows: int) -> list[tuple[tuple[int, int] | None, list[int] | None]]:
    """(rows range, view) of each block the method sees; rows=None means the whole tensor."""
    if len(shape) == 3:
        return [((e, e + 1), None) for e in range(rows)]
    if len(shape) >= 4:
        return [((0, rows) if rows != shape[0] else None, [rows, math.prod(shape[1:])])]
    return [((0, rows) if rows != (shape[0] if shape else 1) else None, None)]


def encode_tensor(
    name: str,
    base: torch.Tensor | None,
    finetuned: torch.Tensor,
    method: str | Method = "auto",
    ratio: float | None = 1 / 8,
    *,
    seed: int = 0,
    hessian: torch.Tensor | None = None,
    count_index: bool = False,
    **params: Any,
) -> EncodedTensor:
    """Compress ``finetuned - base`` with a method at a target ratio of the dense delta's bytes.

    The record's honest bytes (data, header entries, JSON record) never exceed
    ``floor(ratio * dense bytes)``; :class:`InfeasibleRatioError` otherwise, naming the tensor
    and the least the method needs. ``ratio=None``: the method's natural size (its parameters,
    e.g. ``rank``, decide). ``count_index=True`` also charges the record's lines in the repo's
    index to the budget (``compress`` does, so that the whole repo meets its target).
    ``hessian``: the input second moment of the tensor's layer, for methods that use calibration.

    >>> import torch
    >>> base = torch.zeros(64, 64, dtype=torch.bfloat16)
    >>> ft = (base.float() + torch.randn(64, 64) * 1e-2).bfloat16()
    >>> enc = encode_tensor("w", base, ft, "svd", ratio=1/4)
    >>> enc.ratio <= 1/4, enc.decode(base).dtype
    (True, torch.bfloat16)
    """
    m = method if isinstance(method, Method) else get_method(method, **params)
    shape = tuple(finetuned.shape)
    dtype = finetuned.dtype
    if not dtype.is_floating_point:
        raise InvalidTensorError(f"tensor {name!r} has dtype {dtype}; deltas are made of floating-point tensors only")
    _check_finite(name, "fine-tuned", finetuned)
    if base is None:
        record, tensors = make_record("added", shape, to_name(dtype), [encode_dense(finetuned, dtype)])
        return EncodedTensor(name, record, tensors)
    _check_finite(name, "base", base)
    bshape = tuple(base.shape)
    if bshape != shape and (len(bshape) != len(shape) or len(shape) == 0 or bshape[1:] != shape[1:]):
        raise ShapeMismatchError(
            f"tensor {name!r}: base shape {list(bshape)} and fine-tuned shape {list(shape)} differ beyond dimension 0; "
            "only a resized first dimension (vocabulary) can be stored as a delta. Is this the right base model?"
        )
    if bshape == shape and base.dtype == dtype and same_bits(base, finetuned):
        record, tensors = make_record("unchanged", shape, to_name(dtype))
        return EncodedTensor(name, record, tensors)
    if m.needs_weights:
        if bshape != shape:
            raise ShapeMismatchError(f"tensor {name!r}: {m.name} needs base and fine-tune of one shape, got {list(bshape)} and {list(shape)}")
        ctx = _context(name, dtype, shape, ratio, seed, m, None, None, count_index=count_index)
        record, tensors = make_record("compressed", shape, to_name(dtype), m.encode_weights(base, finetuned, ctx), method=m.name)  # type: ignore[attr-defined]
        return EncodedTensor(name, record, tensors)

    overlap = min(shape[0], bshape[0]) if shape else 1
    delta = finetuned[:overlap].to(torch.float32) - base[:overlap].to(torch.float32) if shape else finetuned.to(torch.float32) - base.to(torch.float32)
    if not bool(torch.isfinite(delta).all()):
        raise InvalidTensorError(f"tensor {name!r}: the delta overflows float32; the base and fine-tune are not related")
    if m.kind == "dense" and bshape == shape:
        record, tensors = make_record("dense", shape, to_name(dtype), m.encode(delta, _context(name, dtype, shape, None, seed, m, None, None)))
        return EncodedTensor(name, record, tensors)

    components = _components(name, base, delta, shape, overlap, dtype, m, ratio, seed, hessian, count_index)
    if shape and overlap < shape[0]:
        new_rows = encode_dense(finetuned[overlap:], dtype)
        new_rows.meta["rows"] = [overlap, shape[0]]
        components.append(new_rows)
    extra = {"base_shape": list(bshape)} if bshape != shape else {}
    record, tensors = make_record("compressed", shape, to_name(dtype), components, method=m.name, **extra)
    enc = EncodedTensor(name, record, tensors)
    # Each block met its own budget with its own copy of the record's JSON wrapper counted, so
    # the whole record meets the tensor's budget; check it anyway, a broken promise is a bug.
    spent = enc.nbytes + (enc.index_nbytes if count_index else 0)
    if ratio is not None and m.takes_ratio and bshape == shape and spent > math.floor(ratio * enc.dense_nbytes):
        raise InfeasibleRatioError(f"tensor {name!r}: {m.name} produced {spent} bytes, over its budget; please report this bug")
    return enc


def _components(name: str, base: torch.Tensor, delta: torch.Tensor, shape: tuple[int, ...], overlap: int, dtype: torch.dtype, m: Method,
                ratio: float | None, seed: int, hessian: torch.Tensor | None, count_index: bool, first: int = 0,
                held: int | None = None) -> list[Component]:
    """The components of every block of ``delta``; with ``held``, only experts ``first .. first +
    held`` of a fused 3-D tensor, which are all ``base`` and ``delta`` hold."""
    components: list[Component] = []
    for rows, view in _blocks(shape, overlap):
        if held is not None and (rows is None or not first <= rows[0] < first + held):
            continue
        at = None if rows is None else (rows[0] - first, rows[1] - first)
        block = delta if rows is None else delta[at[0] : at[1]]
        p_q = view or ([block.numel() // block.shape[-1], block.shape[-1]] if block.dim() else [1, 1])
        ctx = _context(name, dtype, shape, ratio if m.takes_ratio else None, seed, m, rows, view, block.numel(), count_index=count_index)
        if m.plans:
            ctx.base = base[:overlap] if rows is None else base[at[0] : at[1]]
            ctx.base_rms = rms(ctx.base)
            if hessian is not None and rows is None and view is None and len(shape) == 2 and hessian.shape[0] == shape[1]:
                ctx.hessian = hessian
        if rows is not None and len(shape) == 3:
            ctx.seed = prng.tensor_seed(seed, f"{name}[{rows[0]}]")
        for c in m.encode(block.reshape(p_q), ctx):
            if c.type == "dense":  # dense values are stored in the block's own shape, not the matrix view
                c.tensors["values"] = c.tensors["values"].reshape(block.shape)
            if rows is not None:
                c.meta["rows"] = list(rows)
            if view is not None:
                c.meta["view"] = list(view)
            components.append(c)
    return components


def encode_experts(name: str, base: torch.Tensor, finetuned: torch.Tensor, shape: tuple[int, ...], first: int, method: str | Method,
                   ratio: float | None, *, seed: int = 0, count_index: bool = False, **params: Any) -> list[Component]:
    """The components of experts ``first .. first + len(finetuned)`` of a fused 3-D tensor of
    ``shape`` (``base`` and ``finetuned`` hold those experts only), exactly as :func:`encode_tensor`
    makes them for the whole tensor: each expert is its own block, with its own budget and seed,
    so a tensor's experts can be encoded apart (a Ray task each share) and put together by
    :func:`assemble_experts`."""
    m = method if isinstance(method, Method) else get_method(method, **params)
    if len(shape) != 3 or tuple(base.shape) != tuple(finetuned.shape) or tuple(finetuned.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"tensor {name!r}: encode_experts takes expert slices of one fused 3-D tensor")
    delta = finetuned.to(torch.float32) - base.to(torch.float32)
    if not bool(torch.isfinite(delta).all()):
        raise InvalidTensorError(f"tensor {name!r}: the delta overflows float32; the base and fine-tune are not related")
    return _components(name, base, delta, tuple(shape), shape[0], finetuned.dtype, m, ratio, seed, None, count_index, first, len(delta))


def assemble_experts(name: str, shape: tuple[int, ...], dtype: torch.dtype, parts: list[list[Component]], method: str | Method, ratio: float | None,
                     count_index: bool = False, **params: Any) -> EncodedTensor:
    """The record of a fused 3-D tensor from its experts' components in order
    (:func:`encode_experts`): the bytes :func:`encode_tensor` writes for the whole tensor."""
    m = method if isinstance(method, Method) else get_method(method, **params)
    record, tensors = make_record("compressed", tuple(shape), to_name(dtype), [c for part in parts for c in part], method=m.name)
    enc = EncodedTensor(name, record, tensors)
    spent = enc.nbytes + (enc.index_nbytes if count_index else 0)
    if ratio is not None and m.takes_ratio and spent > math.floor(ratio * enc.dense_nbytes):
        raise InfeasibleRatioError(f"tensor {name!r}: {m.name} produced {spent} bytes, over its budget; please report this bug")
    return enc


def rms(t: torch.Tensor) -> float:
    """Root mean square, accumulated in float32 (0 for an empty tensor)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float32)) / math.sqrt(t.numel()) if t.numel() else 0.0


def _context(name: str, dtype: torch.dtype, shape: tuple[int, ...], ratio: float | None, seed: int, m: Method, rows, view, block_numel: int | None = None, count_index: bool = False) -> EncodeContext:
    numel = block_numel if block_numel is not None else math.prod(shape)
    dense = numel * dtype.itemsize
    budget = None if ratio is None else math.floor(ratio * dense)
    if ratio is not None and not (0 < ratio):
        raise ValueError(f"ratio must be positive, got {ratio}")

    def measure(metas: list[dict]) -> int:
        comps = []
        for meta in metas:
            meta = dict(meta)
            if rows is not None:
                meta["rows"] = list(rows)
            if view is not None:
                meta["view"] = list(view)
            comps.append(meta)
        record = {"kind": "compressed", "shape": list(shape), "dtype": to_name(dtype), "method": m.name, "components": comps}
        return record_nbytes(name, record) + (index_nbytes(name, record) if count_index else 0)

    return EncodeContext(name=name, dtype=dtype, budget=budget, seed=prng.tensor_seed(seed, name), measure=measure, ratio=ratio, dense_nbytes=dense)


def smallest_nbytes(name: str, shape: tuple[int, ...], dtype: torch.dtype, method: Method) -> int | None:
    """The least bytes (record and index lines) ``method`` can store a changed tensor of this
    shape in, from :meth:`Method.smallest` measured as the encoder measures it, block by block;
    ``None`` when the method cannot say."""
    rows = shape[0] if shape else 1
    total = 0
    for block_rows, view in _blocks(shape, rows):
        block = (block_rows[1] - block_rows[0], *shape[1:]) if block_rows is not None and len(shape) != 3 else (tuple(shape[1:]) if len(shape) == 3 else shape)
        numel = math.prod(block) if block else 1
        p_q = view or ([numel // block[-1], block[-1]] if block else [1, 1])
        metas = method.smallest(*p_q) if numel else None
        if metas is None:
            return None
        ctx = _context(name, dtype, shape, None, 0, method, block_rows, view, numel, count_index=True)
        total += ctx.measure(metas)
    return total


def decode_tensor(encoded: EncodedTensor, base: torch.Tensor | None) -> torch.Tensor | None:
    """Rebuild the fine-tuned tensor: components summed onto the base in float32, cast once."""
    name = encoded.name
    return decode_record(name, encoded.record, lambda key: encoded.tensors[key[len(name) + 2 :]], base)


