"""Where deltas and their bases come from: local folders or Hub repos, the check that a
base is the one a delta was made against, and the checks that make a hostile delta fail
before anything is decoded (:func:`check_records_against_base`) or used
(:func:`decode_checked`)."""

from __future__ import annotations

import copy
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from .checkpoint import Checkpoint, CheckpointError, borrow_base, resolve
from .errors import BaseMismatchError, FormatError, InvalidTensorError, ShapeMismatchError
from .format import CONFIG_NAME, FINETUNED_CONFIG_NAME, DeltaReader
from .format.dtypes import itemsize
from .format.config import fingerprint
from .format.limits import LAYER_FIELDS, MAX_ADDED_ROWS, MAX_DECODED_FACTOR, MAX_MODEL_SLACK_BYTES, MAX_ROW_GROWTH, confined_file, read_json
from .format.repo import layer_group

DELTA_FILE_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "README.md"]


@dataclass
class HubOptions:
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False

    def kwargs(self) -> dict:
        return {"token": self.token, "cache_dir": self.cache_dir, "local_files_only": self.local_files_only}


def open_delta(delta: str | os.PathLike, revision: str | None = None, hub: HubOptions | None = None) -> DeltaReader:
    """A reader for a delta in a local folder or a Hub repo (at ``revision``: tag, branch or commit)."""
    hub = hub or HubOptions()
    path, commit = resolve(delta, revision=revision, allow_patterns=DELTA_FILE_PATTERNS, **hub.kwargs())
    reader = DeltaReader(path)
    # Whatever decodes from this reader (apply, the loaders, vLLM, export-lora) decodes checked
    # shards: a flipped byte in a shard would otherwise decode as another model.
    reader.check_shards = True
    reader.source = str(delta)  # type: ignore[attr-defined]
    reader.commit = commit  # type: ignore[attr-defined]
    return reader


def open_pair(
    delta: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    base_revision: str | None = None,
    hub: HubOptions | None = None,
    verify_base: bool = True,
) -> tuple[DeltaReader, Checkpoint]:
    """The delta's reader and its base checkpoint, the base checked unless ``verify_base=False``."""
    reader = open_delta(delta, revision, hub)
    return reader, open_base(reader, base, base_revision, hub, verify=verify_base)




def open_base(
    reader: DeltaReader, base: str | os.PathLike | None = None, base_revision: str | None = None, hub: HubOptions | None = None, *, verify: bool = False,
    _seen: int = 0, _config_bytes: int = 0,
) -> Checkpoint:
    """The base checkpoint: the one given, or the one recorded in ``delta_config.json`` at its
    pinned revision; with ``verify``, checked to be the delta's base (:func:`check_base`).

    For a version stored against its parent (spec §4.4), the checkpoint its records decode
    against is the parent's decoded weights (:class:`deltahub.chain.ParentWeights`), found where
    ``parent`` says and checked by its weights digest whatever ``verify`` says; ``base`` and
    ``base_revision`` then apply to the chain's keyframe.

    Whatever ``verify`` says, every record is then checked against the base's header
    (:func:`check_records_against_base`): ``verify=False`` skips the identity check, not the
    bounds that keep a hostile delta from allocating or writing without limit."""
    hub = hub or HubOptions()
    from .chain import check_chain_records, open_parent, validate_records

    validate_records(reader.records, str(getattr(reader, "source", reader.path)))  # before any field of a record is read
    if reader.config.get("parent") is not None:
        parent = open_parent(reader, base, base_revision, hub, verify=verify, seen=_seen, config_bytes=_config_bytes)
        check_chain_records(reader, parent)
        check_records_against_base(reader, parent)  # type: ignore[arg-type]
        return parent  # type: ignore[return-value]
    recorded = reader.config.get("base", {})
    if base is not None:
        ckpt = Checkpoint.open(base, revision=base_revision, **hub.kwargs())
    else:
        ckpt = _open_recorded_base(reader, recorded, base_revision, hub)
    if verify:
        check_base(reader, ckpt)
    check_records_against_base(reader, ckpt)
    return ckpt


