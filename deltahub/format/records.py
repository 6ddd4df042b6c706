"""Per-tensor records (spec/FORMAT.md, "Records"): what is stored for each tensor and how it decodes.

A record is a JSON object with ``kind`` (unchanged, dense, compressed, added, removed),
``shape`` and ``dtype`` of the fine-tuned tensor, and for dense, compressed and added a list
of ``components``. Component ``i``'s field ``f`` of tensor ``name`` is stored under the
safetensors key ``f"{name}::{i}.{f}"``.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Mapping

import torch

from ..errors import FormatError, InvalidTensorError
from .components import Component, block_shape, check_fields, component_type, layout_nbytes
from .dtypes import FLOAT_NAMES, KNOWN_DTYPES, itemsize, to_torch

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


def validate_record(name: str, record: Mapping) -> None:
    """Check a record's structure and every component's layout; raise :class:`FormatError` naming ``name``."""
    where = f"tensor {name!r}"
    kind = record.get("kind")
    if kind not in KINDS:
        raise FormatError(f"{where}: unknown record kind {kind!r}; known kinds are {list(KINDS)}")
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FormatError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    if record.get("dtype") not in KNOWN_DTYPES:
        raise FormatError(f"{where}: unknown dtype {record.get('dtype')!r}")
    if kind in ("dense", "compressed", "added") and record["dtype"] not in FLOAT_NAMES:
        raise FormatError(f"{where}: a {kind} record needs a floating-point dtype, got {record['dtype']}")
    comps = record.get("components")
    if kind in ("unchanged", "removed"):
        if comps:
            raise FormatError(f"{where}: a {kind} record stores no components")
        return
    if not isinstance(comps, list) or not comps:
        raise FormatError(f"{where}: a {kind} record needs a non-empty 'components' list")
    base_shape = record.get("base_shape")
    if base_shape is not None:
        if not isinstance(base_shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in base_shape):
            raise FormatError(f"{where}: 'base_shape' must be a list of non-negative integers, got {base_shape!r}")
        if kind != "compressed" or len(base_shape) != len(shape) or list(base_shape[1:]) != shape[1:]:
            raise FormatError(f"{where}: base_shape {base_shape} may differ from shape {shape} only in dimension 0 of a compressed record")
    if kind in ("dense", "added"):
        if len(comps) != 1 or comps[0].get("type") != "dense" or "rows" in comps[0]:
            raise FormatError(f"{where}: a {kind} record holds exactly one dense component over the whole tensor")
        if kind == "added" and comps[0].get("dtype") != record["dtype"]:
            raise FormatError(f"{where}: an added tensor is stored in its own dtype {record['dtype']}")
    types = [c.get("type") for c in comps]
    if "lossless" in types and len(comps) != 1:
        raise FormatError(f"{where}: a lossless component must be the record's only component")
    for i, meta in enumerate(comps):
        if not isinstance(meta, Mapping):
            raise FormatError(f"{where}: component {i} is not an object")
        component_type(meta.get("type")).layout(meta, block_shape(tuple(shape), meta))


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


def _placed_base(name: str, base: torch.Tensor, shape: tuple[int, ...], base_shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(base.shape) != base_shape:
        raise FormatError(f"tensor {name!r}: the base tensor has shape {list(base.shape)}, the delta was made against {list(base_shape)}")
    if base_shape == shape:
        return base.to(torch.float32, copy=True)  # accumulated into: never alias the caller's tensor
    out = torch.zeros(shape, dtype=torch.float32)
    n = min(shape[0], base_shape[0])
    out[:n] = base[:n].to(torch.float32)
    return out


def decode_record(name: str, record: Mapping, get: Callable[[str], torch.Tensor], base: torch.Tensor | None) -> torch.Tensor | None:
    """The fine-tuned tensor ``name``, or ``None`` for a removed tensor.

    ``get(key)`` returns the stored tensor under a full safetensors key; ``base`` is the base
    model's tensor of that name (``None`` only for added tensors). Components are summed onto
    the base in float32 and the sum is cast once to the record's dtype.
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
        return base.to(dtype)
    comps = record["components"]
    tensors_by_comp = []
    for i, meta in enumerate(comps):
        ctype = component_type(meta["type"])
        layout = ctype.layout(meta, block_shape(shape, meta))
        fetched = {f: get(stored_key(name, i, f)) for f in layout}
        check_fields(f"tensor {name!r} component {i} ({meta['type']})", layout, fetched)
        tensors_by_comp.append((ctype, meta, fetched))
    if kind == "added":
        return tensors_by_comp[0][2]["values"].reshape(shape)
    base_shape = tuple(record.get("base_shape", shape))
    if tensors_by_comp[0][0].needs_base:
        ctype, meta, fetched = tensors_by_comp[0]
        if base_shape != shape or tuple(base.shape) != shape:
            raise FormatError(f"tensor {name!r}: lossless needs a base of shape {list(shape)}, got {list(base.shape)}")
        return ctype.decode_exact(meta, fetched, base, dtype)
    acc = _placed_base(name, base, shape, base_shape)
    _accumulate(acc, shape, [(ctype, meta, fetched) for ctype, meta, fetched in tensors_by_comp])
    return acc.to(dtype)


def _accumulate(acc: torch.Tensor, shape: tuple[int, ...], parts) -> None:
    """Add each component into its block of the float32 accumulator (rows slice dimension 0)."""
    for ctype, meta, fetched in parts:
        rows = meta.get("rows")
        out = acc if rows is None else acc[rows[0] : rows[1]]
        ctype.add_into(out, meta, fetched, block_shape(shape, meta))


def delta_from_components(shape: tuple[int, ...], components: list[Component]) -> torch.Tensor:
    """The decoded delta (float32) of components that do not need the base. For tests and evaluation."""
    acc = torch.zeros(shape, dtype=torch.float32)
    _accumulate(acc, shape, [(component_type(c.type), c.meta, c.tensors) for c in components])
    return acc


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
