"""``DeltaModel.from_pretrained``: base + decoded delta -> an ordinary transformers model.

Each tensor is decoded only when transformers asks for it: the loader hands transformers a
state dict of lazy entries, so transformers' own loading (key renames, fused Mixture-of-
Experts weights, ``device_map``/``max_memory``/disk offload through accelerate, tied
embeddings) runs unchanged, and the model equals, bit for bit, loading the checkpoint that
``deltahub apply`` writes.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .checkpoint import Checkpoint
from .errors import DeltahubError, FormatError
from .format import FINETUNED_CONFIG_NAME, DeltaReader
from .format.dtypes import to_torch
from .format.limits import confined_file, read_json
from .sources import HubOptions, decode_checked, open_pair, read_finetuned_config
from .serving.model import MultiDeltaModel, load_unmerged


class _LazyDecoded:
    """A state-dict entry that decodes its tensor on ``entry[...]`` (what transformers calls).

    transformers materializes entries from a pool of threads (as many as cores, at most 4). In
    a pool thread (any thread but ``caller``'s, the one loading) a decode runs on ``threads``
    cores, its share of the caller's: each decode would otherwise spread its work over every
    core, and several at once oversubscribe them. torch's thread count is per thread, but
    setting it also sets the default that a thread adopts at its first parallel op, so
    ``from_pretrained`` sets the caller's count again once the model is loaded.
    """

    def __init__(self, name: str, reader: DeltaReader, base: Checkpoint, errors: list[BaseException], caller: threading.Thread, threads: int) -> None:
        self.name, self.reader, self.base, self.errors, self.caller, self.threads = name, reader, base, errors, caller, threads
        rec = reader.record(name)
        self.shape = tuple(rec["shape"])
        self.dtype = to_torch(rec["dtype"])

    def __getitem__(self, index: Any) -> torch.Tensor:
        try:
            with _threads_unless_in(self.caller, self.threads):
                t = decode_checked(self.reader, self.base, self.name)  # NaN/Inf where the base is finite: refused
        except BaseException as e:  # transformers may swallow loader errors; keep them to re-raise
            self.errors.append(e)
            raise
        return t if index is Ellipsis else t[index]

    def get_shape(self) -> list[int]:
        return list(self.shape)


def _loader_threads() -> int:
    """How many threads transformers materializes weights with."""
    try:
        from transformers.core_model_loading import GLOBAL_WORKERS  # transformers 5

        return int(GLOBAL_WORKERS)
    except ImportError:
        return min(4, os.cpu_count() or 4)


@contextmanager
def _threads_unless_in(caller: threading.Thread, threads: int) -> Iterator[None]:
    """torch on ``threads`` cores for the duration, in any thread but ``caller``."""
    if threading.current_thread() is caller:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finetuned_config(reader: DeltaReader):
    """The fine-tune's transformers config, kept in the delta repo as ``finetuned_config.json``
    (read and bounded by ``sources.read_finetuned_config`` before transformers sees it)."""
    data = read_finetuned_config(reader)
    if data is None:
        raise FormatError(f"{reader.path} has no {FINETUNED_CONFIG_NAME}, so the model cannot be rebuilt; load the base with transformers and apply the delta with `deltahub apply`")
    return config_from_dict(data, f"{getattr(reader, 'source', reader.path)}/{FINETUNED_CONFIG_NAME}")


def config_from_dict(data: dict, where: str):
    """A transformers config from a (checked) config dict; what transformers refuses in it
    (an unknown ``model_type``, a field of the wrong type) is a :class:`FormatError` naming
    ``where``."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise FormatError(f"{where} has no 'model_type' (a string naming the architecture, e.g. \"llama\"); the config is corrupted")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise FormatError(f"{where}: transformers cannot build a config from it (field 'model_type' = {model_type!r}, or another field): {e}") from None


def model_class(config) -> type:
    """The class named in ``architectures``; else the causal-LM class of the config, else the bare model."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for mapping in (transformers.MODEL_FOR_CAUSAL_LM_MAPPING, transformers.MODEL_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    raise FormatError(f"transformers has no model class for {type(config).__name__}; set 'architectures' in {FINETUNED_CONFIG_NAME}")


def resolve_dtype(dtype: str | torch.dtype, reader: DeltaReader, config) -> str | torch.dtype:
    """``dtype="auto"`` means the fine-tune's dtype (recorded in the delta, else its config's,
    else float32), so the merged and the unmerged loaders agree; any other value is as given."""
    if dtype != "auto":
        return dtype
    ft_dtype = reader.config.get("finetuned", {}).get("dtype")
    return getattr(torch, ft_dtype) if ft_dtype else getattr(config, "dtype", None) or torch.float32


def set_generation_config(model, reader: DeltaReader) -> None:
    """Give a model that generates the delta's ``generation_config.json``, when it has one
    (read through ``limits.confined_file`` and ``limits.read_json``)."""
    where = f"{getattr(reader, 'source', reader.path)}/generation_config.json"
    path = confined_file(reader.path, "generation_config.json", where)
    if path.is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        data = read_json(path, where)
        try:
            model.generation_config = GenerationConfig.from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{where}: transformers refuses it as a generation config ({e}); the delta is corrupted") from None


def check_loading_info(info: dict, where: str, config_name: str = FINETUNED_CONFIG_NAME) -> None:
    """Refuse a model transformers left with weights it did not load: ``missing_keys`` (weights
    left at their random initialization; tied weights, which transformers ties, are not among
    them) or ``mismatched_keys``. Names a few and the count."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) have no tensor ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
        if mismatched:
            parts.append(f"{len(mismatched)} have the wrong shape ({', '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''})")
        raise FormatError(
            f"{where}: the model would be left partly at random initialization: " + "; ".join(parts)
            + f". The config ({config_name}) does not match the weights: they are corrupted or were made for another architecture"
        )


