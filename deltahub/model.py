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
from .format.limits import read_json
from .sources import HubOptions, check_model_size, check_model_type, decode_checked, ignore_remote_code, one_line, open_pair, own_model_classes, read_finetuned_config, repo_file
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


# Config fields that point transformers at code in other Hub repos (``auto_map``:
# "org/repo--module.Class"); deltahub builds transformers' own classes only, so they are dropped.
_REMOTE_CODE_FIELDS = ("auto_map", "custom_pipelines")


def config_from_dict(data: dict, where: str):
    """A transformers config from a (checked) config dict, without its remote-code fields
    (``auto_map``, ``custom_pipelines``: never followed). What transformers refuses in it (an
    unknown ``model_type``, a field of the wrong type, huggingface_hub's strict-dataclass
    validation) is a :class:`FormatError` naming ``where``, with transformers' words on one
    line (``sources.one_line``)."""
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k not in _REMOTE_CODE_FIELDS}
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise FormatError(f"{where} has no 'model_type' (a string naming the architecture, e.g. \"llama\"); the config is corrupted")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError, StrictDataclassFieldValidationError, ...: all mean the same
        raise FormatError(
            f"{where}: transformers cannot build a config from it (field 'model_type' = {one_line(model_type, 60)!r}, or another field): "
            f"{type(e).__name__}: {one_line(e)}"
        ) from None


def model_class(config, where: str = FINETUNED_CONFIG_NAME) -> type:
    """The model class to build for ``config``: the first name in its ``architectures`` that is
    one of transformers' own model classes for ``type(config)`` (a ``PreTrainedModel`` subclass
    registered in one of transformers' auto mappings, ``MODEL_FOR_CAUSAL_LM_MAPPING``,
    ``MODEL_MAPPING``, the classification mappings..., for this config class); else, when
    ``architectures`` is absent or names only classes transformers does not have (a
    remote-code model's), the causal-LM class of the config, else its bare model.

    A name that transformers has but that is no model class of this config (``"pipeline"``,
    ``"AutoModelForCausalLM"``, which would follow the config's ``auto_map`` to another repo's
    code, ``"BertModel"`` for a llama config) is refused with :class:`FormatError` naming
    ``where``'s field ``architectures``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if not isinstance(names, (list, tuple)):
        raise FormatError(f"{where}: field 'architectures' must be a list of class names, got {type(names).__name__}; the config is corrupted or hostile")
    own = own_model_classes(type(config))
    for arch in names:
        if isinstance(arch, str) and arch in own:
            return own[arch]
    foreign = [a for a in names if not isinstance(a, str) or hasattr(transformers, a)]
    if foreign:
        raise FormatError(
            f"{where}: field 'architectures' names {one_line(foreign[0], 80)!r}, which is not one of transformers' model classes for "
            f"{type(config).__name__} ({', '.join(sorted(own)) or 'none'}); the config is corrupted or hostile"
        )
    for mapping in (transformers.MODEL_FOR_CAUSAL_LM_MAPPING, transformers.MODEL_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    raise FormatError(f"transformers has no model class for {type(config).__name__}; set 'architectures' in {where}")


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
    path = repo_file(reader.path, "generation_config.json", where)  # a FIFO or folder there is an error, not skipped
    if path is not None and getattr(model, "can_generate", lambda: False)():
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

        The fine-tune's ``finetuned_config.json`` comes with the delta and is untrusted: the model
        is always one of transformers' own classes for that config (``architectures`` naming
        anything else is refused; ``auto_map`` and ``custom_pipelines`` are dropped), and no code
        from a Hub repo is ever run: ``trust_remote_code`` is ignored with a warning (merged, the
        model is built from the delta's config, not the base's code; unmerged, it reaches only
        the base's own files, see ``load_unmerged``). Before anything is allocated, its
        ``model_type`` must be the base's (when the base has a ``config.json``; not checked with
        ``verify_base=False``) and the model it describes, built on the meta device, must fit
        the delta's weights (``sources.check_model_size``). Whatever transformers raises while
        building or loading it becomes a :class:`FormatError` naming the file.
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
        # The fine-tune's config is the delta's, hence untrusted: the class must be one of
        # transformers' own for it (model_class), no remote code is run whatever the caller's
        # trust_remote_code (meant for their base), the architecture must be the base's, and the
        # model it describes must fit the delta's weights, all before anything is allocated.
        where = f"{getattr(reader, 'source', reader.path)}/{FINETUNED_CONFIG_NAME}"
        ignore_remote_code(model_kwargs)
        if verify_base:
            check_model_type(config.model_type, base_ckpt, where)
        arch = model_class(config, where)
        load_dtype = resolve_dtype(dtype, reader, config)
        check_model_size(arch, config, load_dtype, reader, where)
        errors: list[BaseException] = []
        caller = threading.current_thread()
        threads = torch.get_num_threads()
        share = max(1, threads // _loader_threads())  # each pool thread's share of the cores
        state = {n: _LazyDecoded(n, reader, base_ckpt, errors, caller, share) for n, r in reader.records.items() if r["kind"] != "removed"}
        want_info = model_kwargs.pop("output_loading_info", False)
        try:
            model, info = arch.from_pretrained(
                None,
                config=config,
                state_dict=state,
                dtype=load_dtype,
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
                raise (err if isinstance(err, DeltahubError) else FormatError(f"decoding the delta failed: {type(err).__name__}: {one_line(err)}")) from None
            # Anything else comes from the config (a field transformers chokes on), or from an argument.
            raise FormatError(
                f"{where}: transformers cannot build or load the model it describes ({type(e).__name__}: {one_line(e)}); the config is "
                "corrupted or hostile, or an argument given to from_pretrained is wrong"
            ) from None
        finally:
            torch.set_num_threads(threads)  # see _LazyDecoded: the pool threads changed torch's default
        if errors:
            err = errors[0]
            raise err if isinstance(err, DeltahubError) else FormatError(f"decoding the delta failed: {err}")
        check_loading_info(info, str(getattr(reader, "source", reader.path)))
        set_generation_config(model, reader)
        return (model, info) if want_info else model


