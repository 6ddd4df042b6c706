"""Versions stored against their parent (spec/FORMAT.md §4.4): a chain member's records decode
against the weights its parent version decodes to, not against the base.

A training run keeps a version every few hundred steps; between two nearby versions most bf16
values do not change at all, so a bit-exact (``lossless``) delta against the previous version is
far smaller than one against the base. A *keyframe* is an ordinary delta against the base; a
*chain member* names its parent (``parent``: where to find it, and the SHA-256 of the weights it
decodes to) and stands on at most ``MAX_CHAIN_DEPTH`` parents down to a keyframe.

Every delta deltahub writes records the SHA-256 of each decoded tensor (``sha256`` in its
record) and of the whole decoded model (``finetuned.weights``), so a parent is checked twice:
its recorded weights digest must be the one its child names before anything is decoded, and
each parent tensor must hash to its record's digest as it is decoded. A parent that is missing,
another delta, or corrupted is refused (:class:`MissingParentError`, :class:`ChainError`) and
nothing is loaded or written.

    >>> import torch
    >>> tensor_sha256(torch.zeros(2, dtype=torch.bfloat16))[:12]
    'df3f619804a9'
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch

from .checkpoint import CheckpointError, TensorInfo, sample_digest
from .errors import DeltahubError
from .format import CONFIG_NAME
from .format.config import MAX_CHAIN_DEPTH, fingerprint

# The delta_config.json bytes of all the parents one load reads, together: each is bounded
# (limits.MAX_CONFIG_BYTES), and so is their sum, since every parent's config stays in memory.
# Parsing JSON takes up to ~30x its bytes in Python objects, so the bound is tight: a real
# model's config is ~300 bytes a tensor (0.2 MB for a 7B model, a few MB for a large MoE).
MAX_CHAIN_CONFIG_BYTES = 64 << 20

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .format import DeltaReader
    from .sources import HubOptions


class ChainError(DeltahubError):
    """A chain member cannot be decoded: its parent is another delta, corrupted, or too deep."""


class MissingParentError(ChainError, CheckpointError):
    """A chain member's parent version cannot be found (a local folder that moved, a Hub commit
    that is gone or not cached offline)."""


def tensor_sha256(t: torch.Tensor) -> str:
    """Lowercase hex SHA-256 of a tensor's bytes as stored (little-endian, row-major), the
    ``sha256`` of its record (spec §5.1)."""
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def weights_digest(entries: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """``"sha256:<hex>"`` of the sorted lines ``name\\tDTYPE\\t[d0,...]\\tSHA256\\n`` of a decoded
    model's tensors: ``finetuned.weights`` (spec §4.4), which names a version's weights exactly.

    >>> weights_digest([("w", "BF16", (2,), "00" * 32)])[:15]
    'sha256:803c5807'
    """
    h = hashlib.sha256()
    for name, dtype, shape, sha in sorted(entries):
        h.update(f"{name}\t{dtype}\t[{','.join(str(d) for d in shape)}]\t{sha}\n".encode())
    return "sha256:" + h.hexdigest()


def recorded_weights(records: Mapping[str, dict]) -> str | None:
    """The weights digest records give (``None`` if a record lacks its ``sha256``, as in repos
    written before format 1.1): what ``finetuned.weights`` must be."""
    entries = []
    for name, r in records.items():
        if r["kind"] == "removed":
            continue
        if "sha256" not in r:
            return None
        entries.append((name, r["dtype"], tuple(r["shape"]), r["sha256"]))
    return weights_digest(entries)


def parent_of(reader: "DeltaReader") -> dict | None:
    """The ``parent`` object of a chain member (``None`` for a keyframe)."""
    return reader.config.get("parent")


def is_parent_config(cfg: Mapping, parent: Mapping) -> bool:
    """Whether a version's config is the one a child's ``parent`` names: the weights it decodes
    to, and one version fewer below it. What every reader checks before it fetches a parent's
    shards."""
    return (cfg.get("finetuned") or {}).get("weights") == parent.get("weights") and (cfg.get("parent") or {}).get("depth", 0) == parent.get("depth", 0) - 1


def depth_of(reader: "DeltaReader") -> int:
    """How many parents stand below this version (0 for a keyframe)."""
    parent = parent_of(reader)
    return 0 if parent is None else parent["depth"]


class ParentWeights:
    """A parent version's decoded weights, read like a :class:`~deltahub.Checkpoint` (the
    reference a chain member's records decode against): each tensor decoded from the parent
    delta against *its* reference when asked for, and refused unless it hashes to the parent
    record's ``sha256``. Nothing is decoded until a tensor is asked for."""

    def __init__(self, reader: "DeltaReader", reference: "Checkpoint | ParentWeights", source: str) -> None:
        self.reader = reader
        self.reference = reference
        self.source = source
        self.path = Path(reader.path)
        self.revision = getattr(reader, "commit", None)
        self._info = {n: TensorInfo(r["dtype"], tuple(r["shape"])) for n, r in reader.records.items() if r["kind"] != "removed"}

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    @contextmanager
    def borrow(self, name: str) -> Iterator[torch.Tensor]:
        yield self.get(name)

    def get(self, name: str) -> torch.Tensor:
        """The parent's tensor ``name``, decoded and checked against its recorded SHA-256."""
        from .sources import decode_checked

        if name not in self._info:
            raise KeyError(f"{self.source} has no tensor {name!r}")
        t = decode_checked(self.reader, self.reference, name)
        if tensor_sha256(t) != self.reader.records[name]["sha256"]:
            raise ChainError(
                f"{self.source}: tensor {name!r} of this parent version decodes to other bits than its record's sha256 says: the base "
                "given for the chain's keyframe is not its base (check --base), or the parent is corrupted (download it again: deltahub pull)"
            )
        return t

    def input_paths(self) -> list[Path]:
        """Every folder this chain reads: each parent version down to the keyframe, and the
        keyframe's base (an output must not land on any of them)."""
        below = self.reference.input_paths() if isinstance(self.reference, ParentWeights) else [getattr(self.reference, "path", None)]
        return [self.path, *(p for p in below if p is not None)]

    def sample_digest(self, name: str) -> str:
        return sample_digest(self.get(name))

    def fingerprint(self) -> str:
        return fingerprint((n, i.dtype, i.shape) for n, i in self._info.items())

    def file(self, relpath: str) -> Path | None:
        """A file of the parent repo (tokenizer, generation config), else of its reference."""
        from .sources import repo_file

        return repo_file(self.path, relpath, "the parent delta repo") or self.reference.file(relpath)

    def config(self) -> dict | None:
        """The root base's ``config.json`` (a chain shares its base's architecture)."""
        return self.reference.config()

    def total_bytes(self) -> int:
        from .format.dtypes import itemsize

        return sum(itemsize(i.dtype) * math.prod(i.shape) for i in self._info.values())


