"""One base model serving many compressed deltas, unmerged: load, switch, disable, delete,
mixed-delta batches, merge. The API follows PEFT's ``PeftModel``.

``DeltaModel`` (``deltahub.DeltaModel``) is this class plus ``from_pretrained``. Example::

    from deltahub import DeltaModel
    model = DeltaModel.from_base(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"))
    model.load_delta("user/smollm2-math", name="math")
    model.load_delta("user/smollm2-code", name="code")
    model.set_delta("code"); model.generate(...)            # base + code delta
    with model.disable_delta(): model.generate(...)         # the plain base
    model(input_ids, delta_names=["math", "code", None])    # one delta per row, one forward
    model.delete_delta("math")
    model.save_pretrained("code-delta")                     # the active delta as a delta repo
    model.push_to_hub("user/smollm2-code")                  # ... pushed as a new version (v1, v2, ...)
    merged = model.merge_and_unload()                       # a plain transformers model

PEFT's method names work where they mean the same thing (:data:`PEFT_ALIASES`: ``load_adapter``,
``set_adapter``, ``delete_adapter``, ``disable_adapter``, ``active_adapter``,
``active_adapters``); the rest of the adapter API (``add_adapter``, ``add_weighted_adapter``,
``merge_adapter``, ...) raises :class:`UnsupportedMethodError` naming what to use instead
(:data:`REFUSED`), and is never handed to the wrapped model, whose own adapter and saving
methods would act on the wrapper modules.

Memory: the base once, plus each delta's operators (:meth:`MultiDeltaModel.delta_nbytes`),
which are its stored (compressed) tensors except where ``serving.operators`` says otherwise.
The routing state (active delta, rows of a mixed batch) belongs to the model: one forward pass
at a time per model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..card import human_bytes
from ..errors import FormatError, InvalidTensorError
from ..format import DeltaReader
from ..format.config import CONFIG_NAME, FINETUNED_CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, SHARD_NAME, is_repo_file
from ..format.limits import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, MAX_REPO_FILE_BYTES, MAX_SMALL_JSON_BYTES, loads_json
from ..format.repo import atomic_dir
from ..sources import HubOptions, all_finite, check_finite, check_layer_counts, count_blocks, open_delta, open_pair, repo_file
from .base_check import check_model_base
from .errors import ServingError, UnknownDeltaError, refuse_chain
from .layers import DeltaConv1D, DeltaEmbedding, DeltaLayer, DeltaLinear, DeltaParams, Routing
from .operators import TensorDelta, ValueDelta, build_operator


@dataclass
class LoadedDelta:
    """A delta loaded into a :class:`MultiDeltaModel`: where it came from and its operators."""

    name: str
    source: str
    method: str | None
    stored_bytes: int | None
    ops: dict[str, TensorDelta | ValueDelta] = field(default_factory=dict, repr=False)
    reader: DeltaReader | None = field(default=None, repr=False, compare=False)  # its repo files, for save_pretrained

    def __repr__(self) -> str:
        """One line, whatever the delta's size (the operators are in ``ops``)."""
        return f"LoadedDelta(name={self.name!r}, method={self.method!r}, tensors={len(self.ops)}, nbytes={self.nbytes}, source={_short(self.source)!r})"

    @property
    def nbytes(self) -> int:
        """Bytes of the operators' tensors in memory (each storage counted once)."""
        seen: set[int] = set()
        total = 0
        for op in self.ops.values():
            for b in op.buffers():
                s = b.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        return total


class UnsupportedMethodError(ServingError, AttributeError):
    """A PEFT or transformers adapter method that deltahub does not offer; the message names
    what to use instead. An ``AttributeError`` too, so ``hasattr(model, name)`` is False."""


