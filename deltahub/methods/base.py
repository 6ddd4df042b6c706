"""The method interface and its registry: a method is a recipe that turns a delta into components."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch

from ..errors import DeltahubError, InfeasibleRatioError, InvalidParameterError, UnknownMethodError, UnknownParameterError
from ..format.components import Component


@dataclass
class EncodeContext:
    """What a method knows besides the delta: the tensor, its dtype, its byte budget, its seed.

    ``measure(metas)`` returns the honest bytes (data, header entries, JSON record) of a record
    holding components with these metas, so methods fit their parameters to the budget without
    guessing at overheads.
    """

    name: str
    dtype: torch.dtype
    budget: int | None
    seed: int
    measure: Callable[[list[dict]], int]
    ratio: float | None = None
    base_rms: float | None = None  # root mean square of the base block: how large the delta is relative to the weights
    hessian: torch.Tensor | None = None  # E[x xᵀ] of the layer's inputs, with calibration (deltahub.calibration)
    base: torch.Tensor | None = None  # the base block, so that rounding can aim at the merged weights (methods/rounding.py)

    def fits(self, metas: list[dict]) -> bool:
        return self.budget is None or self.measure(metas) <= self.budget

    def infeasible(self, method: str, minimum_metas: list[dict], hint: str = "") -> InfeasibleRatioError:
        need = self.measure(minimum_metas)
        dense = self.dense_nbytes
        msg = (
            f"tensor {self.name!r}: {method} needs at least {need} bytes ({need / dense:.4g} of the dense delta) "
            f"but the ratio {self.ratio:.4g} allows {self.budget}"
        )
        return InfeasibleRatioError(msg + (f"; {hint}" if hint else "; raise the ratio or use a rule to store this tensor with 'dense'"))

    dense_nbytes: int = 0


# Upper bound of one stored key's entry in delta.safetensors.index.json, which the whole-model
# ratio counts (spec §11.3) but a record's own bytes do not.
PER_KEY = 100


@dataclass(frozen=True)
class PlanEntry:
    """One tensor as a planning method sees it before anything is encoded: its shape and dtype,
    the number of blocks encoded separately (the experts of a fused 3-D tensor), and whatever
    :meth:`Method.statistics` computed from its delta."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stats: Any
    blocks: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Planned:
    """A planning method's decision for one tensor: its ratio, and parameters that override the
    method's own for this tensor (choices the plan made, so encoding need not make them again)."""

    ratio: float
    params: dict[str, Any] = field(default_factory=dict)


class Planner(Protocol):
    """What a method with ``plans = True`` adds: per-tensor statistics, then per-tensor ratios."""

    def statistics(self, delta: torch.Tensor, base_rms: float, hessian: torch.Tensor | None = None) -> Any:
        """What :meth:`plan` needs to know of one tensor's float32 delta [p, q]; ``hessian`` is its
        layer's input second moment when compressing with calibration."""
        ...

    def plan(self, entries: list[PlanEntry], budget: int) -> dict[str, Planned]:
        """Per-tensor ratios (and choices) whose honest bytes sum to at most ``budget`` over ``entries``."""
        ...


class Method:
    """Base class of compression methods. Subclasses are dataclasses of their parameters.

    ``kind`` is the record kind the method produces; ``takes_ratio`` says whether a target ratio
    applies; ``needs_weights`` methods get ``(base, finetuned)`` instead of the delta;
    ``plans`` methods are also a :class:`Planner`: they spread a whole-model byte budget over the
    tensors before ``compress`` encodes any of them.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "compressed"
    takes_ratio: ClassVar[bool] = True
    needs_weights: ClassVar[bool] = False
    plans: ClassVar[bool] = False
    # How to ask for the method's natural size (no target ratio), for error messages; None: it has none.
    natural: ClassVar[str | None] = None

    def encode(self, delta: torch.Tensor, ctx: EncodeContext) -> list[Component]:  # pragma: no cover - interface
        """Encode a float32 matrix ``delta`` [p, q] into components."""
        raise NotImplementedError

    def check_ratio(self, ratio: float | None, dtype: torch.dtype, name: str = "") -> None:
        """Refuse ratios the method can never meet for weights of ``dtype``, whatever the tensor."""

    def smallest(self, p: int, q: int) -> list[dict] | None:
        """Metas of the smallest record the method writes for a ``[p, q]`` block with its
        parameters (measured by :meth:`EncodeContext.measure`), so that ``compress`` can tell
        before any work whether a model-wide target is reachable; ``None`` when unknown."""
        return None

    def params(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a registered method with its parameters.

    >>> get_method("svd", rank=8).rank
    8
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UnknownParameterError(f"method {name!r} has no parameter(s) {[u[:40] for u in unknown]}; it takes {sorted(fields)}")
    try:
        return cls(**params)
    except DeltahubError:
        raise
    except (ValueError, TypeError) as e:
        # The methods check their values in __post_init__ with plain ValueErrors; callers get one
        # typed error that names the method (a TypeError is a value of the wrong type, e.g. "4" < 8).
        raise InvalidParameterError(f"method {name!r}: {e}") from None


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(METHODS)


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """Largest ``x`` in ``[lo, hi]`` with ``fits(x)`` for a monotone ``fits``; ``None`` if not even ``lo`` fits."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