def validate_records(records: Mapping, where: str) -> None:
    """Every record checked (:func:`records.validate_record`) before any code reads its fields."""
    from .errors import FormatError
    from .format.records import validate_record

    for name, record in records.items():
        try:
            validate_record(name, record)
        except FormatError as e:
            raise type(e)(f"{where}: {e}") from None


def check_chain_records(reader: "DeltaReader", parent: "ParentWeights") -> None:
    """A chain member's records against its parent (spec §4.4): exactly the parent's tensors,
    each of the parent tensor's shape and dtype, none ``added``, ``removed`` or with a
    ``base_shape``. So a chain never grows what it decodes: each level is bounded by the
    keyframe's own bounds, not twice the level below."""
    src = getattr(reader, "source", str(reader.path))
    check_same_names(parent, [n for n, r in reader.records.items() if r["kind"] != "removed"], src)
    for name, r in reader.records.items():
        info = parent.info(name) if name in parent else None
        if r["kind"] in ("added", "removed") or "base_shape" in r or info is None or tuple(r["shape"]) != tuple(info.shape) or r["dtype"] != info.dtype:
            raise ChainError(
                f"{src}: tensor {name!r} is a {r['kind']} record of {r['dtype']} {list(r['shape'])} against a parent tensor of "
                f"{info.dtype + ' ' + str(list(info.shape)) if info else 'none'}; a version stored against its parent keeps every tensor's "
                "name, shape and dtype (spec §4.4). The repo is corrupted or hostile"
            )