def _open_recorded_base(reader: DeltaReader, recorded: dict, base_revision: str | None, hub: HubOptions) -> Checkpoint:
    """The base ``delta_config.json`` records, at its pinned revision. When it cannot be found
    (a local folder that moved or is on another machine, a Hub repo or revision that is not
    there or not cached offline), :class:`CheckpointError` says which and suggests ``--base``."""
    src = getattr(reader, "source", reader.path)
    name = recorded.get("name_or_path")
    fix = "pass the base with --base PATH_OR_HUB_ID (Python: base=...)"
    if not name:
        raise BaseMismatchError(f"{src}: the delta records no base model (base.name_or_path in {CONFIG_NAME}); {fix}")
    revision = base_revision if base_revision is not None else recorded.get("revision")
    if os.path.isabs(name) and not os.path.lexists(name):
        raise CheckpointError(
            f"{src}: the base recorded in {CONFIG_NAME} is the local folder {name}, which is not on this machine (it moved, or the "
            f"delta was made elsewhere); {fix}. Give the delta a Hub base for good with `deltahub set-base DELTA ORG/NAME@REVISION`"
        )
    try:
        path, commit = resolve(name, revision=revision, **hub.kwargs())
    except CheckpointError as e:
        raise CheckpointError(f"{src}: the base recorded in {CONFIG_NAME} cannot be opened: {e}. If you have that base elsewhere, {fix}") from None
    return Checkpoint(path, commit, name)


def _names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def delta_shard_bytes(reader: DeltaReader) -> int:
    """Bytes of the shard files the delta's index names (each file once)."""
    total = 0
    for shard in set(reader.weight_map.values()):
        try:
            total += confined_file(reader.path, shard, "delta.safetensors.index.json").stat().st_size
        except OSError:
            pass  # a missing shard fails when it is read, with its own message
    return total


def check_records_against_base(reader: DeltaReader, base: Checkpoint) -> None:
    """Refuse a delta whose records do not fit ``base``, from the headers alone (nothing is
    decoded, allocated or written first):

    - every tensor of the base has a record (spec §4), else :class:`FormatError` "the delta is
      incomplete" naming a few missing names;
    - ``unchanged``, ``dense`` and ``compressed`` records name a tensor of the base whose shape is
      the record's ``shape`` (``base_shape`` for a compressed one), else
      :class:`ShapeMismatchError` naming the tensor and both shapes;
    - a grown dimension 0 stays within ``limits.MAX_ROW_GROWTH`` x the base's rows +
      ``limits.MAX_ADDED_ROWS`` (:class:`FormatError`);
    - the decoded model (every record not ``removed``) holds at most ``limits.MAX_DECODED_FACTOR``
      x the base's bytes + the delta's shard bytes (added tensors are stored whole), else
      :class:`FormatError`;
    - some record decodes to a tensor, and the records match ``finetuned.fingerprint`` when the
      config has one (:func:`completeness_problems`), else :class:`FormatError`: a delta whose
      records are all ``removed`` would otherwise write a checkpoint with no tensor.

    Costs one pass over the records: microseconds per tensor.
    """
    src = getattr(reader, "source", reader.path)
    missing = [n for n in base.names() if n not in reader.records]
    if missing:
        raise FormatError(
            f"{src}: the delta is incomplete: delta_config.json has no record for {len(missing)} of the {len(base.names())} tensors of the base "
            f"{base.source} ({_names(missing)}); a delta records every tensor of its base (spec §4). Download the delta again, or pass the base it was made against"
        )
    decoded = 0
    for name, rec in reader.records.items():
        kind, shape = rec["kind"], tuple(rec["shape"])
        if kind == "removed":
            continue
        decoded += math.prod(shape) * itemsize(rec["dtype"])
        if kind == "added":
            continue
        if name not in base:
            raise ShapeMismatchError(
                f"{src}: tensor {name!r} is stored against the base ({kind}) but the base {base.source} has no such tensor; pass the base the delta was made against"
            )
        have = base.info(name).shape
        want = tuple(rec.get("base_shape") or shape)
        if have != want:
            field = "base_shape" if rec.get("base_shape") else "shape"
            raise ShapeMismatchError(
                f"{src}: tensor {name!r} has shape {list(have)} in the base {base.source}, but its record's {field} is {list(want)}; "
                "pass the base the delta was made against"
            )
        if shape and have and shape[0] > have[0]:
            bound = MAX_ROW_GROWTH * have[0] + MAX_ADDED_ROWS
            if shape[0] > bound:
                raise FormatError(
                    f"{src}: tensor {name!r}: its record's shape {list(shape)} grows the base's {have[0]} rows to {shape[0]}, more than the "
                    f"{bound} deltahub accepts ({MAX_ROW_GROWTH}x the base's rows + {MAX_ADDED_ROWS}); the delta is corrupted or hostile"
                )
    bound = MAX_DECODED_FACTOR * base.total_bytes() + delta_shard_bytes(reader)
    if decoded > bound:
        raise FormatError(
            f"{src}: the records of delta_config.json decode to {decoded} bytes, more than the {bound} deltahub accepts "
            f"({MAX_DECODED_FACTOR}x the base's {base.total_bytes()} bytes + the delta's shard bytes); the delta is corrupted or hostile"
        )
    problems = completeness_problems(reader)
    if problems:
        raise FormatError(f"{src}: {problems[0]}")


