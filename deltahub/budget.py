"""Whole-model byte budgets: with a target ratio, the delta repo as a whole (shards, index and
config: ``totals.stored_bytes``) stays at or under ``ratio`` of the dense delta.

Before any tensor is encoded, each tensor's least cost is known from its shape alone: the
method's smallest record (:meth:`Method.smallest`), or the dense record where that is smaller
(a tiny matrix), with its lines in the index and the config. If these and the repo's fixed
overhead exceed the target, no encoding can meet it, and :func:`infeasible` says which ratio
the model can reach, before any work. While encoding, each tensor gets the largest common ratio
that still leaves every remaining tensor its least cost (water filling), so what a tensor
leaves unused (an unchanged tensor, a rank that does not fill its share) goes to the tensors
after it, and the promise holds whatever order the checkpoint has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from .encoding import index_nbytes, smallest_nbytes
from .errors import InfeasibleRatioError
from .format.dtypes import to_name
from .format.records import make_record, record_nbytes
from .format.repo import layer_group, parse_size
from .methods import METHODS, get_method
from .policy import Policy

# The config's fixed part (format, versions, totals, method, summary's figures) and, per shard,
# its safetensors header's fixed part and its line in the index's checksums. Upper bounds: the
# exact check before the repo is installed (compress) catches any slip, loudly.
_CONFIG_FIXED = 1536
_PER_SHARD = 200
_WORST = 5  # the summary lists the worst tensors by name


def samples_line(name: str) -> int:
    """The tensor's base sample digest line in ``delta_config.json``, and the decoded tensor's
    digest in its record (``,"sha256":"<64 hex>"``: 76 bytes)."""
    return len(json.dumps(name, ensure_ascii=False).encode()) + 28 + 76


def fallback_line(name: str) -> int:
    """The tensor's line in the config's list of dense fallbacks."""
    return len(json.dumps(name, ensure_ascii=False).encode()) + 8


def dense_cost(name: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str = "dense") -> int:
    """Bytes of a dense (or added) record of this shape with its index line."""
    record = {"kind": kind, "shape": list(shape), "dtype": to_name(dtype), "components": [{"type": "dense", "dtype": to_name(dtype)}]}
    return record_nbytes(name, record) + index_nbytes(name, record)


def unchanged_cost(name: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str = "unchanged") -> int:
    record, _ = make_record(kind, shape, to_name(dtype))
    return record_nbytes(name, record)


@dataclass
class Item:
    """One tensor as the budget sees it."""

    name: str
    method: str
    dense: int  # its dense delta bytes: its weight in the common ratio
    floor: int  # the least it can cost (record, index and config lines)
    scalable: bool  # gets max(ratio * dense, floor); otherwise exactly its floor (dense, lossless, added)
    fixed_ratio: float | None = None  # a rule's own ratio instead of the common one
    dense_instead: bool = False  # its dense record is smaller than the method's smallest: stored dense
    extra: int = 0  # bytes outside the method's record: config lines, a resized tensor's new rows


@dataclass
class ModelBudget:
    """The byte budget of one ``compress`` call at a target ratio (see the module docstring)."""

    target: float
    total_dense: int
    fixed: int
    items: dict[str, Item] = field(default_factory=dict)
    spent: int = 0
    done: set[str] = field(default_factory=set)

    @property
    def limit(self) -> int:
        return math.floor(self.target * self.total_dense)

    def least(self) -> int:
        """The least bytes the whole repo can take: fixed overhead, spent, and the floors left."""
        return self.fixed + self.spent + sum(i.floor for n, i in self.items.items() if n not in self.done)

    def smallest_ratio(self) -> float:
        return self.least() / self.total_dense if self.total_dense else 0.0

    def feasible(self) -> bool:
        return self.least() <= self.limit

    def share(self, name: str) -> int:
        """Bytes this tensor may take (record, index and config lines): its fixed ratio, or the
        largest common ratio at which every tensor not yet encoded still gets its floor."""
        item = self.items[name]
        if not item.scalable:
            return item.floor
        if item.fixed_ratio is not None:
            return max(math.floor(item.fixed_ratio * item.dense), item.floor)
        left = [i for n, i in self.items.items() if n not in self.done]
        room = self.limit - self.fixed - self.spent - sum(i.floor if not i.scalable else max(math.floor(i.fixed_ratio * i.dense), i.floor) for i in left if not i.scalable or i.fixed_ratio is not None)
        common = [i for i in left if i.scalable and i.fixed_ratio is None]
        r = _water_level(room, [(i.dense, i.floor) for i in common])
        return max(math.floor(r * item.dense), item.floor)

    def affords(self, name: str, nbytes: int) -> bool:
        """Whether this tensor may take ``nbytes`` and still leave every other tensor its floor."""
        others = sum(i.floor for n, i in self.items.items() if n not in self.done and n != name)
        return self.fixed + self.spent + nbytes + others <= self.limit

    def spend(self, name: str, nbytes: int) -> None:
        self.done.add(name)
        self.spent += nbytes


def _water_level(room: int, items: list[tuple[int, int]]) -> float:
    """The largest r with sum(max(r * dense, floor)) <= room (0 when even the floors do not fit).

    >>> _water_level(100, [(100, 10), (100, 60)])  # the second stays at its floor: 40 / 100
    0.4
    """
    if not items:
        return 0.0
    # Above a tensor's breakpoint floor/dense it costs r * dense; below, its floor.
    order = sorted(items, key=lambda x: x[1] / x[0] if x[0] else math.inf)
    floors = sum(f for _, f in items)
    if floors > room:
        return 0.0
    scaled_dense = 0
    for k, (d, f) in enumerate(order):
        # Tensors before k are scaled: cost(r) = r * scaled_dense + floors of the rest.
        floors -= f
        scaled_dense += d
        nxt = order[k + 1][1] / order[k + 1][0] if k + 1 < len(order) and order[k + 1][0] else math.inf
        r = (room - floors) / scaled_dense if scaled_dense else math.inf
        if r <= nxt:
            return r
    return r


def plan(policy: Policy, base, finetuned, fallback_dense: bool, max_shard_size: int | str, names_given: tuple[str, ...]) -> ModelBudget | None:
    """The :class:`ModelBudget` of a ``compress`` call from the checkpoints' shapes (no tensor
    is read), or ``None`` without a target ratio (every method at its natural size)."""
    target = policy.ratio if METHODS[policy.method].takes_ratio else None
    if target is None:
        return None
    names = finetuned.names()
    total_dense = 0
    groups: set[str] = set()
    fixed = _CONFIG_FIXED + sum(len(json.dumps(str(n), ensure_ascii=False).encode()) + 64 for n in names_given)
    # (+ 32: the recorded ratio's digits, so that a target typed from a message is not refused by them)
    # The ratio counted at its widest repr (24 characters), not its own: the floor must not move
    # with the digits of the target, or a target typed from the message could miss by a byte.
    fixed += len(json.dumps({**policy.to_dict(), "ratio": 0}, ensure_ascii=False).encode()) - 1 + 24 + 32
    budget = ModelBudget(target, 0, 0)
    longest = 0
    for name in names:
        info = finetuned.info(name)
        shape, dtype = tuple(info.shape), _torch_dtype(info.dtype)
        dense = math.prod(shape) * dtype.itemsize
        total_dense += dense
        groups.add(layer_group(name))
        longest = max(longest, len(json.dumps(name, ensure_ascii=False).encode()))
        in_base = name in base
        if not dtype.is_floating_point:  # must be unchanged (compress refuses it otherwise)
            budget.items[name] = Item(name, "unchanged", dense, unchanged_cost(name, shape, dtype) + samples_line(name), False)
            continue
        if not in_base:
            budget.items[name] = Item(name, "added", dense, dense_cost(name, shape, dtype, "added") + 76, False)  # + its sha256
            continue
        method, params, ratio = policy.resolve(name, shape)
        m = get_method(method, **params)
        samples = samples_line(name)
        if not m.takes_ratio or ratio is None:
            # dense, lossless, or a natural size: counted at the dense record (lossless is
            # usually smaller, and what it leaves goes to the tensors after it).
            budget.items[name] = Item(name, method, dense, dense_cost(name, shape, dtype) + samples + 64, False)
            continue
        bshape = tuple(base.info(name).shape)
        overlap = (min(shape[0], bshape[0]), *shape[1:]) if shape and bshape != shape else shape
        extra = samples
        if overlap != shape:  # a resized vocabulary: the new rows are stored dense in the record
            extra += (math.prod(shape) - math.prod(overlap)) * dtype.itemsize + 256
        # (auto spreads its own budget; its floor is a lower bound, for the early check)
        least = smallest_nbytes(name, overlap, dtype, m)
        dense_rec = dense_cost(name, shape, dtype) + samples + fallback_line(name)
        instead = fallback_dense and overlap == shape and least is not None and dense_rec <= least + extra
        floor = dense_rec if instead else (least or 0) + extra
        budget.items[name] = Item(name, method, math.prod(overlap) * dtype.itemsize, floor, not instead, None if ratio == target else ratio, instead, extra)
    for name in base.names():
        if name not in finetuned:  # a "removed" record
            info = base.info(name)
            fixed += unchanged_cost(name, tuple(info.shape), _torch_dtype(info.dtype), "removed")
    # Shards: one per transformer block at least, and one more per max_shard_size of data.
    shards = len(groups) + math.ceil(target * total_dense / parse_size(max_shard_size))
    fixed += shards * _PER_SHARD + _WORST * (longest + 48)
    budget.total_dense, budget.fixed = total_dense, fixed
    return budget


def _torch_dtype(name: str) -> torch.dtype:
    from .format.dtypes import to_torch

    return to_torch(name)


def fraction(r: float) -> str:
    """``1/16 = 0.0625`` for a ratio that is one over an integer, else the ratio.

    >>> fraction(1 / 16), fraction(0.07)
    ('1/16 = 0.0625', '0.07')
    """
    inv = 1 / r if r else math.inf
    return f"1/{round(inv)} = {r:.4g}" if math.isfinite(inv) and abs(inv - round(inv)) < 1e-9 * inv else f"{r:.4g}"


def round_up(r: float) -> str:
    """A ratio rounded up to 4 significant digits, as one would type it after ``--ratio``.

    >>> round_up(0.063412), round_up(0.0634)
    ('0.06342', '0.06340')
    """
    digits = 4 - 1 - math.floor(math.log10(r)) if r > 0 else 4
    return f"{math.ceil(r * 10 ** digits - 1e-9) / 10 ** digits:.{max(digits, 0)}f}"


def infeasible(budget: ModelBudget, method: str, why: str = "") -> InfeasibleRatioError:
    """The model-level error: the target, the smallest reachable ratio, and the fixes."""
    least = budget.smallest_ratio()
    m = METHODS[method]
    fixes = f"raise the target to at least --ratio {round_up(least)} (ratio={round_up(least)})"
    if m.natural:
        fixes += f", or ask for {m.natural}"
    return InfeasibleRatioError(
        f"{method} cannot store this delta in {fraction(budget.target)} of its dense bytes: the smallest target it can meet on this model is "
        # A planning method's floors are lower bounds (its plan decides the rest).
        f"{'at least ' if m.plans else ''}{least:.4f} ({why or _why(budget)}); {fixes}"
    )


def _why(budget: ModelBudget) -> str:
    scalable = [i for i in budget.items.values() if i.scalable]
    instead = [i for i in budget.items.values() if i.dense_instead]
    fixed_items = sum(i.floor for i in budget.items.values() if not i.scalable and not i.dense_instead)
    parts = [f"{len(scalable)} tensor(s) at their smallest records take {sum(i.floor for i in scalable)} bytes"]
    if instead:
        parts.append(f"{len(instead)} tensor(s) smaller stored dense take {sum(i.floor for i in instead)}")
    parts.append(f"tensors stored dense or exactly (norms, biases, added) take {fixed_items}")
    parts.append(f"the repo's index and config about {budget.fixed}, for {budget.total_dense} dense bytes")
    return ", ".join(parts)