def _dtype_argument(dtype: str | torch.dtype | None, torch_dtype: str | torch.dtype | None) -> str | torch.dtype:
    """``dtype`` as transformers 5 reads it: ``torch_dtype`` is its deprecated alias, used when
    ``dtype`` is not given; unset means ``"auto"``."""
    if torch_dtype is not None:
        warnings.warn("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning, stacklevel=3)
        if dtype is None:
            dtype = torch_dtype
    return "auto" if dtype is None else dtype


class DeltaModel(MultiDeltaModel):
    """Load fine-tunes stored as deltas. The API mirrors transformers and PEFT.

    ``from_pretrained`` returns the merged fine-tune, an ordinary transformers model;
    ``from_pretrained(..., merge=False)`` and ``from_base(model)`` return a ``DeltaModel`` that
    serves any number of deltas unmerged on one base (``load_delta``, ``set_delta``,
    ``disable_delta``, ``delete_delta``, ``save_pretrained``, ``push_to_hub``,
    ``merge_and_unload``, and PEFT's names for them; see ``deltahub.serving.model``).

    Example::

        from deltahub import DeltaModel
        model = DeltaModel.from_pretrained("user/my-delta", device_map="auto")
        model.generate(...)
    """

    @classmethod
    def from_pretrained(
        cls,
        delta: str | os.PathLike,
        base: str | os.PathLike | None = None,
        *,
        revision: str | None = None,
        base_revision: str | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        verify_base: bool = True,
        merge: bool = True,
        delta_name: str = "default",
        **model_kwargs: Any,
    ):
        """Return a transformers model of the fine-tune's architecture with base + delta weights.

        ``delta``: local folder or Hub repo id (``revision``: tag, branch or commit). ``base``:
        defaults to the base recorded in the delta, at its pinned revision; a base whose tensor
        names, shapes or sampled weights differ is refused unless ``verify_base=False``.
        ``dtype`` (default ``"auto"``: the fine-tune's dtype) is the weights' dtype, merged or
        not; ``torch_dtype``, its deprecated name in transformers 5, is accepted with the same
        effect and transformers' deprecation warning (a FutureWarning here); ``dtype`` wins when
        both are given. ``device_map``, ``max_memory`` and ``offload_folder`` work as in
        ``transformers.AutoModel.from_pretrained``.

        ``merge=False`` returns a ``DeltaModel`` instead: the base loaded with transformers and
        the delta served unmerged under ``delta_name``, ready for more ``load_delta`` calls.
        """
        dtype = _dtype_argument(dtype, model_kwargs.pop("torch_dtype", None))
        if not merge:
            return load_unmerged(
                cls, delta, base, delta_name=delta_name, revision=revision, base_revision=base_revision, dtype=dtype, token=token, cache_dir=cache_dir,
                local_files_only=local_files_only, verify_base=verify_base, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, **model_kwargs,
            )
        hub = HubOptions(token, cache_dir, local_files_only)
        reader, base_ckpt = open_pair(delta, base, revision=revision, base_revision=base_revision, hub=hub, verify_base=verify_base)
        config = finetuned_config(reader)
        errors: list[BaseException] = []
        caller = threading.current_thread()
        threads = torch.get_num_threads()
        share = max(1, threads // _loader_threads())  # each pool thread's share of the cores
        state = {n: _LazyDecoded(n, reader, base_ckpt, errors, caller, share) for n, r in reader.records.items() if r["kind"] != "removed"}
        want_info = model_kwargs.pop("output_loading_info", False)
        try:
            model, info = model_class(config).from_pretrained(
                None,
                config=config,
                state_dict=state,
                dtype=resolve_dtype(dtype, reader, config),
                device_map=device_map,
                max_memory=max_memory,
                offload_folder=offload_folder,
                output_loading_info=True,
                **model_kwargs,
            )
        except DeltahubError:
            raise
        except Exception as e:
            # transformers re-raises a decode error from its threads as is, or wrapped.
            if errors:
                err = errors[0]
                raise (err if isinstance(err, DeltahubError) else FormatError(f"decoding the delta failed: {err}")) from None
            raise
        finally:
            torch.set_num_threads(threads)  # see _LazyDecoded: the pool threads changed torch's default
        if errors:
            err = errors[0]
            raise err if isinstance(err, DeltahubError) else FormatError(f"decoding the delta failed: {err}")
        check_loading_info(info, str(getattr(reader, "source", reader.path)))
        set_generation_config(model, reader)
        return (model, info) if want_info else model