def open_parent(
    reader: "DeltaReader", base: str | os.PathLike | None, base_revision: str | None, hub: "HubOptions", *, verify: bool, seen: int = 0,
    config_bytes: int = 0,
) -> ParentWeights:
    """The decoded weights ``reader``'s records stand on: its parent version, opened where
    ``parent`` says (a local folder or a Hub repo at a commit) and checked to be the version the
    child was made against (``parent.weights``), on its own reference down to a keyframe, whose
    base is ``base`` when given (else the one it records)."""
    from .sources import open_base, open_delta

    src = getattr(reader, "source", str(reader.path))
    parent = reader.config["parent"]
    name, revision = parent["name_or_path"], parent.get("revision")
    if seen + parent["depth"] > MAX_CHAIN_DEPTH:
        raise ChainError(f"{src}: the chain below this version is deeper than {MAX_CHAIN_DEPTH} versions; the repo is corrupted or hostile")
    where = f"{name}@{revision}" if revision else name
    fix = "pull the version history again, or re-compress this version against the base (a keyframe: deltahub compress without --parent)"
    if is_local_parent(name):
        if from_hub(reader):
            raise MissingParentError(
                f"{src}: a version downloaded from the Hub names a local folder ({name}) as its parent; only a Hub parent is followed "
                "for it (a repo must not make deltahub read this machine's folders). The repo is broken or hostile"
            )
        folder = local_parent_path(reader.path, name)
        if not folder.is_dir():
            raise MissingParentError(
                f"{src}: its parent version is the local folder {name} ({folder}), which is not there (moved or deleted). If it moved, "
                f"record where it is now: `deltahub set-parent {src} NEW_PATH_OR_REPO@REV`; else re-compress this version against the base"
            )
        from .sources import repo_file

        cfg_path = repo_file(folder, CONFIG_NAME, f"the parent {folder}")  # a FIFO or a link out refused, never opened
        if cfg_path is not None:
            _check_size(cfg_path, MAX_CHAIN_CONFIG_BYTES - config_bytes, src)  # before it is parsed
        name = str(folder)
    else:
        # A Hub parent: its config alone first (one small download), checked, before the
        # shards are fetched; a parent that is some other repo costs nothing more.
        cfg, _, _, _ = _parent_config(name, revision, hub, MAX_CHAIN_CONFIG_BYTES - config_bytes)
        if not is_parent_config(cfg, parent):
            raise ChainError(f"{src}: {where} decodes to other weights than the version this one was made against (or stands on another number of versions); it is not its parent. {fix}")
    try:
        parent_reader = open_delta(name, revision, hub)
    except (CheckpointError, DeltahubError) as e:
        raise MissingParentError(f"{src}: its parent version {where} cannot be opened ({e}); {fix}") from None
    parent_src = getattr(parent_reader, "source", where)
    parent_reader.source = f"{where} (parent of {src})"  # type: ignore[attr-defined]
    config_bytes += (Path(parent_reader.path) / CONFIG_NAME).stat().st_size
    if config_bytes > MAX_CHAIN_CONFIG_BYTES:
        raise ChainError(f"{src}: the configs of its chain hold more than {MAX_CHAIN_CONFIG_BYTES >> 20} MiB together; the repo is corrupted or hostile")
    validate_records(parent_reader.records, parent_reader.source)
    have = (parent_reader.config.get("finetuned") or {}).get("weights")
    if have is None or have != recorded_weights(parent_reader.records):
        raise ChainError(
            f"{src}: its parent {parent_src} records no weights digest matching its records (finetuned.weights in {CONFIG_NAME}); "
            f"it is not a version this deltahub can stand on, or it is corrupted; {fix}"
        )
    if have != parent["weights"]:
        raise ChainError(
            f"{src}: its parent {parent_src} decodes to other weights ({have[:19]}…) than the version this one was made against "
            f"({parent['weights'][:19]}…): {where} is another version; {fix}"
        )
    if depth_of(parent_reader) != parent["depth"] - 1:
        raise ChainError(f"{src}: parent.depth is {parent['depth']} but its parent stands on {depth_of(parent_reader)} version(s); the repo is corrupted or hostile")
    reference = open_base(parent_reader, base, base_revision, hub, verify=verify, _seen=seen + 1, _config_bytes=config_bytes)
    return ParentWeights(parent_reader, reference, parent_reader.source)


