"""Per-tensor records (spec/FORMAT.md, "Records"): what is stored for each tensor and how it decodes.

A record is a JSON object with ``kind`` (unchanged, dense, compressed, added, removed),
``shape`` and ``dtype`` of the fine-tuned tensor, and for dense, compressed and added a list
of ``components``. Component ``i``'s field ``f`` of tensor ``name`` is stored under the
safetensors key ``f"{name}::{i}.{f}"``.
"""

from __future__ import annotations

import re

import json
import math
from typing import Callable, Mapping

import torch

from ..errors import FormatError, InvalidTensorError
from .components import Component, block_shape, check_fields, component_type, is_int, layout_nbytes
from .config import CONFIG_NAME
from .dtypes import FLOAT_NAMES, KNOWN_DTYPES, itemsize, to_torch
from .limits import MAX_NDIM, MAX_TENSOR_ELEMENTS

KINDS = ("unchanged", "dense", "compressed", "added", "removed")
SEPARATOR = "::"
# Upper bound of the digits of one data offset in a safetensors header (10 TB shards).
_OFFSET_DIGITS = 13


def stored_key(name: str, index: int, field: str) -> str:
    return f"{name}{SEPARATOR}{index}.{field}"


def compact_json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def make_record(kind: str, shape: tuple[int, ...], dtype: str, components: list[Component] | None = None, **extra: object) -> tuple[dict, dict[str, torch.Tensor]]:
    """Build a record and its stored tensors keyed ``"{i}.{field}"`` (prefix with the tensor name to store)."""
    record: dict = {"kind": kind, "shape": list(shape), "dtype": dtype, **extra}
    tensors: dict[str, torch.Tensor] = {}
    if components is not None:
        record["components"] = [c.meta for c in components]
        for i, c in enumerate(components):
            for f, t in c.tensors.items():
                tensors[f"{i}.{f}"] = t
    return record, tensors


def _check_shape(where: str, field: str, shape: object) -> tuple[int, ...]:
    """A shape from the config: a list of at most MAX_NDIM non-negative integers holding at
    most MAX_TENSOR_ELEMENTS elements (bounded before anything is sized from it)."""
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: field {field!r} must be a list of at most {MAX_NDIM} non-negative integers, got {str(shape)[:100]}; the file is corrupted or hostile")
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise FormatError(f"{where}: field {field!r} {shape} holds {math.prod(shape)} elements, more than the {MAX_TENSOR_ELEMENTS} deltahub reads in one tensor; the file is corrupted or hostile")
    return tuple(shape)


