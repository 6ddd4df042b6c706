"""In-memory fine-tunes for ``deltahub.compress``: a transformers model (or any ``nn.Module``)
or a state dict, read like the checkpoint folder its ``save_pretrained`` would write.

:class:`MemoryCheckpoint` has the interface ``compress`` uses of
:class:`~deltahub.checkpoint.Checkpoint` (``names``, ``info``, ``borrow``, ``get``,
``fingerprint``, ``sample_digest``, ``config``, ``file``) and hands out the model's own
tensors one at a time: nothing is copied but the tensor being encoded when it is not a
contiguous CPU tensor already (a GPU model is brought over tensor by tensor).

Its tensor names and their order are those of the folder ``model.save_pretrained(dir)``
writes (tied duplicates removed and renamed weights reverted by transformers' own save
logic; shards as ``save_pretrained`` splits them; inside a shard, safetensors' order), so
compressing a model gives the delta that compressing its saved folder gives, byte for byte.

Example::

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    train(model)
    deltahub.compress("HuggingFaceTB/SmolLM2-135M", model, "my-delta", ratio=1/8)
"""

from __future__ import annotations

import copy
import functools
import json
import struct
import tempfile
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import CheckpointError, TensorInfo, sample_digest
from .format.config import fingerprint as _fingerprint
from .format.dtypes import KNOWN_DTYPES, itemsize, to_name, to_torch
from .format.limits import confined_file, read_json

# transformers' save_pretrained shard size: a fine-tune above it is saved as several files,
# which sets the order in which compress reads (and writes) its tensors.
SAVE_SHARD_SIZE = "50GB"


def memory_source(finetuned: object) -> "MemoryCheckpoint | None":
    """A :class:`MemoryCheckpoint` for an in-memory model or state dict, ``None`` for anything
    else (a folder or Hub id, opened as a checkpoint)."""
    if isinstance(finetuned, MemoryCheckpoint):
        return finetuned
    if isinstance(finetuned, nn.Module):
        return MemoryCheckpoint.from_model(finetuned)
    if isinstance(finetuned, Mapping):
        return MemoryCheckpoint.from_state_dict(finetuned)
    return None


@functools.cache
def _dtype_rank() -> dict[str, int]:
    """Where safetensors puts each dtype in a file (it sorts by dtype, then by name), asked of
    safetensors itself with one element per dtype, so that a new safetensors cannot change it
    behind our back."""
    from safetensors.torch import save

    data = save({name: torch.zeros(1, dtype=to_torch(name)) for name in KNOWN_DTYPES})
    (n,) = struct.unpack("<Q", data[:8])
    header = {k: v for k, v in json.loads(data[8 : 8 + n]).items() if k != "__metadata__"}
    return {name: i for i, name in enumerate(sorted(header, key=lambda k: header[k]["data_offsets"][0]))}