def check_same_names(parent: Mapping[str, TensorInfo] | ParentWeights, names: Iterable[str], where: str) -> None:
    """A chain member has exactly its parent's tensors (a version that adds or drops one is a keyframe)."""
    have, want = set(parent), set(names)
    if have != want:
        diff = sorted(have ^ want)[:3]
        raise ChainError(f"{where}: a version stored against its parent must have exactly the parent's tensors, but {diff} differ; "
                         "compress it against the base instead (a keyframe)")


class _CheckedMemory:
    """The parent's weights given in memory (``compress(parent_weights=...)``), each tensor
    checked against the parent record's ``sha256`` the first time it is read: what a training
    loop holds is then known to be exactly what the parent decodes to."""

    def __init__(self, state: Mapping[str, torch.Tensor], records: Mapping[str, dict], source: str) -> None:
        from .memory import MemoryCheckpoint

        self._mem = MemoryCheckpoint.from_state_dict(state)
        self._records = records
        self._checked: set[str] = set()
        self.source = source
        self.path = None
        self.revision = None

    def __getattr__(self, attr: str):
        return getattr(self._mem, attr)

    def __contains__(self, name: str) -> bool:
        return name in self._mem

    def __iter__(self) -> Iterator[str]:
        return iter(self._mem)

    @contextmanager
    def borrow(self, name: str) -> Iterator[torch.Tensor]:
        with self._mem.borrow(name) as t:
            if name not in self._checked:
                if tensor_sha256(t) != self._records[name].get("sha256"):
                    raise ChainError(
                        f"parent_weights[{name!r}] is not the tensor the parent version {self.source} decodes to (its record's sha256); "
                        "pass the weights of the version you compress against, or leave parent_weights out to decode the parent"
                    )
                self._checked.add(name)
            yield t

    def get(self, name: str) -> torch.Tensor:
        with self.borrow(name) as t:
            return t.clone()


def _check_size(path: Path, max_bytes: int | None, where: str) -> None:
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise ChainError(f"{where}: the configs of this chain hold more than {MAX_CHAIN_CONFIG_BYTES >> 20} MiB together; the repo is corrupted or hostile")


def is_local_parent(name: str) -> bool:
    """Whether ``parent.name_or_path`` names a local folder (an absolute path, or a path relative
    to the child's folder written ``./...`` or ``../...``) rather than a Hub repo id."""
    return os.path.isabs(name) or name.startswith(("./", "../")) or name in (".", "..")


def local_parent_path(child: str | os.PathLike, name: str) -> Path:
    """The folder a local ``parent.name_or_path`` names: absolute as is, relative to the child's folder."""
    return Path(name) if os.path.isabs(name) else Path(child) / name


def from_hub(reader: "DeltaReader") -> bool:
    """Whether the delta was read from the Hub (a cache snapshot, or opened by repo id)."""
    from .checkpoint import cached_snapshot

    # huggingface_hub marks a folder filled by snapshot_download(local_dir=...) (deltahub pull
    # --local-dir) with .cache/huggingface/: a downloaded version too.
    return getattr(reader, "commit", None) is not None or cached_snapshot(reader.path) is not None or (Path(reader.path) / ".cache" / "huggingface").is_dir()


def recorded_local_name(parent: Path, child: Path) -> str:
    """How a local parent is recorded: relative to the child's folder when the two are siblings
    (or the parent lies under the child's parent folder), so that a run's folder can move as a
    whole; else the absolute path."""
    parent, child = Path(os.path.realpath(parent)), Path(os.path.realpath(child))
    rel = os.path.relpath(parent, child)
    if rel.startswith("../") and not rel[3:].startswith("../"):
        return rel
    return str(parent)