def completeness_problems(reader: DeltaReader) -> list[str]:
    """What makes the records no fine-tune (empty when none): no record decodes to a tensor
    (every one ``removed``, or none at all), or the records' names, dtypes and shapes differ
    from ``finetuned.fingerprint`` (spec §4.1) when the config has one, so that a truncated or
    edited tensors map is caught. ``verify`` reports these; ``apply`` and the loaders refuse
    them (:func:`check_records_against_base`)."""
    kept = [(n, r["dtype"], tuple(r["shape"])) for n, r in reader.records.items() if r["kind"] != "removed"]
    if not kept:
        return [f"{CONFIG_NAME} lists no tensor of the fine-tune ({len(reader.records)} record(s), none decodes to a tensor); the delta is empty or truncated"]
    recorded = (reader.config.get("finetuned") or {}).get("fingerprint")
    if recorded is not None and recorded != fingerprint(kept):
        return [f"{CONFIG_NAME}: the records' names, dtypes and shapes do not match finetuned.fingerprint {one_line(recorded, 20)}...; the tensors map was truncated or edited"]
    weights = (reader.config.get("finetuned") or {}).get("weights")
    if weights is not None:
        from .chain import recorded_weights

        if weights != recorded_weights(reader.records):
            return [f"{CONFIG_NAME}: the records' sha256 digests do not give finetuned.weights {weights[:19]}...; the tensors map was edited"]
    return []


# Characters that would move the cursor, recolour the terminal or reorder the text around them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def one_line(text: object, limit: int = 300) -> str:
    """Text deltahub did not write (an exception of transformers that quotes a config value, a
    field of a hostile file) made safe to put in a message: one line (line breaks become
    `` | ``), other control characters ``?``, at most ``limit`` characters.

    >>> one_line("a\\nb\\x1b[2J" + "x" * 400, 12)
    'a | b?[2J...'
    """
    flat = _CONTROL.sub("?", " | ".join(str(text).splitlines()))
    return flat if len(flat) <= limit else flat[: max(0, limit - 3)] + "..."


