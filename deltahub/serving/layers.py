"""Module wrappers that add deltas to a base module's output, and the routing of rows to deltas.

A wrapper keeps the base module (``base_layer``, shared by every delta, never modified) and,
per delta name, the operators of that module's parameters. The forward pass computes
``base(x) + Δ(x)`` with the active delta, or, in a mixed batch, groups the rows by delta name,
computes each group's ``Δ(x[rows])`` and scatter-adds it into the base output, as multi-LoRA
servers do.

- :class:`DeltaLinear` (``nn.Linear``): ``x Δᵀ`` from the components.
- :class:`DeltaConv1D` (GPT-2's ``Conv1D``, weight stored ``[in, out]``): ``x Δ``.
- :class:`DeltaEmbedding` (``nn.Embedding``): ``Δ[ids]``, only the rows looked up.
- :class:`DeltaParams`: any other module whose parameters change (norms, MoE routers, fused
  experts): the module runs with ``base + Δ`` in place of its parameters
  (``torch.func.functional_call``; the shared base parameter is never written).
"""

from __future__ import annotations

import contextlib
from abc import ABCMeta, abstractmethod
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ServingError
from .operators import TensorDelta, ValueDelta, compute_dtype


class Routing:
    """Which delta a forward pass uses: ``active`` for the whole batch, or ``row_names`` (one
    name or ``None`` per row of the batch) for a mixed batch. One object is shared by every
    wrapper of a model."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.row_names: list[str | None] | None = None
        self.batch: int | None = None  # leading size of the current top-level forward's input
        self._groups: dict[tuple[torch.device, int], list[tuple[str, torch.Tensor]]] = {}

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the wrapped model: remember the batch size of this forward."""
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """In a mixed batch, a tensor shared by all rows (leading size 1, e.g. GPT-2's position
        ids) is expanded to the batch, so each row can get its own delta."""
        if self.row_names is not None and x.dim() and x.shape[0] == 1 and (self.batch or 1) > 1:
            return x.expand(self.batch, *x.shape[1:])
        return x

    def set_rows(self, names: list[str | None] | None) -> None:
        self.row_names = list(names) if names is not None else None
        self._groups = {}

    @contextlib.contextmanager
    def whole_batch(self, name: str) -> Iterator[None]:
        """Inside, every wrapper applies delta ``name`` to all the rows it sees: a generic module
        that runs one group of a mixed batch through its forward must not have its submodules
        route those rows by batch position again."""
        saved = self.active, self.row_names
        self.active, self.row_names = name, None
        try:
            yield
        finally:
            self.active, self.row_names = saved

    def plan(self, n: int, device: torch.device, where: str) -> list[tuple[str, torch.Tensor | None]]:
        """``[(delta name, row indices or None for all rows)]`` for a tensor of ``n`` leading rows.

        In a mixed batch of ``B`` rows a module may see ``n = k·B`` rows: tokens flattened
        batch-first, or inputs expanded by ``generate`` (``num_beams``,
        ``num_return_sequences``); row ``i`` then belongs to batch row ``i // k``.
        """
        names = self.row_names
        if names is None:
            return [] if self.active is None else [(self.active, None)]
        b = len(names)
        if n % b:
            raise ServingError(
                f"a mixed-delta batch has {b} rows (one delta name each), but {where} got a tensor with {n} leading rows; "
                "mixed batches need batch-first inputs: run one delta per batch with set_delta(name) instead"
            )
        k = n // b
        key = (torch.device(device), k)
        groups = self._groups.get(key)
        if groups is None:
            groups = []
            for name in dict.fromkeys(nm for nm in names if nm is not None):
                rows = torch.tensor([i for i, nm in enumerate(names) if nm == name], dtype=torch.int64)
                if k > 1:
                    rows = (rows[:, None] * k + torch.arange(k)).reshape(-1)
                groups.append((name, rows.to(device)))
            self._groups[key] = groups
        return groups  # type: ignore[return-value]