def _file_order(tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> list[str]:
    """The names in the order a checkpoint folder of ``tensors`` lists them: shard files by name
    (as ``save_pretrained`` splits them), and in each file safetensors' order."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    rank = _dtype_rank()
    return [n for f in sorted(split.filename_to_tensors) for n in sorted(split.filename_to_tensors[f], key=lambda n: (rank[to_name(tensors[n].dtype)], n))]


def _saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``model.save_pretrained`` writes, under the names it writes them: the state
    dict (detached views of the parameters, no copy), less ``_keys_to_ignore_on_save``, tied
    duplicates removed and weight conversions reverted by transformers' own save functions.
    A plain ``nn.Module`` keeps the first name of each shared storage."""
    state = model.state_dict()
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - transformers < 5: keep the plain-module rule
        PreTrainedModel = None
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        for key in model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        state = remove_tied_weights_from_state_dict(state, model)
        return dict(revert_weight_conversion(model, state))
    seen: set[tuple[int, int]] = set()
    out = {}
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _refuse_wrapped(model: nn.Module) -> None:
    """A PEFT model or a serving ``DeltaModel`` holds its base under ``base_layer`` names: its
    state dict is not the fine-tune's checkpoint."""
    from .serving.model import MultiDeltaModel

    kind = "a DeltaModel serving deltas unmerged" if isinstance(model, MultiDeltaModel) else None
    if kind is None and any(".base_layer." in n or ".lora_A." in n for n, _ in model.named_parameters()):
        kind = "a model with adapter layers (PEFT)"
    if kind is not None:
        raise CheckpointError(
            f"the fine-tune is {kind}: its weights are stored under wrapper names (base_layer, lora_A), not as the fine-tune's "
            "checkpoint. Pass model.merge_and_unload() instead (for a DeltaModel, after set_delta(NAME)); "
            "for an unmerged deltahub delta, DeltaModel.save_pretrained(dir) saves it as it is"
        )


class MemoryCheckpoint:
    """Tensors held in memory, read like a :class:`~deltahub.checkpoint.Checkpoint` folder.

    ``path`` and ``revision`` are ``None`` (nothing on disk, no Hub commit); ``source`` names
    it in messages. ``config()`` and ``file("config.json")`` / ``file("generation_config.json")``
    are the files ``save_pretrained`` would write, written to a private temporary folder that
    goes with this object.
    """

    path = None
    revision = None

    def __init__(self, tensors: dict[str, torch.Tensor], source: str, max_shard_size: int | str = SAVE_SHARD_SIZE) -> None:
        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{source}: entry {str(name)[:80]!r} is a {type(t).__name__}, not a tensor under a string name; pass a state dict of tensors")
            if t.device.type == "meta":
                raise CheckpointError(
                    f"{source}: tensor {name!r} is on the meta device (offloaded or not materialized), so its weights are not in memory; "
                    "load the model without offloading, or save it with save_pretrained and compress the folder"
                )
            to_name(t.dtype)  # a dtype safetensors cannot store: FormatError naming it
        self.source = source
        self._tensors = {n: tensors[n] for n in _file_order(tensors, max_shard_size)}
        self._info = {n: TensorInfo(to_name(t.dtype), tuple(t.shape)) for n, t in self._tensors.items()}
        self._folder: Path | None = None

    @classmethod
    def from_model(cls, model: nn.Module, max_shard_size: int | str = SAVE_SHARD_SIZE) -> "MemoryCheckpoint":
        """The checkpoint ``model.save_pretrained`` would write, its config files included."""
        _refuse_wrapped(model)
        ckpt = cls(_saved_state(model), f"the in-memory {type(model).__name__}", max_shard_size)
        ckpt._write_configs(model)
        return ckpt

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], max_shard_size: int | str = SAVE_SHARD_SIZE) -> "MemoryCheckpoint":
        """A state dict, as ``safetensors.torch.save_file`` would store it (no config: the delta
        then has no ``finetuned_config.json``; pass the model to keep it)."""
        return cls(dict(state), "the in-memory state dict", max_shard_size)

    def cast(self, dtype: torch.dtype) -> "MemoryCheckpoint":
        """A copy whose floating-point tensors are ``dtype`` (what ``save_pretrained`` of the model
        in that dtype writes), its config recording that dtype. The tensors are new memory: the
        copy does not change when the model trains on."""
        tensors = {n: (t.detach().to("cpu", dtype=dtype) if t.is_floating_point() else t.detach().to("cpu")).clone() for n, t in self._tensors.items()}
        out = MemoryCheckpoint(tensors, self.source)
        if self._folder is not None:
            tmp = tempfile.TemporaryDirectory(prefix="deltahub-finetune-")
            weakref.finalize(out, tmp.cleanup)
            out._folder = Path(tmp.name)
            for f in self._folder.iterdir():
                data = f.read_bytes()
                if f.name == "config.json":
                    cfg = json.loads(data)
                    cfg["dtype"] = str(dtype).removeprefix("torch.")
                    data = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
                (out._folder / f.name).write_bytes(data)
        return out

    def _write_configs(self, model: nn.Module) -> None:
        """``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them (the
        model's dtype and class recorded), without changing the model's own config."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            return
        tmp = tempfile.TemporaryDirectory(prefix="deltahub-finetune-")
        weakref.finalize(self, tmp.cleanup)
        self._folder = Path(tmp.name)
        config = copy.deepcopy(config)
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            config.dtype = str(dtype).removeprefix("torch.")
        config.architectures = [type(model).__name__]
        config.save_pretrained(self._folder)
        can_generate = getattr(model, "can_generate", lambda: False)
        if can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self._folder)

    # ------------------------------------------------------------------ Checkpoint's interface

    def names(self) -> list[str]:
        """Tensor names in the order the saved folder lists them."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    @contextmanager
    def borrow(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor itself (detached; a CPU copy of this one tensor if it lives elsewhere or is
        not contiguous). Read it, do not change it: it is the model's weight."""
        try:
            t = self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.source} has no tensor {name!r}") from None
        yield t.detach().to("cpu").contiguous()

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor, on the CPU."""
        with self.borrow(name) as t:
            return t.clone()

    def sample_digest(self, name: str) -> str:
        return sample_digest(self._tensors[name])

    def fingerprint(self) -> str:
        """The spec's fingerprint, equal to the saved folder's."""
        return _fingerprint((n, i.dtype, i.shape) for n, i in self._info.items())

    def file(self, relpath: str) -> Path | None:
        """``config.json`` or ``generation_config.json`` as save_pretrained writes them; None for
        any other file (an in-memory model has no tokenizer files)."""
        if self._folder is None:
            return None
        p = confined_file(self._folder, relpath, f"{self.source}: {relpath}")
        return p if p.is_file() else None

    def config(self) -> dict[str, Any] | None:
        p = self.file("config.json")
        return None if p is None else read_json(p, f"{self.source}: config.json")

    def total_bytes(self) -> int:
        return sum(itemsize(i.dtype) * t.numel() for i, t in zip(self._info.values(), self._tensors.values()))