# PEFT's names that work on a DeltaModel, and the deltahub method each one is.
PEFT_ALIASES = {
    "load_adapter": "load_delta", "set_adapter": "set_delta", "delete_adapter": "delete_delta",
    "disable_adapter": "disable_delta", "active_adapter": "active_delta", "active_adapters": "[active_delta]",
}
_INSTEAD_OF_ENABLE = "run set_delta(name) to use a delta again, or disable it for a block only: `with model.disable_delta(): ...`"
_CHANGES_MODULES = "it would replace modules that carry deltas; call it on the plain model before DeltaModel.from_base(model), or on merge_and_unload()"
# Methods of PEFT's PeftModel and transformers' PeftAdapterMixin that are not handed to the
# wrapped model (they would act on the wrapper modules or save base_layer weights), with what to use.
REFUSED = {
    "add_adapter": "deltahub serves deltas compressed from fine-tuned models, it does not create trainable adapters; make one with "
    "deltahub.compress(base, finetuned_model, out) and load it with load_delta(out, name)",
    "add_weighted_adapter": "deltas are not combined into a new one; serve several side by side with delta_names=[...] in forward/generate "
    "(one delta per row), or merge the fine-tunes with a merging tool and compress the result",
    "merge_adapter": "a delta is folded in for good with merge_and_unload(); to switch, keep it unmerged and use set_delta/disable_delta",
    "unmerge_adapter": "deltas stay unmerged until merge_and_unload(), which cannot be undone; use disable_delta() to run the plain base",
    "enable_adapters": _INSTEAD_OF_ENABLE,
    "enable_adapter_layers": _INSTEAD_OF_ENABLE,
    "disable_adapters": "use disable_delta() (as a context manager for a block: `with model.disable_delta(): ...`)",
    "disable_adapter_layers": "use disable_delta() (as a context manager for a block: `with model.disable_delta(): ...`)",
    "get_adapter_state_dict": "a delta is stored compressed, not as adapter weights; save_pretrained(dir, delta_name=NAME) writes its delta repo, "
    "and deltahub.serving.export_lora(delta, out) makes a PEFT LoRA adapter of it",
    "peft_config": "deltahub deltas have no PEFT config; loaded_deltas lists them with their method and size",
    "set_requires_grad": "deltas are served frozen; to train further, merge_and_unload() and fine-tune the merged model",
    "enable_peft_hotswap": "deltas are swapped with set_delta(name) already, with no recompilation",
    "resize_token_embeddings": _CHANGES_MODULES,
    "set_input_embeddings": _CHANGES_MODULES,
    "set_output_embeddings": _CHANGES_MODULES,
}
_REPR_DELTAS = 8  # deltas named in a DeltaModel's repr; the rest are counted


class _Names(list):
    """A list that is also callable, returning itself: PEFT reads ``model.active_adapters``,
    transformers calls ``model.active_adapters()``."""

    def __call__(self) -> list[str]:
        return list(self)


def _short(text: str, limit: int = 60) -> str:
    """``text``, or its last ``limit`` characters after an ellipsis (a path's informative end)."""
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _describe(d: LoadedDelta) -> str:
    return f"{d.method or 'unknown method'}, {len(d.ops)} tensors, {human_bytes(d.nbytes)}"


def _refuse_peft_folder(delta: str | os.PathLike) -> None:
    """A local PEFT adapter folder given as a delta: say what it is rather than 'no delta_config.json'."""
    folder = Path(delta).expanduser()
    try:
        is_adapter = (folder / "adapter_config.json").is_file() and not (folder / CONFIG_NAME).exists()
    except OSError:
        return
    if is_adapter:
        raise ServingError(
            f"{delta} is a PEFT adapter (adapter_config.json), not a deltahub delta; load it with "
            "peft.PeftModel.from_pretrained(model, path) on a model without deltas, or merge it into its base and compress "
            "the result with deltahub.compress(base, merged, out) to serve it here"
        )


# ---------------------------------------------------------------------------- saving a delta

# The files whose content must equal what was loaded, and the bound of each file read.
_LOADED = {CONFIG_NAME: MAX_CONFIG_BYTES, INDEX_NAME: MAX_INDEX_BYTES}
_BOUNDS = {**_LOADED, FINETUNED_CONFIG_NAME: MAX_SMALL_JSON_BYTES, GENERATION_CONFIG_NAME: MAX_SMALL_JSON_BYTES}


