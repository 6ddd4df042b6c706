"""Whole-model budgets for planning methods (``auto``): one statistics pass over the checkpoints,
then a ratio per tensor, so that the model as a whole meets ``--ratio`` honestly.

The pass reads every planned tensor pair once more (one tensor at a time, as compressing does)
and hands the method what it asks for (:meth:`Planner.statistics`); the method spreads the
budget (:meth:`Planner.plan`). What the other tensors will cost (1-D tensors stored dense, rules
with other methods) is taken off the budget first, with the index and config overheads.
"""

from __future__ import annotations

import math

import torch
from .progress import progress as progress_bar

from .budget import samples_line
from .calibration import Calibration
from .checkpoint import Checkpoint
from .encoding import same_bits, rms
from .format.dtypes import itemsize, to_torch
from .methods import METHODS, PlanEntry, Planned
from .methods.base import PER_KEY, Planner
from .policy import Policy

# Upper bounds of what one tensor adds outside its own record: its base sample digest in the
# config, and an index entry per stored key (PER_KEY). Plus the config's fixed part.
_PER_TENSOR_OVERHEAD = 160
_FIXED_OVERHEAD = 4 << 10
# A dense record (data aside) or an unchanged one: its JSON line and header entry.
_RECORD_OVERHEAD = 512


def plan_ratios(
    method: Planner, policy: Policy, base: Checkpoint, finetuned: Checkpoint, progress: bool = False, calibration: Calibration | None = None,
    executor: "Executor | None" = None, fixed: int | None = None,
) -> dict[str, Planned]:
    """Per-tensor ratios (and choices) for the tensors that ``policy`` gives to ``method`` (a planning method).
    ``executor`` (:mod:`deltahub.distributed`) computes the statistics where it runs them; by default here.
    ``fixed``: the repo's bytes outside the tensors' records (config, index, shard headers), as the
    whole-model budget counts them (:attr:`deltahub.budget.ModelBudget.fixed`)."""
    ratio = policy.ratio
    if ratio is None:
        raise ValueError(f"{method.name} spreads a whole-model budget: give it a ratio")
    names = finetuned.names()
    total_dense = 0
    # One shard per transformer block, each with its header and index line: on a 30-layer model
    # that is 6 KB, which a fixed 4 KB estimate left out (1/32 on SmolLM2 missed by 405 bytes).
    other = max(_FIXED_OVERHEAD, fixed or 0)
    planned_names: list[str] = []
    for name in names:
        info = finetuned.info(name)
        shape, dtype = tuple(info.shape), to_torch(info.dtype)
        dense = itemsize(info.dtype) * math.prod(shape)
        if not dtype.is_floating_point:
            other += _RECORD_OVERHEAD + _PER_TENSOR_OVERHEAD
            continue
        total_dense += dense
        m, params, r = policy.resolve(name, shape)
        if m != policy.method or params != policy.params or r != ratio or name not in base:
            if r is not None and METHODS[m].takes_ratio:
                other += math.floor(r * dense) + _PER_TENSOR_OVERHEAD + PER_KEY * 4
            else:  # dense or lossless: at most the tensor itself
                other += dense + _RECORD_OVERHEAD + _PER_TENSOR_OVERHEAD + PER_KEY
            continue
        planned_names.append(name)
    planned_bytes = sum(itemsize(finetuned.info(n).dtype) * math.prod(finetuned.info(n).shape) for n in planned_names)
    bar = progress_bar(total=planned_bytes, unit="B", unit_scale=True, desc="Planning", enabled=progress)
    hessians = {n: calibration.hessian(n) if calibration is not None else None for n in planned_names}
    found = (executor or LOCAL).statistics(method, base, finetuned, planned_names, hessians)
    entries: list[PlanEntry] = []
    for name, entry in zip(planned_names, found):
        info = finetuned.info(name)
        bar.update(itemsize(info.dtype) * math.prod(info.shape))
        if entry is None:  # unchanged
            other += _RECORD_OVERHEAD + _PER_TENSOR_OVERHEAD
            continue
        entries.append(entry)
        # Its base sample and decoded-tensor digests (the method counts its own index entries: it knows its keys).
        other += max(_PER_TENSOR_OVERHEAD, samples_line(name))
        shape, n = tuple(info.shape), entry.shape[0] if entry.shape else 1
        if len(shape) and shape[0] > n:  # grown vocabulary: the new rows are stored dense
            other += itemsize(info.dtype) * (shape[0] - n) * math.prod(shape[1:]) + _RECORD_OVERHEAD
    bar.close()
    budget = math.floor(ratio * total_dense) - other
    return method.plan(entries, max(budget, 0))


def tensor_statistics(method: Planner, base: Checkpoint, finetuned: Checkpoint, name: str, hessian: torch.Tensor | None) -> PlanEntry | None:
    """What ``method`` needs to plan tensor ``name`` (its :class:`PlanEntry`), or ``None`` when the
    fine-tune's tensor is the base's, bit for bit. Reads the two tensors (views of the files' pages)."""
    info = finetuned.info(name)
    shape, dtype = tuple(info.shape), to_torch(info.dtype)
    with base.borrow(name) as b, finetuned.borrow(name) as ft:
        if b.shape == ft.shape and b.dtype == ft.dtype and same_bits(b, ft):
            return None
        n = min(b.shape[0], ft.shape[0]) if ft.dim() else 1
        delta = (ft[:n].to(torch.float32) - b[:n].to(torch.float32)) if ft.dim() else (ft.float() - b.float()).reshape(1)
        blocks = shape[0] if len(shape) == 3 else 1
        view = delta.reshape(-1, delta.shape[-1]) if delta.dim() else delta.reshape(1, 1)
        # The ratio applies to the overlap with the base (a grown vocabulary's new rows are extra).
        return PlanEntry(name, (n, *shape[1:]) if shape else shape, dtype, method.statistics(view, rms(b[:n]), _hessian_for(hessian, view)), blocks)


class Executor:
    """Where the per-tensor work of ``compress`` runs: here, one tensor after another (this
    class), or on a Ray cluster (:class:`deltahub.distributed.RayExecutor`)."""

    def statistics(self, method: Planner, base: Checkpoint, finetuned: Checkpoint, names: list[str], hessians: dict) -> list[PlanEntry | None]:
        return [tensor_statistics(method, base, finetuned, name, hessians.get(name)) for name in names]

    def close(self) -> None:
        """Give back what the executor holds (a Ray cluster it started)."""


LOCAL = Executor()


def _hessian_for(h: torch.Tensor | None, delta2d: torch.Tensor) -> torch.Tensor | None:
    """The layer's input second moment when it applies to this tensor as stored (a linear weight)."""
    return h if h is not None and h.shape[0] == delta2d.shape[-1] else None
