"""What every component shares: the encoded payload, the matrix view, and the type registry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch

from ...errors import FormatError, UnknownComponentError
from ..dtypes import itemsize, to_torch

# field name -> (dtype name, shape)
Layout = dict[str, tuple[str, tuple[int, ...]]]


@dataclass
class Component:
    """One encoded component: its JSON ``meta`` (with ``"type"``) and its stored ``tensors`` by field."""

    meta: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.meta["type"]


def is_int(x: object) -> bool:
    """A JSON integer: an ``int`` that is not a ``bool`` (``true`` is not a row count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(field: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` as an integer in ``lo..hi``, else a :class:`FormatError` naming ``field``."""
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise FormatError(f"field {field!r} must be an integer {span}, got {str(value)[:60]}")
    return value


def block_shape(shape: tuple[int, ...], meta: Mapping) -> tuple[int, ...]:
    """Shape of the part of the tensor a component covers (``rows`` restricts dimension 0)."""
    rows = meta.get("rows")
    if rows is None:
        return tuple(shape)
    if len(shape) == 0:
        raise FormatError("a component of a 0-d tensor cannot have 'rows'")
    if not (isinstance(rows, list) and len(rows) == 2 and all(is_int(r) for r in rows) and 0 <= rows[0] < rows[1] <= shape[0]):
        raise FormatError(f"field 'rows' must be [start, end] with 0 <= start < end <= {shape[0]} (dimension 0 of shape {list(shape)}), got {str(rows)[:60]}")
    start, end = rows
    return (end - start, *shape[1:])


def matrix_view(block: tuple[int, ...], meta: Mapping) -> tuple[int, int]:
    """The 2-D view [p, q] a matrix component works on: ``meta["view"]`` or [numel // last, last]."""
    numel = math.prod(block)
    view = meta.get("view")
    if view is not None:
        if not isinstance(view, list) or len(view) != 2 or not all(is_int(v) and v >= 0 for v in view) or view[0] * view[1] != numel:
            raise FormatError(f"field 'view' {str(view)[:60]} does not hold the {numel} elements of block {list(block)}")
        return int(view[0]), int(view[1])
    if len(block) == 0:
        return 1, 1
    q = block[-1]
    return (numel // q if q else 0), q


def layout_nbytes(layout: Layout) -> int:
    return sum(itemsize(dt) * math.prod(shape) for dt, shape in layout.values())


class RowAdder(ABC):
    """Adds one component's decoded matrix-view rows into a float32 accumulator, a stretch of
    rows at a time and in increasing row order (spec §5.4 step 7, restricted to those rows).

    Decoding a tensor a stretch of rows at a time keeps the accumulator in cache and never
    materializes a whole float32 copy of the tensor (a 70B model's embedding is 4 GB of it).
    Made once per tensor by :meth:`ComponentType.row_adder`, which does the per-tensor work
    (decoding factors and values) up front.
    """

    @abstractmethod
    def add(self, out: torch.Tensor, r0: int, r1: int) -> None:
        """``out += P[r0:r1]`` for a contiguous float32 ``out`` of shape ``[r1 - r0, q]``."""

    def finish(self) -> None:
        """Checks that need every row to have been added (e.g. a mask's count)."""


class ComponentType(ABC):
    """A component type: the spec's layout of its stored fields and its decoding."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        """The stored fields: name -> (dtype name, shape)."""

    @classmethod
    @abstractmethod
    def row_adder(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> RowAdder:
        """The decoder of this component's rows, over its matrix view."""

    @classmethod
    def view(cls, meta: Mapping, block: tuple[int, ...]) -> tuple[int, int]:
        """The ``[p, q]`` matrix view whose rows :meth:`row_adder` decodes (spec §6.1)."""
        return matrix_view(block, meta)

    @classmethod
    def add_into(cls, out: torch.Tensor, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> None:
        """``out += P`` for a contiguous float32 ``out`` of the block's shape, all rows at once."""
        p, q = cls.view(meta, block)
        adder = cls.row_adder(meta, tensors, block)
        adder.add(out.view(p, q), 0, p)
        adder.finish()

    @classmethod
    def decode(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> torch.Tensor:
        """The component's float32 array ``P`` of the block's shape (spec §6)."""
        # -0.0 is the additive identity (-0.0 + x == x for every x, zeros included), so adding
        # the component into it gives P exactly, signed zeros too.
        out = torch.full(block, -0.0, dtype=torch.float32)
        cls.add_into(out, meta, tensors, block)
        return out


COMPONENT_TYPES: dict[str, type[ComponentType]] = {}


def register_component(cls: type[ComponentType]) -> type[ComponentType]:
    COMPONENT_TYPES[cls.name] = cls
    return cls


def component_type(name: str) -> type[ComponentType]:
    try:
        return COMPONENT_TYPES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable "type" (a list or an object)
        raise UnknownComponentError(
            f"unknown component type {str(name)[:60]!r}; this deltahub reads {sorted(COMPONENT_TYPES)}. "
            "The delta may come from a newer deltahub: upgrade with `pip install -U deltahub`."
        ) from None


def check_fields(where: str, layout: Layout, tensors: Mapping[str, torch.Tensor]) -> None:
    """Stored tensors must be exactly the layout's fields, with its dtypes and shapes."""
    missing = sorted(set(layout) - set(tensors))
    if missing:
        raise FormatError(f"{where}: stored tensors missing: {missing}; the file is truncated or corrupted")
    extra = sorted(set(tensors) - set(layout))
    if extra:
        raise FormatError(f"{where}: unexpected stored tensors {extra}")
    for key, (dt, shape) in layout.items():
        t = tensors[key]
        if t.dtype != to_torch(dt) or tuple(t.shape) != tuple(shape):
            raise FormatError(
                f"{where}: field {key!r} is {t.dtype} {list(t.shape)}, the spec requires {dt} {list(shape)}; "
                "the file is corrupted or was written by a non-conforming writer"
            )