def repo_file(folder: str | os.PathLike, name: str, where: str) -> "os.PathLike | None":
    """``folder/name`` when the repo has it, ``None`` when it does not; confined to the repo
    (``limits.confined_file``). An entry that is there but is not a regular file (a FIFO, a
    device, a folder, a link to nothing) is refused with :class:`FormatError`: opening a FIFO
    blocks forever, and skipping it would let another file (the base's tokenizer) stand in for
    the delta's without a word."""
    path = confined_file(folder, name, where)
    if not os.path.lexists(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is None or not stat.S_ISREG(mode):
        what = "a link to nothing" if mode is None else "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise FormatError(f"{where}: {name} is {what}, not a regular file; the repo is corrupted or hostile: remove it or replace it with the file")
    return path


def check_model_size(cls: type, config, dtype, reader: DeltaReader, where: str) -> None:
    """Refuse (:class:`FormatError` naming ``where``) a config that describes a model larger
    than the delta's weights, before anything is allocated: ``cls`` is built from ``config`` on
    the meta device (transformers' own initialization, no memory), and its parameters and
    buffers, at the load ``dtype``, may take at most ``limits.MAX_DECODED_FACTOR`` x the bytes
    the records decode to (each at the wider of its dtype and ``dtype``) +
    ``limits.MAX_MODEL_SLACK_BYTES`` (buffers no record stores: rotary tables, causal masks).
    A config field that sizes a buffer (GPT-Neo's ``max_position_embeddings`` makes a P x P
    mask per layer) or a weight no record holds would otherwise allocate before the missing
    weights are noticed. Costs one build on the meta device (milliseconds to a second)."""
    load = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    load = load if isinstance(load, torch.dtype) else None
    try:
        with torch.device("meta"):
            model = cls._from_config(copy.deepcopy(config), **({"dtype": load} if load is not None else {}))
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on a hostile config
        raise FormatError(f"{where}: transformers cannot build the model it describes ({type(e).__name__}: {one_line(e)}); the config is corrupted or hostile") from None
    sizes = {n: t.numel() * t.element_size() for n, t in (*model.named_parameters(), *model.named_buffers())}
    width = load.itemsize if load is not None and load.is_floating_point else 0
    kept = [r for r in reader.records.values() if r["kind"] != "removed"]
    decoded = sum(math.prod(r["shape"]) * max(itemsize(r["dtype"]), width) for r in kept)
    bound = MAX_DECODED_FACTOR * decoded + MAX_MODEL_SLACK_BYTES
    total = sum(sizes.values())
    if total > bound:
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise FormatError(
            f"{where}: the model it describes holds {total} bytes of parameters and buffers ({', '.join(f'{n} {sizes[n]}' for n in largest)}), "
            f"more than the {bound} deltahub accepts for the delta's weights ({MAX_DECODED_FACTOR}x their {decoded} bytes + {MAX_MODEL_SLACK_BYTES}); "
            "the config does not describe these weights (corrupted or hostile)"
        )


def own_model_classes(config_class: type) -> dict[str, type]:
    """Name -> class of every model class transformers' auto mappings register for
    ``config_class`` (``MODEL_*MAPPING`` of ``transformers.models.auto.modeling_auto``), each a
    ``PreTrainedModel`` whose ``config_class`` is ``config_class``."""
    from transformers import PreTrainedModel
    from transformers.models.auto import modeling_auto

    out: dict[str, type] = {}
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if not (attr.startswith("MODEL_") and attr.endswith("MAPPING") and isinstance(mapping, modeling_auto._LazyAutoMapping)):
            continue
        try:
            found = mapping[config_class]
        except (KeyError, AttributeError, ImportError, ValueError):
            continue
        for cls in found if isinstance(found, (list, tuple)) else (found,):
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and issubclass(config_class, getattr(cls, "config_class", None) or type(None)):
                out[cls.__name__] = cls
    return out


def ignore_remote_code(model_kwargs: dict) -> None:
    """Drop ``trust_remote_code`` from the arguments for a model whose class and config the delta
    chose: deltahub builds transformers' own classes only, so the flag could only ever let the
    delta's config fetch and run another repo's code. Warns when it was set."""
    if model_kwargs.pop("trust_remote_code", None):
        warnings.warn(
            "trust_remote_code is ignored: deltahub builds the fine-tune with transformers' own model classes and never runs code "
            "from a Hub repo (the fine-tune's config comes with the delta and is not trusted)",
            UserWarning,
            stacklevel=3,
        )


def check_model_type(model_type: str, base: Checkpoint, where: str) -> None:
    """Refuse (:class:`FormatError`) a fine-tune whose ``model_type`` is not its base's, when the
    base has a ``config.json``: a fine-tune of a llama is a llama, and a delta that names another
    architecture would have transformers build code paths its weights were never made for."""
    base_cfg = base.config()
    theirs = base_cfg.get("model_type") if base_cfg else None
    if isinstance(theirs, str) and theirs != model_type:
        raise FormatError(
            f"{where}: field 'model_type' is {one_line(model_type, 60)!r}, but the base {base.source} is a {one_line(theirs, 60)!r} (its config.json); "
            "a fine-tune keeps its base's architecture. Pass the base the delta was made against, or verify_base=False (--no-verify-base) if this is intended"
        )


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (integer tensors always are): one read-only
    pass of ``torch.aminmax`` (see :func:`check_finite`)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(name: str, decoded: torch.Tensor | None, base: torch.Tensor | None, where: object) -> None:
    """Refuse (:class:`InvalidTensorError`) a decoded tensor with NaN or Inf where the base
    tensor is finite. A checksum does not protect the values (whoever can rewrite a shard can
    reseal its checksum), so every decode is checked: one pass of ``torch.aminmax``, whose
    minimum and maximum are finite only if every element is (NaN propagates); it reads the
    tensor without allocating and runs ~15x faster than ``isfinite().all()`` (2.7 against
    0.17 GB/s on bf16 here, benchmarks/README.md). Only when it fails are the positions
    compared with the base (rows at the same index, for a grown or shrunk dimension 0), since a
    base may hold non-finite weights of its own."""
    if decoded is None or all_finite(decoded):
        return
    bad = ~torch.isfinite(decoded)
    if base is not None and base.is_floating_point() and base.dim() == decoded.dim() and tuple(base.shape[1:]) == tuple(decoded.shape[1:]):
        if decoded.dim() == 0:
            bad &= torch.isfinite(base)
        else:
            n = min(decoded.shape[0], base.shape[0])
            bad[:n] &= torch.isfinite(base[:n])
    if not bool(bad.any()):
        return
    nan = int((bad & torch.isnan(decoded)).sum())
    inf = int(bad.sum()) - nan
    raise InvalidTensorError(
        f"{where}: tensor {name!r} decodes to {nan} NaN and {inf} Inf weight(s) where the base's are finite; the delta is corrupted or "
        "hostile (checksums do not catch a resealed file): download it again from a source you trust"
    )


def decode_checked(reader: DeltaReader, base: Checkpoint, name: str) -> torch.Tensor | None:
    """``reader.decode(name)`` against the base's tensor, refused by :func:`check_finite` if it
    turns a finite base weight into NaN or Inf. What ``apply`` and ``DeltaModel`` decode with."""
    with borrow_base(base, name) as b:
        t = reader.decode(name, b)
        check_finite(name, t, b if reader.record(name)["kind"] != "added" else None, getattr(reader, "source", reader.path))
    return t


def base_differences(reader: DeltaReader, base: Checkpoint, limit: int = 5) -> list[str]:
    """Human-readable differences between a base and the one the delta records (empty if it matches)."""
    recorded = reader.config.get("base", {})
    diffs: list[str] = []
    needed = {n: r for n, r in reader.records.items() if not (r["kind"] == "added")}
    if recorded.get("fingerprint") and recorded["fingerprint"] != base.fingerprint():
        for name, rec in needed.items():
            want = tuple(rec.get("base_shape", rec["shape"]))
            if name not in base:
                diffs.append(f"{name}: missing from the base")
            elif base.info(name).shape != want:
                diffs.append(f"{name}: shape {list(base.info(name).shape)} in the base, the delta expects {list(want)}")
            if len(diffs) >= limit:
                return diffs
        if not diffs:
            diffs.append("tensor names, dtypes or shapes differ from the recorded fingerprint")
        return diffs
    for name, digest in (recorded.get("samples") or {}).items():
        if name in base and base.sample_digest(name) != digest:
            diffs.append(f"{name}: same shape but other weights")
            if len(diffs) >= limit:
                break
    return diffs


def check_base(reader: DeltaReader, base: Checkpoint) -> None:
    """Raise :class:`BaseMismatchError` naming the differences if ``base`` is not the delta's
    base, or if the delta records no base fingerprint (then nothing tells its base apart)."""
    remedy = "Pass the right base, or verify_base=False (--no-verify-base) to load anyway."
    require_fingerprint(reader, base.source, remedy)
    raise_base_mismatch(reader, base.source, base_differences(reader, base), remedy)


def require_fingerprint(reader: DeltaReader, what: str, remedy: str) -> None:
    """Raise :class:`BaseMismatchError` if the delta records no ``base.fingerprint`` (spec
    §4.1): without it, any base of the same shapes would pass for the delta's base."""
    base = reader.config.get("base")
    if not isinstance(base, dict) or not base.get("fingerprint"):
        raise BaseMismatchError(
            f"{getattr(reader, 'source', reader.path)}: delta_config.json records no base.fingerprint, so deltahub cannot check that {what} is "
            f"the base this delta was made against. {remedy}"
        )


def raise_base_mismatch(reader: DeltaReader, what: str, diffs: list[str], remedy: str) -> None:
    """Raise :class:`BaseMismatchError` if there are ``diffs``: ``what`` is not the base the delta
    records (named with its pinned revision); ``remedy`` ends the message. One message for a
    base checkpoint and for a base model in memory."""
    if diffs:
        recorded = reader.config.get("base", {})
        want = recorded.get("name_or_path") or "unknown"
        if recorded.get("revision"):
            want += f"@{recorded['revision'][:12]}"
        raise BaseMismatchError(f"{what} is not the base this delta was made against ({want}): " + "; ".join(diffs) + ". " + remedy)


def read_finetuned_config(reader: DeltaReader) -> dict | None:
    """The delta's ``finetuned_config.json`` as a dict (``None`` without one), read through
    ``limits.confined_file`` and ``limits.read_json`` (size and nesting bounded) and checked
    before anything is built from it: a JSON object whose layer counts (``limits.LAYER_FIELDS``,
    at any depth: ``text_config.num_hidden_layers`` too) are integers no larger than the number
    of transformer blocks the records name. A config declaring 10^6 layers would otherwise make
    transformers build them all. Errors are :class:`FormatError` naming the file and field."""
    where = f"{getattr(reader, 'source', reader.path)}/{FINETUNED_CONFIG_NAME}"
    path = repo_file(reader.path, FINETUNED_CONFIG_NAME, where)
    if path is None:
        return None
    data = read_json(path, where)
    if not isinstance(data, dict):
        raise FormatError(f"{where} is not a JSON object; the delta is corrupted")
    check_layer_counts(data, count_blocks(n for n, r in reader.records.items() if r["kind"] != "removed"), where)
    return data


def count_blocks(names) -> int:
    """How many distinct transformer blocks (``format.repo.layer_group``) tensor names name."""
    # "." first: a bare model's names ("layers.3.mlp...") have no prefix before the block.
    return len({g for n in names if (g := layer_group("." + n))})


def check_layer_counts(data: dict, blocks: int, where: str) -> None:
    """Refuse (:class:`FormatError`) a config dict whose layer counts (``limits.LAYER_FIELDS``,
    in sub-configs too) are not integers or exceed ``blocks``, the blocks its weights hold."""
    for field, value in _layer_counts(data):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"{where}: '{field}' must be a non-negative integer, got {value!r}; the delta is corrupted")
        if value > blocks:
            raise FormatError(
                f"{where}: '{field}' is {value}, but the delta's records name {blocks} transformer block(s); the config does not "
                "describe these weights (corrupted or hostile)"
            )


def _layer_counts(config: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted field, value)`` of every layer-count field of a config and its sub-configs."""
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _layer_counts(value, f"{prefix}{key}.")
        elif isinstance(key, str) and LAYER_FIELDS.match(key):
            yield f"{prefix}{key}", value