def copy_delta_repo(loaded: LoadedDelta, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy the repo files of a loaded delta to ``out`` (see ``MultiDeltaModel.save_pretrained``):
    the files a delta repo consists of (``is_repo_file``; shards only those the loaded index
    names), each confined to the source folder, JSON files bounded and equal to what was
    loaded, shards hashed against the loaded index. Written through ``atomic_dir``: nothing at
    ``out`` unless every file was copied and checked."""
    reader = loaded.reader
    src = Path(reader.path)
    where = f"delta {loaded.name!r} ({_short(loaded.source, 120)})"
    if not src.is_dir():
        raise FormatError(f"{where}: its folder {src} is gone, so there are no files to save; load the delta again")
    shards = set(reader.weight_map.values())
    names = sorted(e.name for e in os.scandir(src) if is_repo_file(e.name) and (not SHARD_NAME.match(e.name) or e.name in shards))
    missing = sorted(shards - set(names))
    if missing:
        raise FormatError(f"{where}: shard {missing[0]} named in {INDEX_NAME} is missing from {src}; load the delta again")
    checksums = reader.checksums()
    with atomic_dir(out, overwrite, inputs=(src,)) as tmp:
        for name in names:
            path = repo_file(src, name, f"{where}: {name}")  # regular files only: a FIFO would block the copy
            if name in _LOADED:
                _copy_as_loaded(path, tmp / name, name, reader, f"{where}: {name}")
            else:
                bound = None if SHARD_NAME.match(name) else _BOUNDS.get(name, MAX_REPO_FILE_BYTES)
                _copy_checked(path, tmp / name, bound, checksums.get(name), f"{where}: {name}")
    return Path(out)


def _copy_checked(path: Path, dest: Path, bound: int | None, sha256: str | None, where: str) -> None:
    """Copy a file in chunks: at most ``bound`` bytes (a shard's bound is its hash), and a shard
    that no longer has the SHA-256 of the index loaded is refused."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(1 << 22):
            size += len(chunk)
            if bound is not None and size > bound:
                raise FormatError(f"{where} holds more than the {bound} bytes deltahub copies; the delta is corrupted or hostile")
            digest.update(chunk)
            fout.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise FormatError(f"{where} changed since the delta was loaded (its SHA-256 is not the one {INDEX_NAME} records); load the delta again and save it then")


def _copy_as_loaded(path: Path, dest: Path, name: str, reader: DeltaReader, where: str) -> None:
    """Copy the config or the index, read within its bound, after checking that it equals what
    was loaded (the records this model serves)."""
    bound = _LOADED[name]
    with open(path, "rb") as f:
        data = f.read(bound + 1)
    if loads_json(data, where, max_bytes=bound) != (reader.config if name == CONFIG_NAME else reader.index):
        raise FormatError(f"{where} changed since the delta was loaded, so it no longer describes the records this model serves; load the delta again and save it then")
    dest.write_bytes(data)


def _fast_wrapper(module: nn.Module) -> type[DeltaLayer] | None:
    """The operator wrapper for modules whose forward is the stock one; ``None`` for the rest."""
    if type(module).forward is nn.Linear.forward:
        return DeltaLinear
    if type(module).forward is nn.Embedding.forward and getattr(module, "max_norm", None) is None:
        return DeltaEmbedding
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if type(module).forward is Conv1D.forward:
        return DeltaConv1D
    return None


def _wrapper_class(module: nn.Module, param: str) -> type[DeltaLayer]:
    """The wrapper that applies a delta of ``module.<param>``: an operator wrapper for the stock
    layers' weight and bias, :class:`DeltaParams` for everything else."""
    fast = _fast_wrapper(module) if param in ("weight", "bias") else None
    return fast or DeltaParams


def _users(holders: list[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str]]:
    """The holders of one parameter that compute with it: all but those that contain another
    holder (a module holding its submodule's parameter leaves the use to the submodule)."""
    return [(m, p) for m, p in holders if not any(o is not m and any(s is o for s in m.modules()) for o, _ in holders)]


class _Restore:
    """Returned by :meth:`MultiDeltaModel.disable_delta`: usable as a context manager that
    re-activates the previous delta on exit."""

    def __init__(self, routing: Routing, previous: str | None) -> None:
        self._routing, self._previous = routing, previous

    def __enter__(self) -> "_Restore":
        return self

    def __exit__(self, *exc: object) -> None:
        self._routing.active = self._previous


class MultiDeltaModel(nn.Module):
    """A transformers model (``base_model``) with any number of deltas served unmerged.

    ``forward``, ``generate`` and every other attribute delegate to the base model, as
    ``PeftModel`` does. Modules whose weights a delta changes are replaced by wrappers
    (``serving.layers``) that keep the base module and one operator per delta.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if any(isinstance(m, DeltaLayer) for m in model.modules()):
            raise ServingError("this model already carries delta wrappers; pass the plain transformers model (DeltaModel.base_model)")
        self.base_model = model
        self._routing = Routing()
        self._deltas: dict[str, LoadedDelta] = {}
        # Parameter names are transformers' checkpoint keys for the architectures deltahub
        # tests; each name maps to (module, attribute), tied weights under every name.
        self._params: dict[str, tuple[nn.Module, str]] = {}
        self._parents: dict[int, list[tuple[nn.Module, str, str]]] = defaultdict(list)
        for mname, m in model.named_modules(remove_duplicate=False):
            for pname, p in m._parameters.items():
                if p is not None:
                    self._params[f"{mname}.{pname}" if mname else pname] = (m, pname)
            for cname, child in m._modules.items():
                if child is not None:
                    self._parents[id(child)].append((m, cname, f"{mname}.{cname}" if mname else cname))
        self._wrappers: dict[int, DeltaLayer] = {}
        self._hook = model.register_forward_pre_hook(self._routing.capture, with_kwargs=True)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, model: nn.Module) -> "MultiDeltaModel":
        """Wrap an ordinary transformers model to serve deltas on it (nothing changes until
        :meth:`load_delta`).

        Example::

            model = DeltaModel.from_base(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"))
            model.load_delta("user/smollm2-math", name="math")
        """
        return cls(model)

    def __getattr__(self, name: str) -> Any:
        """Everything else of the wrapped model (``config``, ``device``, ``can_generate``, ...),
        except the methods in :data:`REFUSED`, which would misbehave on the wrapper modules."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_routing", "_deltas", "_params"):
                raise
            if name in REFUSED:
                raise UnsupportedMethodError(f"{type(self).__name__}.{name} is not supported: {REFUSED[name]}") from None
            return getattr(self.base_model, name)

    def __repr__(self) -> str:
        """One line: the base's class, the loaded deltas, the active one (``print(model.base_model)``
        shows the module tree)."""
        names = list(self._deltas)
        shown = ", ".join(f"{n!r}: {_describe(self._deltas[n])}" for n in names[:_REPR_DELTAS])
        more = f", ... {len(names) - _REPR_DELTAS} more" if len(names) > _REPR_DELTAS else ""
        return f"{type(self).__name__}(base={type(self.base_model).__name__}, deltas={{{shown}{more}}}, active={self.active_delta!r})"

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (its delta-carrying modules are wrappers)."""
        return self.base_model

    # ------------------------------------------------------------------ loading

    def load_delta(
        self,
        delta: str | os.PathLike | DeltaReader,
        name: str = "default",
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        verify_base: bool = True,
    ) -> LoadedDelta:
        """Load a delta (local folder, Hub repo id, or an open ``DeltaReader``) under ``name``.

        The first delta loaded becomes the active one. The wrapped model's weights are checked
        against the base the delta records (names, shapes, sampled rows) and a delta for another
        base is refused with :class:`~deltahub.BaseMismatchError` unless ``verify_base=False``.
        Tensors the model has no parameter for (checkpoint keys that transformers renames, such
        as per-expert MoE weights fused on load), added tensors and resized ones are refused with
        :class:`~deltahub.serving.ServingError`: load such deltas merged.

        Example::

            model.load_delta("user/smollm2-math", name="math")
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ServingError(f"delta name {name!r} must be a non-empty string without '.'")
        if name in self._deltas:
            raise ServingError(f"a delta named {name!r} is loaded already; delete_delta({name!r}) first or choose another name")
        if isinstance(delta, DeltaReader):
            reader = delta
        else:
            _refuse_peft_folder(delta)
            reader = open_delta(delta, revision, HubOptions(token, cache_dir, local_files_only))
        source = str(getattr(reader, "source", reader.path))
        refuse_chain(reader, "served unmerged")
        changed = {n: r for n, r in reader.records.items() if r["kind"] not in ("unchanged", "removed")}
        added = [n for n, r in changed.items() if r["kind"] == "added"]
        if added:
            raise ServingError(
                f"{source}: the delta adds tensor(s) {', '.join(repr(n) for n in added[:3])}, which the base lacks; unmerged serving only "
                "changes existing weights: load this delta merged with DeltaModel.from_pretrained(delta)"
            )
        missing = [n for n in changed if n not in self._params]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ServingError(
                f"{source}: tensor(s) {', '.join(repr(n) for n in missing[:3])}{more} are not parameters of the wrapped "
                f"{type(self.base_model).__name__} (transformers renames or fuses some checkpoint keys on load, e.g. per-expert "
                "MoE weights); unmerged serving cannot place them: load this delta merged with DeltaModel.from_pretrained(delta)"
            )
        by_param: dict[int, list[str]] = defaultdict(list)
        for n in changed:
            by_param[id(self._param(n))].append(n)
        for names in by_param.values():
            if len(names) > 1:
                raise ServingError(f"{source}: {names} are one tied parameter in the wrapped model but separate records in the delta; load this delta merged with DeltaModel.from_pretrained(delta)")
        if verify_base:
            check_model_base(reader, lambda n: self._param(n) if n in self._params else None, f"the wrapped {type(self.base_model).__name__}")
        loaded = LoadedDelta(name, source, (reader.config.get("method") or {}).get("name"), (reader.config.get("totals") or {}).get("stored_bytes"), reader=reader)
        holders = self._holders()
        placements: list[tuple[nn.Module, type[DeltaLayer], str, Any]] = []
        for n, record in changed.items():
            param = self._param(n)
            if param.device.type == "meta":
                raise ServingError(f"{n} is not in memory (offloaded to disk or meta); unmerged serving needs the base weights in memory: load without offload, or merged")
            # A tied parameter gets the delta in every module that computes with it (embedding
            # lookup and LM head, each with its own wrapper), and in no module that merely holds
            # it for a submodule (BERT's prediction head holds its decoder's bias), so that no
            # computation sees the delta twice.
            targets = [(m, _wrapper_class(m, p), p) for m, p in _users(holders[id(param)])]
            matrix = any(cls is not DeltaParams and p == "weight" for _, cls, p in targets)
            op = build_operator(n, record, _finite_get(reader, n, source), param, matrix=matrix)
            if isinstance(op, ValueDelta):
                check_finite(n, op.value, param.detach().cpu(), source)
            op = op.to(param.device)
            loaded.ops[n] = op
            for m, cls, p in targets:
                if m is self.base_model:
                    raise ServingError(f"{n} is a parameter of the top-level model itself; unmerged serving wraps submodules only: load this delta merged")
                placements.append((m, cls, p, op))
        for m, cls, p, op in placements:
            self._wrap(m, cls).add(name, p, op)
        self._deltas[name] = loaded
        if len(self._deltas) == 1:
            self._routing.active = name
        return loaded

    def _param(self, name: str) -> torch.Tensor:
        m, p = self._params[name]
        return getattr(m, p)

    def _holders(self) -> dict[int, list[tuple[nn.Module, str]]]:
        """id(parameter) -> every (module, attribute) holding it, looked up now: ``to()`` and
        ``tie_weights()`` may have replaced parameter objects since the model was wrapped."""
        out: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
        for m, p in self._params.values():
            if (m, p) not in out[id(getattr(m, p))]:
                out[id(getattr(m, p))].append((m, p))
        return out

    def _wrap(self, module: nn.Module, cls: type[DeltaLayer]) -> DeltaLayer:
        w = self._wrappers.get(id(module))
        if w is None:
            parents = self._parents[id(module)]
            w = cls(module, self._routing, parents[0][2] if parents else "")
            for parent, cname, _ in parents:
                parent._modules[cname] = w
            self._wrappers[id(module)] = w
        return w

    def _unwrap(self, w: DeltaLayer) -> None:
        for parent, cname, _ in self._parents[id(w.base_layer)]:
            parent._modules[cname] = w.base_layer
        del self._wrappers[id(w.base_layer)]

    # ------------------------------------------------------------------ switching

    @property
    def active_delta(self) -> str | None:
        """The delta the next forward pass uses (``None``: the plain base)."""
        return self._routing.active

    @property
    def loaded_deltas(self) -> dict[str, LoadedDelta]:
        """The loaded deltas by name."""
        return dict(self._deltas)

    def _check(self, name: str) -> None:
        if name not in self._deltas:
            raise UnknownDeltaError(f"no delta named {name!r} is loaded (loaded: {sorted(self._deltas) or 'none'}); load it with load_delta(path, name={name!r})")

    def set_delta(self, name: str | list[str]) -> None:
        """Use delta ``name`` for the following forward passes.

        ``name`` may be a list, as PEFT's ``set_adapter`` takes, of exactly one name: one delta is
        active at a time. Several deltas in one batch go row by row, with ``delta_names=`` in
        ``forward``/``generate`` or :meth:`delta_batch`.

        Example::

            model.set_delta("code")
        """
        if isinstance(name, (list, tuple)):
            if len(name) != 1:
                raise ServingError(
                    f"set_delta({list(name)!r}): one delta is active at a time, so give one name. To run several deltas at once, give "
                    "each row of the batch its own: model.generate(input_ids, delta_names=['a', 'b', ...]) or `with model.delta_batch([...]):`"
                )
            (name,) = name
        if not isinstance(name, str):
            raise ServingError(f"set_delta takes a delta name (a string) or a list of one, not {type(name).__name__}; loaded: {sorted(self._deltas) or 'none'}")
        self._check(name)
        self._routing.active = name

    def disable_delta(self) -> _Restore:
        """Run the plain base until :meth:`set_delta`; as a context manager, only inside it.

        Example::

            with model.disable_delta():
                base_logits = model(input_ids).logits
        """
        restore = _Restore(self._routing, self._routing.active)
        self._routing.active = None
        return restore

    def delete_delta(self, name: str) -> None:
        """Unload delta ``name`` and free its memory (the plain base is used if it was active).

        Example::

            model.delete_delta("math")
        """
        self._check(name)
        for w in list(self._wrappers.values()):
            w.remove(name)
            if not len(w.deltas):
                self._unwrap(w)
        del self._deltas[name]
        if self._routing.active == name:
            self._routing.active = None

    @contextlib.contextmanager
    def delta_batch(self, names: list[str | None]) -> Iterator[None]:
        """Inside, row ``i`` of every batch uses delta ``names[i]`` (``None``: the plain base).

        Rows are grouped by delta: each wrapper computes the base output for the whole batch
        and adds each group's delta to its rows, in one forward pass. ``generate`` works too
        (rows expanded by ``num_beams``/``num_return_sequences`` keep their row's delta).

        Example::

            with model.delta_batch(["math", "code", None]):
                out = model.generate(input_ids, max_new_tokens=20)
        """
        names = list(names)
        for n in names:
            if n is not None:
                self._check(n)
        if not names:
            raise ServingError("delta_names is empty; give one delta name (or None) per row of the batch")
        previous = self._routing.row_names
        self._routing.set_rows(names)
        try:
            yield
        finally:
            self._routing.set_rows(previous)

    # ------------------------------------------------------------------ running

    def forward(self, *args: Any, delta_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active delta, or with ``delta_names[i]`` for row ``i``.

        Serving is inference: the forward runs without autograd (the delta operators write into
        buffers in place), so ``model(ids)`` works without ``torch.no_grad()`` and its outputs
        carry no graph. To train, merge first (``merge_and_unload()``)."""
        with torch.no_grad():
            if delta_names is None:
                return self.base_model(*args, **kwargs)
            with self.delta_batch(delta_names):
                return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, delta_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """``base_model.generate`` with the active delta, or with ``delta_names[i]`` for row ``i``."""
        if delta_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self.delta_batch(delta_names):
            return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ memory, merging

    def delta_nbytes(self, name: str | None = None) -> int:
        """Bytes the operators of delta ``name`` (default: all loaded deltas) hold in memory."""
        if name is not None:
            self._check(name)
            return self._deltas[name].nbytes
        return sum(d.nbytes for d in self._deltas.values())

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, delta_name: str | None = None, selected_adapters: list[str] | None = None,
        overwrite: bool = False, is_main_process: bool = True, safe_serialization: bool = True,
    ) -> Path | None:
        """Write the active delta (or ``delta_name``) as a delta repo at ``save_directory``, and
        return its path.

        The repo is the delta's own files as they were loaded (config, index, shards, fine-tune
        config, generation config, tokenizer files, card), copied, not re-encoded: each file
        confined to the delta's folder (``limits.confined_file``), the JSON files within their
        size bounds and equal to what was loaded, each shard checked against the loaded index's
        SHA-256, so a delta whose files changed since raises :class:`~deltahub.FormatError` and
        nothing is written. Never the wrapped model's weights (``*.base_layer.*``): for the
        fine-tune as a full checkpoint, ``merge_and_unload().save_pretrained(dir)``.
        ``selected_adapters`` (PEFT's name) may name one delta. A non-empty
        ``save_directory`` is refused unless ``overwrite``; it may not be the delta's own folder.

        Example::

            model.save_pretrained("math-delta", delta_name="math")
            DeltaModel.from_pretrained("math-delta")
        """
        if not safe_serialization:
            raise ServingError("a delta repo is safetensors only; drop safe_serialization=False")
        if selected_adapters is not None:
            if delta_name is not None or len(selected_adapters) != 1:
                raise ServingError(f"selected_adapters={selected_adapters!r}: a delta repo holds one delta; save each to its own folder with delta_name=NAME")
            delta_name = selected_adapters[0]
        loaded = self._delta_to_save(delta_name)
        if not is_main_process:
            return None
        return copy_delta_repo(loaded, save_directory, overwrite)

    def push_to_hub(
        self, repo_id: str, *, delta_name: str | None = None, commit_message: str | None = None, tag: str | None = None, private: bool | None = None,
        revision: str | None = None, create_pr: bool = False, token: str | bool | None = None, **push_kwargs: Any,
    ):
        """Push the active delta (or ``delta_name``) to the Hub as a new version of ``repo_id``:
        :meth:`save_pretrained` into a temporary folder, then :func:`deltahub.push` (one commit,
        tagged ``v1``, ``v2``, ... or ``tag``; ``revision`` is the branch; ``commit_message`` the
        version's message); ``push_kwargs`` are further options of :func:`deltahub.push`.
        Returns the :class:`~deltahub.hub.PushResult`.
        ``DeltaModel.from_pretrained(repo_id)`` loads it back.

        Example::

            model.push_to_hub("user/smollm2-math", delta_name="math", commit_message="lr 1e-5")
        """
        from ..hub import push

        with tempfile.TemporaryDirectory(prefix="deltahub-push-") as tmp:
            path = self.save_pretrained(Path(tmp) / "delta", delta_name=delta_name)
            return push(path, repo_id, tag=tag, message=commit_message, private=private, branch=revision, create_pr=create_pr, token=token, **push_kwargs)

    def _delta_to_save(self, name: str | None) -> LoadedDelta:
        if name is None:
            name = self._routing.active
            if name is None:
                raise ServingError(f"no delta is active (disabled, or none loaded); name the one to save with delta_name=NAME (loaded: {sorted(self._deltas) or 'none'})")
        self._check(name)
        loaded = self._deltas[name]
        if loaded.reader is None:
            raise ServingError(f"delta {name!r} was not loaded from a delta repo, so there are no files to save; load it with load_delta(path)")
        return loaded

    # ------------------------------------------------------------------ PEFT's names

    def load_adapter(self, model_id: str | os.PathLike | DeltaReader, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any) -> LoadedDelta:
        """PEFT's name for :meth:`load_delta` (``revision``, ``token``, ``cache_dir``,
        ``local_files_only``, ``verify_base`` as there). Deltas are frozen: ``is_trainable=True``
        and PEFT's loading options are refused."""
        if is_trainable:
            raise ServingError("deltas are served frozen (is_trainable=True is not supported); to train further, merge_and_unload() and fine-tune the merged model")
        own = {"revision", "token", "cache_dir", "local_files_only", "verify_base"}
        other = sorted(set(kwargs) - own)
        if other:
            raise ServingError(f"load_adapter: {', '.join(other)} are PEFT options that deltahub deltas do not take; the delta goes where each weight it changes is (accepted: {', '.join(sorted(own))})")
        return self.load_delta(model_id, adapter_name, **kwargs)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = True) -> None:
        """PEFT's name for :meth:`set_delta` (deltas are always in inference mode)."""
        self.set_delta(adapter_name)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """PEFT's name for :meth:`delete_delta` (a name, or a list as transformers takes)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:  # all known before any is deleted
            self._check(n)
        for n in names:
            self.delete_delta(n)

    def disable_adapter(self) -> "_Restore":
        """PEFT's name for :meth:`disable_delta` (``with model.disable_adapter(): ...``)."""
        return self.disable_delta()

    @property
    def active_adapter(self) -> str | None:
        """PEFT's name for :attr:`active_delta`."""
        return self.active_delta

    @property
    def active_adapters(self) -> "_Names":
        """The active delta as a list (``[]`` when disabled), PEFT's property; calling it, as
        transformers' ``active_adapters()`` is called, gives the same list."""
        return _Names([] if self.active_delta is None else [self.active_delta])

    def unload(self) -> nn.Module:
        """Remove every wrapper and delta; return the plain base model, unchanged."""
        for w in list(self._wrappers.values()):
            self._unwrap(w)
        self._deltas.clear()
        self._routing.active = None
        self._routing.set_rows(None)
        self._hook.remove()
        return self.base_model

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold the active delta into the base weights and return the plain transformers model.

        Each changed tensor is decoded from the stored components exactly as
        ``DeltaModel.from_pretrained(delta)`` decodes it, so the weights are bit for bit the
        merged model's when the base was loaded in the delta's dtype. Other deltas are dropped.

        Example::

            merged = model.merge_and_unload()
            merged.save_pretrained("merged")
        """
        name = self._routing.active
        if name is not None:
            done: set[int] = set()
            for n, op in self._deltas[name].ops.items():
                param = self._param(n)
                if id(param) in done:
                    continue
                done.add(id(param))
                param.copy_(op.merged(param).to(device=param.device, dtype=param.dtype))
        return self.unload()


def _finite_get(reader: DeltaReader, name: str, source: str):
    """``reader.get`` for the stored tensors of tensor ``name``, refusing a floating-point one
    that holds NaN or Inf (:class:`InvalidTensorError`). Unmerged operators compute with the
    stored components, never the decoded tensor, so that is where a flipped scale is caught:
    a non-finite component makes every output it touches non-finite, whatever the base."""

    def get(key: str) -> torch.Tensor:
        t = reader.get(key)
        if not all_finite(t):
            bad = ~torch.isfinite(t)
            raise InvalidTensorError(
                f"{source}: tensor {name!r}: stored {key!r} holds {int(bad.sum())} NaN or Inf value(s); the delta is corrupted or hostile "
                "(checksums do not catch a resealed file): download it again from a source you trust"
            )
        return t

    return get


def load_unmerged(
    cls: type[MultiDeltaModel],
    delta: str | os.PathLike,
    base: str | os.PathLike | None,
    *,
    delta_name: str,
    revision: str | None,
    base_revision: str | None,
    dtype: str | torch.dtype,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    verify_base: bool,
    **model_kwargs: Any,
) -> MultiDeltaModel:
    """``DeltaModel.from_pretrained(..., merge=False)``: the base (recorded in the delta, or
    ``base``) loaded with transformers, wrapped, and the delta loaded into it.

    The base checkpoint passed ``open_pair``'s checks (every base tensor has a record, shapes,
    bounds); its ``config.json`` is read bounded and confined, its layer counts checked against
    its blocks, and a base that leaves any weight of the model uninitialized is refused. Once
    loaded, the delta's records are placed as in :meth:`MultiDeltaModel.load_delta`, where a
    tensor without a record would stay the base's (unchanged), which is why completeness is
    checked on the checkpoint, not there.

    The model is built from the base's ``config.json`` (trusted: the user chose the base), as
    the class its ``architectures`` names among transformers' own (``model.model_class``);
    ``trust_remote_code`` then reaches only the base's own files. A base without a
    ``config.json`` is built from the delta's ``finetuned_config.json`` instead, which is
    untrusted: then ``trust_remote_code`` is ignored and the model must fit the delta's weights
    on the meta device first (``sources.check_model_size``), as for the merged loader. Whatever
    transformers raises while building or loading is a :class:`FormatError` naming the config."""
    from ..model import check_loading_info, config_from_dict, finetuned_config, model_class, resolve_dtype, set_generation_config  # deltahub.model imports this module
    from ..errors import DeltahubError
    from ..sources import check_model_size, ignore_remote_code, one_line

    hub = HubOptions(token, cache_dir, local_files_only)
    refuse_chain(open_delta(delta, revision, hub), "served unmerged")
    reader, base_ckpt = open_pair(delta, base, revision=revision, base_revision=base_revision, hub=hub, verify_base=verify_base)
    config = finetuned_config(reader)
    # The base's own config.json when it has one: unmerged, the modules are the base's. Read here,
    # bounded, so that transformers reads no file of the base but its weights (and checked ones:
    # a generation_config.json linking out of the folder is refused by base_ckpt.file).
    base_cfg = base_ckpt.config()
    base_ckpt.file("generation_config.json")
    load_dtype = resolve_dtype(dtype, reader, config)
    if base_cfg is not None:
        where = f"{base_ckpt.source}/config.json"
        check_layer_counts(base_cfg, count_blocks(base_ckpt.names()), where)
        base_config = config_from_dict(base_cfg, where)
        arch = model_class(base_config, where)
    else:  # the delta's config: untrusted (see the docstring)
        where = f"{getattr(reader, 'source', reader.path)}/{FINETUNED_CONFIG_NAME}"
        base_config = config
        ignore_remote_code(model_kwargs)
        arch = model_class(config, where)
        check_model_size(arch, config, load_dtype, reader, where)
    try:
        model, info = arch.from_pretrained(base_ckpt.path, config=base_config, dtype=load_dtype, output_loading_info=True, **model_kwargs)
    except DeltahubError:
        raise
    except Exception as e:  # noqa: BLE001 - a config field transformers chokes on, or an argument
        raise FormatError(
            f"{where}: transformers cannot build or load the model it describes ({type(e).__name__}: {one_line(e)}); the config is "
            "corrupted or hostile, or an argument given to from_pretrained is wrong"
        ) from None
    check_loading_info(info, f"the base {base_ckpt.source}", "config.json")
    set_generation_config(model, reader)
    out = cls.from_base(model)
    # open_pair checked the base checkpoint; the in-memory check repeats it cheaply.
    out.load_delta(reader, delta_name, verify_base=verify_base)
    return out