def validate_record(name: str, record: Mapping) -> None:
    """Check a record's structure and every component's layout, every field typed (integers are
    JSON integers, not booleans or floats; lists are lists; objects are objects) and bounded
    (limits.MAX_NDIM, MAX_TENSOR_ELEMENTS); raise :class:`FormatError` naming the config, the
    tensor and the field."""
    where = f"{CONFIG_NAME}: tensor {name!r}"
    if not isinstance(record, Mapping):
        raise FormatError(f"{where}: the record must be an object, got {type(record).__name__}; the file is corrupted or hostile")
    if not isinstance(name, str) or re.search(r"[\x00-\x1f\x7f]", name):
        raise FormatError(f"{where}: a tensor name must not contain control characters; the file is corrupted or hostile")
    if SEPARATOR in name:
        raise FormatError(f"{where}: a tensor name must not contain {SEPARATOR!r} (spec §5.2); the file is corrupted or hostile")
    kind = record.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise FormatError(f"{where}: unknown record kind {str(kind)[:40]!r}; known kinds are {list(KINDS)}")
    shape = _check_shape(where, "shape", record.get("shape"))
    dtype = record.get("dtype")
    if not isinstance(dtype, str) or dtype not in KNOWN_DTYPES:
        raise FormatError(f"{where}: field 'dtype' is {str(dtype)[:40]!r}, not one of {list(KNOWN_DTYPES)}")
    if kind in ("dense", "compressed", "added") and dtype not in FLOAT_NAMES:
        raise FormatError(f"{where}: a {kind} record needs a floating-point dtype, got {dtype}")
    if "method" in record and not isinstance(record["method"], str):
        raise FormatError(f"{where}: field 'method' must be a string, got {type(record['method']).__name__}")
    digest = record.get("sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise FormatError(f"{where}: field 'sha256' must be 64 lowercase hex digits; the file is corrupted or hostile")
    if digest is not None and kind == "removed":
        raise FormatError(f"{where}: a removed record has no decoded tensor to hash ('sha256'); the file is corrupted or hostile")
    comps = record.get("components")
    if comps is not None and not isinstance(comps, list):
        raise FormatError(f"{where}: field 'components' must be a list, got {type(comps).__name__}")
    if kind in ("unchanged", "removed"):
        if comps:
            raise FormatError(f"{where}: a {kind} record stores no components")
        return
    if not comps:
        raise FormatError(f"{where}: a {kind} record needs a non-empty 'components' list")
    for i, meta in enumerate(comps):
        if not isinstance(meta, Mapping):
            raise FormatError(f"{where}: component {i} is not an object")
    base_shape = record.get("base_shape")
    if base_shape is not None:
        base_shape = _check_shape(where, "base_shape", base_shape)
        if kind != "compressed" or len(base_shape) != len(shape) or base_shape[1:] != shape[1:]:
            raise FormatError(f"{where}: base_shape {list(base_shape)} may differ from shape {list(shape)} only in dimension 0 of a compressed record")
    if kind in ("dense", "added"):
        if len(comps) != 1 or comps[0].get("type") != "dense" or "rows" in comps[0]:
            raise FormatError(f"{where}: a {kind} record holds exactly one dense component over the whole tensor")
        if kind == "added" and comps[0].get("dtype") != dtype:
            raise FormatError(f"{where}: an added tensor is stored in its own dtype {dtype}")
    types = [c.get("type") for c in comps]
    if "lossless" in types and len(comps) != 1:
        raise FormatError(f"{where}: a lossless component must be the record's only component")
    for i, meta in enumerate(comps):
        try:
            component_type(meta.get("type")).layout(meta, block_shape(shape, meta))
        except FormatError as e:
            # Same class (UnknownComponentError stays one), with the file, tensor and component.
            raise type(e)(f"{where}, component {i} ({str(meta.get('type'))[:40]}): {e}") from None


def record_layout(name: str, record: Mapping) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every stored key of the record with its dtype and shape, as the spec fixes them."""
    out = {}
    shape = tuple(record["shape"])
    for i, meta in enumerate(record.get("components") or []):
        for f, spec in component_type(meta["type"]).layout(meta, block_shape(shape, meta)).items():
            out[stored_key(name, i, f)] = spec
    return out


def record_nbytes(name: str, record: Mapping) -> int:
    """Honest bytes of one tensor: stored data, its safetensors header entries (offsets at their
    widest) and its JSON record. This is what a method's budget is compared with."""
    layout = record_layout(name, record)
    data = layout_nbytes(layout)
    header = 0
    for key, (dt, shape) in layout.items():
        entry = compact_json({key: {"dtype": dt, "shape": list(shape), "data_offsets": [0, 0]}})
        header += len(entry.encode()) + 2 * (_OFFSET_DIGITS - 1)  # braces of the entry replace the comma
    return data + header + len(config_line(name, record).encode())


def config_line(name: str, record: Mapping) -> str:
    """The record's line in ``delta_config.json``, exactly as written there."""
    return f"    {json.dumps(name, ensure_ascii=False)}: {compact_json(dict(record))},\n"


def dense_nbytes(record: Mapping) -> int:
    """Bytes of the dense delta in the fine-tune's dtype: the denominator of every ratio."""
    return math.prod(record["shape"]) * itemsize(record["dtype"])


# Tensors are decoded a stretch at a time: about 1 MiB of float32 accumulator, which stays in
# cache while the base is widened into it, every component adds into it and it is cast. Against
# whole-tensor passes this is 1.3-1.9x faster and never holds a float32 copy of a whole tensor
# (benchmarks/README.md, load).
_STRETCH = 1 << 18


def decode_record(name: str, record: Mapping, get: Callable[[str], torch.Tensor], base: torch.Tensor | None) -> torch.Tensor | None:
    """The fine-tuned tensor ``name``, or ``None`` for a removed tensor.

    ``get(key)`` returns the stored tensor under a full safetensors key; ``base`` is the base
    model's tensor of that name (``None`` only for added tensors). Components are summed onto
    the base in float32 and the sum is cast once to the record's dtype. The result is always
    new memory: the base and the stored tensors may be views of files that are only borrowed.
    """
    validate_record(name, record)
    kind = record["kind"]
    shape = tuple(record["shape"])
    dtype = to_torch(record["dtype"])
    if kind == "removed":
        return None
    if kind != "added" and base is None:
        raise InvalidTensorError(f"tensor {name!r} is stored as a delta ({kind}) but no base tensor was given")
    if kind == "unchanged":
        if tuple(base.shape) != shape:
            raise FormatError(f"tensor {name!r}: unchanged against a base of shape {list(shape)}, got {list(base.shape)}")
        return base.to(dtype, copy=True)
    comps = record["components"]
    tensors_by_comp = []
    for i, meta in enumerate(comps):
        ctype = component_type(meta["type"])
        layout = ctype.layout(meta, block_shape(shape, meta))
        fetched = {f: get(stored_key(name, i, f)) for f in layout}
        check_fields(f"tensor {name!r} component {i} ({meta['type']})", layout, fetched)
        tensors_by_comp.append((ctype, meta, fetched))
    if kind == "added":
        return tensors_by_comp[0][2]["values"].reshape(shape).clone()
    base_shape = tuple(record.get("base_shape", shape))
    if tensors_by_comp[0][0].needs_base:
        ctype, meta, fetched = tensors_by_comp[0]
        if base_shape != shape or tuple(base.shape) != shape:
            raise FormatError(f"tensor {name!r}: lossless needs a base of shape {list(shape)}, got {list(base.shape)}")
        try:
            return ctype.decode_exact(meta, fetched, base, dtype)
        except FormatError as e:
            raise type(e)(f"{CONFIG_NAME}: tensor {name!r} component 0 ({meta['type']}): {e}") from None
    if tuple(base.shape) != base_shape:
        raise FormatError(f"tensor {name!r}: the base tensor has shape {list(base.shape)}, the delta was made against {list(base_shape)}")
    if base_shape[1:] != shape[1:]:
        raise FormatError(f"tensor {name!r}: base_shape {list(base_shape)} and shape {list(shape)} may differ in dimension 0 only")
    return sum_components(base, shape, dtype, tensors_by_comp, name)


def sum_components(base: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, parts, name: str = "") -> torch.Tensor:
    """``cast(float32(base) + P_0 + P_1 + ...)`` (spec §5.4 steps 6-8), a stretch at a time.

    ``parts``: ``(component type, meta, stored fields)`` in component order. The base sits at
    the origin of ``shape`` (dimension 0 may have grown or shrunk). Every element still gets
    each addition in component order, so the result is the spec's whatever the stretches.
    ``base`` is only read, a stretch at a time: a memory-mapped base is never copied whole.
    """
    out = torch.empty(shape, dtype=dtype)
    flat_out = out.view(-1)
    numel = flat_out.numel()
    width = math.prod(shape[1:]) if shape else 1  # elements per row of dimension 0
    spans = []  # (first element, end element, q, row adder) of each component
    for i, (ctype, meta, fetched) in enumerate(parts):
        block = block_shape(shape, meta)
        rows = meta.get("rows")
        start = rows[0] * width if rows else 0
        try:
            adder = ctype.row_adder(meta, fetched, block)
        except FormatError as e:  # a stored field that does not decode (coded codes that lie): name the tensor
            raise type(e)(f"{CONFIG_NAME}: tensor {name!r} component {i} ({meta['type']}): {e}") from None
        spans.append((start, start + math.prod(block), ctype.view(meta, block)[1], adder))
    if numel:
        # A stretch must hold whole matrix-view rows of every component it touches: cut at
        # multiples of every q, which needs each component to start on one; otherwise (a custom
        # view, a component's rows at an odd offset) the tensor is one stretch.
        grain = math.lcm(*(q for _, _, q, _ in spans)) if spans else 1
        if any(start % grain for start, _, _, _ in spans):
            grain = numel
        size = max(grain, _STRETCH // grain * grain)
        flat_base = base.reshape(-1)
        placed = min(flat_base.numel(), numel)  # base elements at the origin, the rest zeros
        buf = None if dtype == torch.float32 else torch.empty(min(size, numel), dtype=torch.float32)
        for e0 in range(0, numel, size):
            e1 = min(numel, e0 + size)
            acc = flat_out[e0:e1] if buf is None else buf[: e1 - e0]
            c = max(0, min(e1, placed) - e0)
            acc[:c].copy_(flat_base[e0 : e0 + c])
            acc[c:].zero_()
            for start, end, q, adder in spans:
                i0, i1 = max(e0, start), min(e1, end)
                if i0 < i1:
                    adder.add(acc[i0 - e0 : i1 - e0].view(-1, q), (i0 - start) // q, (i1 - start) // q)
            if buf is not None:
                flat_out[e0:e1].copy_(acc)
    for _, _, _, adder in spans:
        adder.finish()
    return out


def check_components(name: str, record: Mapping, get: Callable[[str], torch.Tensor]) -> None:
    """Decode every component of a validated record (one that needs the base, ``lossless``, to
    its stored bytes only, which must be the record's size, ``check_exact``), a stretch of
    matrix-view rows at a time into one reused buffer of about 2^18 elements, and refuse a
    component whose decoded values are not all finite. Nothing of the record's full size is
    allocated (a 37 KB file declaring 10^9 rows costs CPU, not memory); ``get`` as for
    :func:`decode_record`. This is ``verify``'s check, which has no base."""
    shape = tuple(record["shape"])
    for i, meta in enumerate(record.get("components") or []):
        ctype = component_type(meta["type"])
        where = f"tensor {name!r} component {i} ({meta['type']})"
        block = block_shape(shape, meta)
        layout = ctype.layout(meta, block)
        fetched = {f: get(stored_key(name, i, f)) for f in layout}
        check_fields(where, layout, fetched)
        if ctype.needs_base:
            # Decoding needs the base, but the stored data's size does not: checked, bounded.
            try:
                ctype.check_exact(meta, fetched, math.prod(shape) * itemsize(record["dtype"]))
            except FormatError as e:
                raise type(e)(f"{CONFIG_NAME}: {where}: {e}") from None
            continue
        if meta["type"] == "sparse" and meta["nnz"] == 0 and (meta["index"] == "csr" or meta["mask"]["kind"] == "group"):
            continue  # P is +0.0 everywhere; no mask to count
        p, q = ctype.view(meta, block)
        adder = ctype.row_adder(meta, fetched, block)
        step = max(1, _STRETCH // max(q, 1))
        buf = torch.empty(min(step, p) * q, dtype=torch.float32)
        for r0 in range(0, p, step):
            r1 = min(p, r0 + step)
            part = buf[: (r1 - r0) * q].view(r1 - r0, q)
            part.zero_()
            adder.add(part, r0, r1)
            if not bool(torch.isfinite(part).all()):
                raise InvalidTensorError(f"{CONFIG_NAME}: {where} decodes to NaN or Inf values (matrix-view rows {r0}..{r1}); the delta is corrupted or hostile")
        adder.finish()


def delta_from_components(shape: tuple[int, ...], components: list[Component]) -> torch.Tensor:
    """The decoded delta (float32) of components that do not need the base. For tests and evaluation."""
    return sum_components(torch.zeros(shape), shape, torch.float32, [(component_type(c.type), c.meta, c.tensors) for c in components])


def describe_record(record: Mapping) -> str:
    """What a record stores, in a few words: rank and bit widths, keep rate and value bits, ...

    >>> describe_record({"kind": "compressed", "shape": [64, 64], "dtype": "BF16", "components": [
    ...     {"type": "lowrank", "rank": 6, "u": [{"start": 0, "end": 2, "bits": 8, "group_size": 128},
    ...     {"start": 2, "end": 6, "bits": 3, "group_size": 128}], "v": []}]})
    'lowrank r=6 (2x8b+4x3b)'
    """
    if record["kind"] in ("unchanged", "removed", "added"):
        return record["kind"]
    parts = []
    for meta in record.get("components") or []:
        kind = meta.get("type")
        if kind == "lowrank":
            segs = "+".join(f"{s['end'] - s['start']}x{s['bits']}b" if "bits" in s else f"{s['end'] - s['start']}x{s['dtype']}" for s in meta.get("u", []))
            parts.append(f"lowrank r={meta['rank']} ({segs})")
        elif kind == "sparse":
            n = math.prod(block_shape(tuple(record["shape"]), meta)) or 1
            v = meta.get("values", {})
            width = f"{v['bits']}b" if "bits" in v else v.get("dtype", "?")
            parts.append(f"sparse {meta.get('index')} keep {meta['nnz'] / n:.3g} {width}")
        elif kind == "sign":
            parts.append(f"sign ({meta.get('scale', 'tensor')} scale)")
        else:
            parts.append(str(kind))
    # Per-slice blocks (fused experts) repeat one description per slice: say it once with a count.
    counts: dict[str, int] = {}
    for p in parts:
        counts[p] = counts.get(p, 0) + 1
    return " + ".join(p if c == 1 else f"{c}x[{p}]" for p, c in counts.items())