class _Named(nn.Module):
    """name -> module, registered (so ``.to(device)`` moves them) under names that
    ``nn.ModuleDict`` would refuse because they shadow its methods (``values``, ``keys``...)."""

    def __getitem__(self, key: str) -> nn.Module:
        return self._modules[key]  # type: ignore[return-value]

    def __setitem__(self, key: str, value: nn.Module) -> None:
        self._modules[key] = value

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def get(self, key: str) -> nn.Module | None:
        return self._modules.get(key)

    def keys(self) -> list[str]:
        return list(self._modules)


class DeltaLayer(nn.Module):
    """Base of the wrappers: ``base_layer`` and ``deltas[name][param_name]`` operators."""

    def __init__(self, base_layer: nn.Module, routing: Routing, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = _Named()
        self._routing = routing
        self._path = path

    def add(self, name: str, param: str, op: TensorDelta | ValueDelta) -> None:
        if name not in self.deltas:
            self.deltas[name] = _Named()
        self.deltas[name][param] = op  # type: ignore[index]

    def remove(self, name: str) -> None:
        if name in self.deltas:
            del self.deltas[name]

    def _plan(self, n: int, device: torch.device) -> list[tuple[str, Any, torch.Tensor | None]]:
        """``[(delta name, its operators here, row indices or None for all rows)]``."""
        if not len(self.deltas):
            return []
        out = []
        for name, rows in self._routing.plan(n, device, self._path or type(self.base_layer).__name__):
            ops = self.deltas.get(name)
            if ops is not None:
                out.append((name, ops, rows))
        return out

    def extra_repr(self) -> str:
        return f"deltas={self.deltas.keys()}"


def _bias_delta(ops: _Named, base: nn.Module) -> torch.Tensor | None:
    b = ops.get("bias")
    return None if b is None else b.delta(base.bias)  # type: ignore[union-attr]


class _MatrixLayer(DeltaLayer, metaclass=ABCMeta):
    """Shared forward of Linear and Conv1D: ``base(x) + Δ(x)``, or the fine-tuned weight itself
    when the delta keeps it whole (lossless)."""

    @abstractmethod
    def _weight_delta(self, w: TensorDelta, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d`` [N, in] times the weight's delta, oriented as the module applies its weight."""

    @abstractmethod
    def _replaced(self, x: torch.Tensor, ops: _Named) -> torch.Tensor:
        """The module's output computed with the fine-tuned weight itself (a lossless delta)."""

    def _delta(self, x: torch.Tensor, ops: _Named) -> torch.Tensor:
        """The delta's contribution to the output, in the compute dtype: weight part plus bias part."""
        dt = compute_dtype(x)
        w = ops.get("weight")
        lead = x.shape[:-1]
        d = self._weight_delta(w, x.reshape(-1, x.shape[-1]).to(dt)) if w is not None else None  # type: ignore[arg-type]
        db = _bias_delta(ops, self.base_layer)
        if db is not None:
            db = db.to(dt)
            d = db.expand(x[..., :1].numel(), db.shape[0]) if d is None else d + db
        return d.reshape(*lead, d.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._routing.broadcast(x)
        plan = self._plan(x.shape[0], x.device)
        if not plan:
            return self.base_layer(x)
        if plan[0][2] is None:  # one delta for the whole batch
            ops = plan[0][1]
            if isinstance(ops.get("weight"), ValueDelta):
                return self._replaced(x, ops)
            out = self.base_layer(x)
            return out + self._delta(x, ops).to(out.dtype)
        out = self.base_layer(x)
        for _, ops, rows in plan:
            xs = x.index_select(0, rows)
            if isinstance(ops.get("weight"), ValueDelta):
                out.index_copy_(0, rows, self._replaced(xs, ops).to(out.dtype))
            else:
                out.index_add_(0, rows, self._delta(xs, ops).to(out.dtype))
        return out

    def _bias(self, ops: _Named) -> torch.Tensor | None:
        b = ops.get("bias")
        return b.full(self.base_layer.bias) if b is not None else self.base_layer.bias  # type: ignore[union-attr]


class DeltaLinear(_MatrixLayer):
    """``nn.Linear`` + deltas: ``x Wᵀ + b + x Δᵀ + Δb``."""

    def _weight_delta(self, w: TensorDelta, x2d: torch.Tensor) -> torch.Tensor:
        return w.mm_t(x2d)

    def _replaced(self, x: torch.Tensor, ops: _Named) -> torch.Tensor:
        return F.linear(x, ops["weight"].full(self.base_layer.weight), self._bias(ops))  # type: ignore[operator]


class DeltaConv1D(_MatrixLayer):
    """GPT-2's ``Conv1D`` (``x W + b``, weight ``[in, out]``) + deltas: ``x Δ + Δb``."""

    def _weight_delta(self, w: TensorDelta, x2d: torch.Tensor) -> torch.Tensor:
        return w.mm(x2d)

    def _replaced(self, x: torch.Tensor, ops: _Named) -> torch.Tensor:
        # Conv1D.forward's own arithmetic, so the layer matches the merged model exactly.
        w = ops["weight"].full(self.base_layer.weight)  # type: ignore[operator]
        size_out = x.size()[:-1] + (w.shape[1],)
        return torch.addmm(self._bias(ops), x.reshape(-1, x.size(-1)), w).view(size_out)


class DeltaEmbedding(DeltaLayer):
    """``nn.Embedding`` + deltas: ``W[ids] + Δ[ids]``, decoding only the rows looked up."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._routing.broadcast(ids)
        plan = self._plan(ids.shape[0], ids.device)
        if not plan:
            return self.base_layer(ids)
        out = self.base_layer(ids) if plan[0][2] is not None or not isinstance(plan[0][1].get("weight"), ValueDelta) else None
        for _, ops, rows in plan:
            sub = ids if rows is None else ids.index_select(0, rows)
            w = ops["weight"]
            if isinstance(w, ValueDelta):
                e = self.base_layer
                y = F.embedding(sub, w.full(e.weight), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
                if rows is None:
                    return y
                out.index_copy_(0, rows, y.to(out.dtype))  # type: ignore[union-attr]
                continue
            d = w.rows(sub.reshape(-1), compute_dtype(out)).reshape(*sub.shape, -1).to(out.dtype)  # type: ignore[union-attr, arg-type]
            if rows is None:
                return out + d  # type: ignore[operator]
            out.index_add_(0, rows, d)  # type: ignore[union-attr]
        return out  # type: ignore[return-value]


class DeltaParams(DeltaLayer):
    """Any module whose own parameters change: it runs with the fine-tuned parameters
    (``base + Δ``, decoded per forward for compressed tensors; kept whole for small ones)
    through ``torch.func.functional_call``, which leaves the shared base untouched."""

    def _params(self, ops: _Named) -> dict[str, torch.Tensor]:
        return {p: ops[p].full(getattr(self.base_layer, p)) for p in ops.keys()}  # type: ignore[operator]

    def _call(self, ops: _Named, args: tuple, kwargs: dict) -> Any:
        return torch.func.functional_call(self.base_layer, self._params(ops), args, kwargs, tie_weights=False, strict=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in _tensors(args, kwargs)), None)
        if first is None or first.dim() == 0:
            active = self._routing.active
            ops = self.deltas.get(active) if active is not None and self._routing.row_names is None else None
            plan = [] if ops is None else [(active, ops, None)]
        else:
            plan = self._plan(first.shape[0], first.device)
        if not plan:
            return self.base_layer(*args, **kwargs)
        if plan[0][2] is None:
            return self._call(plan[0][1], args, kwargs)
        n = first.shape[0]  # type: ignore[union-attr]
        out = self.base_layer(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not all(isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == n for o in outs):
            raise ServingError(
                f"{self._path}: a mixed-delta batch needs modules whose output rows match their input rows; "
                f"{type(self.base_layer).__name__} does not: run one delta per batch with set_delta(name) instead"
            )
        for name, ops, rows in plan:
            sub_args = tuple(_take(a, rows, n) for a in args)
            sub_kwargs = {k: _take(v, rows, n) for k, v in kwargs.items()}
            with self._routing.whole_batch(name):  # wrapped submodules see only this group's rows
                got = self._call(ops, sub_args, sub_kwargs)
            for o, g in zip(outs, list(got) if isinstance(got, (tuple, list)) else [got]):
                o.index_copy_(0, rows, g.to(o.dtype))
        return out


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a


def _take(a: Any, rows: torch.Tensor, n: int) -> Any:
    if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n:
        return a.index_select(0, rows)
    return a