def _parent_config(parent: str | os.PathLike, revision: str | None, hub: "HubOptions", max_bytes: int | None = None) -> tuple[dict, str, str | None, bool]:
    """``(delta_config, name_or_path to record, commit, is_local)`` of a parent version, reading
    its config only (a Hub parent: one small download); a config above ``max_bytes`` is refused
    before it is parsed."""
    from .format.config import read_config
    from .format.limits import confined_file

    path = Path(parent).expanduser()
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{path} is a local folder; parent_revision ({revision!r}) only applies to a parent on the Hub")
        if not path.is_dir():
            raise CheckpointError(f"the parent {path} is a file; pass the folder of the parent version's delta")
        from .sources import repo_file

        cfg_path = repo_file(path, CONFIG_NAME, f"the parent {path}")  # a FIFO or a link out refused, never opened
        if cfg_path is None:
            raise MissingParentError(f"the parent {path} has no {CONFIG_NAME}: it is not a deltahub delta repo")
        _check_size(cfg_path, max_bytes, str(path))
        cfg = read_config(cfg_path, f"{path}/{CONFIG_NAME}")
        validate_records(cfg["tensors"], str(path))
        from .checkpoint import cached_snapshot

        snapshot = cached_snapshot(path)  # a pulled version: recorded as its repo and commit, not this cache's path
        if snapshot is not None:
            return cfg, snapshot.repo_id, snapshot.revision, True
        return cfg, str(path.resolve()), None, True
    repo_id = str(parent)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise MissingParentError(f"the parent {repo_id} is neither an existing folder nor a Hub repo id like 'user/run'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from huggingface_hub.errors import HFValidationError

    try:
        local = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **hub.kwargs()))
    except (RevisionNotFoundError, RepositoryNotFoundError, EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as e:
        raise MissingParentError(f"the parent {repo_id}@{revision} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    _check_size(local, max_bytes, f"{repo_id}@{revision}")
    cfg = read_config(local, f"{repo_id}@{revision}: {CONFIG_NAME}")
    validate_records(cfg["tensors"], f"{repo_id}@{revision}")
    commit = local.parent.name if len(local.parent.name) == 40 else revision
    return cfg, repo_id, commit, False


def parent_reference(
    parent: str | os.PathLike, revision: str | None, weights: Mapping[str, torch.Tensor] | None, base: str | os.PathLike | None,
    base_revision: str | None, hub: "HubOptions", out_dir: str | os.PathLike | None = None,
) -> tuple["Checkpoint | ParentWeights | _CheckedMemory", dict, dict]:
    """For ``compress(parent=...)``: ``(reference, parent record, base identity)``. The reference
    is the parent's decoded weights: ``weights`` when given (checked tensor by tensor against the
    parent's records), else decoded from the parent version; the parent record is what the child's
    ``parent`` field holds; the base identity (``name_or_path``, ``revision``, ``id_checked``) is
    the chain's keyframe's, carried down the chain."""
    from .format import DeltaReader
    from .sources import open_base, open_delta

    cfg, name, commit, local = _parent_config(parent, revision, hub)
    where = f"{name}@{commit}" if commit else name
    have = (cfg.get("finetuned") or {}).get("weights")
    if have is None or have != recorded_weights(cfg["tensors"]):
        raise ChainError(
            f"the parent {where} records no weights digest matching its records (finetuned.weights, written by deltahub 0.2 and later); "
            "re-compress it with this deltahub, or compress this version against the base"
        )
    depth = (cfg.get("parent") or {}).get("depth", 0) + 1
    if depth > MAX_CHAIN_DEPTH:
        raise ChainError(f"the parent {where} already stands on {depth - 1} versions, the most a chain may hold; compress this version against the base (a keyframe)")
    if weights is not None:
        reference = _CheckedMemory(weights, cfg["tensors"], where)
    else:
        reader = DeltaReader(Path(parent)) if local else open_delta(name, commit, hub)
        reader.check_shards = True  # its decodes are this version's parent weights
        reader.source = where  # type: ignore[attr-defined]
        reference = ParentWeights(reader, open_base(reader, base, base_revision, hub, verify=True), where)
    check_same_names(reference, [n for n, r in cfg["tensors"].items() if r["kind"] != "removed"], f"the parent {where}")
    if local and weights is not None:
        # No output may land on any folder of the chain, though none is decoded here.
        reference.chain_folders = local_chain_folders(Path(parent), hub)  # type: ignore[union-attr]
    if local and commit is None and out_dir is not None:
        name = recorded_local_name(Path(name), Path(out_dir))
    record = {"name_or_path": name, "revision": commit, "weights": have, "depth": depth}
    root = {k: v for k, v in (cfg.get("base") or {}).items() if k in ("name_or_path", "revision", "id_checked")}
    return reference, record, root


def set_parent(
    delta_dir: str | os.PathLike, parent: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
    local_files_only: bool = False,
) -> dict:
    """Record where the parent version of the chain member in ``delta_dir`` is now (a local folder
    that moved, or the same version pushed to the Hub: ``parent="ORG/NAME"``, ``revision`` a tag
    or commit), without recompressing. The new parent must decode to exactly the weights the
    member was made against (``parent.weights``) and stand on one version less; otherwise
    :class:`ChainError` and nothing changes. ``delta_config.json`` (its totals recounted) and the
    card are rewritten by atomic renames. Returns the new ``parent`` object.

    Example::

        deltahub.chain.set_parent("runs/v2", "me/run-42", revision="v1")   # then deltahub.push("runs/v2", "me/run-42")
    """
    from .base_id import _replace
    from .card import render_card
    from .format import DeltaReader
    from .format.limits import confined_file
    from .format.repo import _cache_repo, config_text
    from .sources import HubOptions, delta_shard_bytes

    path = Path(delta_dir)
    cache = _cache_repo(Path(os.path.realpath(path)))
    if cache is not None:
        raise ChainError(f"{path} lies inside the Hugging Face cache ({cache}); rewriting it would change the cached files. Copy it out first (deltahub pull REPO --local-dir DIR)")
    reader = DeltaReader(path)
    old = parent_of(reader)
    if old is None:
        raise ChainError(f"{path} is a keyframe (stored against the base), not a version stored against a parent: it has no parent to set")
    cfg, name, commit, local = _parent_config(parent, revision, HubOptions(token, None, local_files_only))
    where = f"{name}@{commit}" if commit else name
    have = (cfg.get("finetuned") or {}).get("weights")
    if have is None or have != recorded_weights(cfg["tensors"]) or have != old["weights"]:
        raise ChainError(f"{where} decodes to other weights than the parent {path} was made against ({old['weights'][:19]}…); nothing was changed")
    if (cfg.get("parent") or {}).get("depth", 0) != old["depth"] - 1:
        raise ChainError(f"{where} stands on another number of versions than {path}'s parent did; nothing was changed")
    if local and commit is None:
        name = recorded_local_name(Path(name), path)
    new = {**old, "name_or_path": name, "revision": commit}
    full = {**reader.config, "parent": new}
    index = confined_file(path, "delta.safetensors.index.json", f"{path}: index")
    _replace(path, CONFIG_NAME, config_text(full, delta_shard_bytes(reader) + index.stat().st_size).encode())
    _replace(path, "README.md", render_card(full).encode())
    return new


def chain_inputs(ckpt: object) -> list[Path]:
    """The folders an output must not touch when ``ckpt`` is a chain's reference (every parent
    down to the keyframe, and its base); empty for a plain checkpoint (its path is listed by the caller)."""
    if isinstance(ckpt, ParentWeights):
        return ckpt.input_paths()
    return list(getattr(ckpt, "chain_folders", []))


def local_chain_folders(folder: Path, hub: "HubOptions") -> list[Path]:
    """The local folders of the chain that starts at ``folder``: each local parent, and the
    keyframe's base when it is a local folder, from their configs alone (nothing decoded)."""
    out: list[Path] = []
    budget = MAX_CHAIN_CONFIG_BYTES
    for _ in range(MAX_CHAIN_DEPTH + 1):
        out.append(folder)
        cfg, _, _, _ = _parent_config(folder, None, hub, budget)
        budget -= (folder / CONFIG_NAME).stat().st_size
        parent = cfg.get("parent")
        if parent is None:
            base = (cfg.get("base") or {}).get("name_or_path")
            if isinstance(base, str) and os.path.isabs(base):
                out.append(Path(base))
            return out
        if not is_local_parent(parent["name_or_path"]):
            return out  # the rest is on the Hub: in the cache, where no output may go anyway
        folder = local_parent_path(folder, parent["name_or_path"])
        if not folder.is_dir():
            return out
    raise ChainError(f"{out[0]}: the chain below it is deeper than {MAX_CHAIN_DEPTH} versions")
