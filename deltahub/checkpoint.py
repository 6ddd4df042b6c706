"""Lazy, tensor-at-a-time access to safetensors checkpoints in local folders or on the Hub.

Nothing is read until a tensor is asked for, and then only that tensor, through a memory map
whose pages are given back after use, so memory stays near the tensors in use, not the model
(the lazy approach mergekit takes).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import DeltahubError, FormatError
from .format.config import TOKENIZER_FILES, fingerprint as _fingerprint
from .format.dtypes import itemsize
from .format.limits import MAX_INDEX_BYTES, confined_file, read_json
from .format.safetensors_stream import MappedSafetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
MODEL_FILE_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def sample_digest(t: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """The spec's sample digest (spec/FORMAT.md §4.2): 16 hex digits of SHA-256 over the bytes
    of the first and last rows (dimension 0) of a tensor, or of the whole tensor below 2
    dimensions or with at most 2 rows; in ``dtype`` if given (default its own), on any device.
    Two rows are enough to tell another model of the same shapes apart, and reading them costs
    almost nothing.

    >>> sample_digest(torch.arange(12, dtype=torch.bfloat16).reshape(4, 3))
    'a569e6875dd172c1'
    """
    t = t.detach()
    if t.dim() >= 2 and t.shape[0] > 2:
        # Hashing the two rows one after the other equals hashing their concatenation.
        t = torch.cat([t[:1], t[-1:]])
    t = t.to(device="cpu", dtype=dtype or t.dtype).contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class CheckpointError(DeltahubError, ValueError):
    """A checkpoint cannot be used: missing, pickle-only, or without safetensors weights."""


class DownloadError(CheckpointError):
    """Downloading a checkpoint from the Hub failed (an HTTP error): possibly transient."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@contextmanager
def borrow_base(base: "Checkpoint", name: str) -> Iterator[torch.Tensor | None]:
    """``base.borrow(name)``, or ``None`` for a tensor the base does not have (an added one)."""
    if name not in base:
        yield None
        return
    with base.borrow(name) as t:
        yield t


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
) -> tuple[Path, str | None]:
    """A local folder for a path or Hub repo id, and the commit hash when it came from a Hub.

    Hub downloads go through ``huggingface_hub.snapshot_download``, so they honour the
    standard cache, ``HF_TOKEN``/saved logins, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds the checkpoint")
        if revision is not None:
            raise CheckpointError(f"{path} is a local folder; a revision ({revision!r}) only applies to Hub repos")
        return path, None
    repo_id = str(name_or_path)
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{repo_id} is neither an existing folder nor a Hub repo id like 'user/model'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=allow_patterns or MODEL_FILE_PATTERNS,
        )
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id[:120]!r} is neither an existing folder nor a valid Hub repo id ({str(e).splitlines()[0][:160]})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}; list its branches and tags with `deltahub log {repo_id}`") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} is not a local folder and no Hub repo of that name is visible (check the name, or log in for private repos)") from None
    except LocalEntryNotFoundError:
        # Raised both when downloads are off and when the Hub cannot be reached: say which, and
        # whether the repo is cached at another revision (then the revision is what is missing).
        from huggingface_hub import constants

        missing = _missing_from_cache(repo_id, revision, cache_dir)
        if local_files_only or constants.HF_HUB_OFFLINE:
            off = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            raise CheckpointError(f"{missing} and downloads are off ({off}); allow downloads once to fetch it") from None
        raise CheckpointError(f"{missing} and {constants.ENDPOINT} cannot be reached; check the network (or HF_ENDPOINT), or pass a local folder") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"downloading {repo_id} failed: {e}") from None
    local_path = Path(local)
    commit = local_path.name if _HEX40.match(local_path.name) else None
    return local_path, commit


def _missing_from_cache(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> str:
    """What is missing from the local cache: the repo, or only the revision of a cached repo
    (with the revisions the cache holds, so the user can pick one)."""
    from huggingface_hub import constants

    folder = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    try:
        snapshots = sorted(p.name for p in (folder / "snapshots").iterdir() if _HEX40.match(p.name))
        refs = sorted(p.name for p in (folder / "refs").iterdir() if p.is_file()) if (folder / "refs").is_dir() else []
    except OSError:
        return f"{repo_id} is not in the local cache"
    if not snapshots:
        return f"{repo_id} is not in the local cache"
    have = ", ".join(refs + [s[:12] for s in snapshots][:5]) or "none"
    return f"the revision {revision or 'main'} of {repo_id} is not in the local cache (the cache holds {repo_id} at: {have})"


@dataclass(frozen=True)
class HubRef:
    """A Hub repo id and the commit (or other revision) it is pinned to."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


# A repo folder of the Hugging Face cache ("models--org--name"; the cache writes "/" as "--").
_CACHE_MODEL = re.compile(r"^models--([A-Za-z0-9][\w.-]*?)(?:--([A-Za-z0-9][\w.-]*))?$")


def cached_snapshot(path: str | os.PathLike) -> HubRef | None:
    """The Hub repo and commit of a folder that is a snapshot of a Hugging Face cache
    (``.../models--ORG--NAME/snapshots/<40 hex>``, what ``snapshot_download`` returns), or
    ``None`` for any other folder (a subfolder of a snapshot included: its repo id alone would
    not find it). Links are followed, so a link to a snapshot counts as the snapshot.

    >>> cached_snapshot("/h/hub/models--Qwen--Qwen2.5-0.5B/snapshots/" + "a" * 40)
    HubRef(repo_id='Qwen/Qwen2.5-0.5B', revision='aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
    >>> cached_snapshot("/data/my-model") is None
    True
    """
    p = Path(os.path.realpath(Path(path).expanduser()))
    repo = _CACHE_MODEL.match(p.parent.parent.name)
    if p.parent.name != "snapshots" or not _HEX40.match(p.name) or repo is None:
        return None
    return HubRef("/".join(g for g in repo.groups() if g), p.name)


class Checkpoint:
    """A safetensors checkpoint (single file or sharded with an index), read lazily.

    >>> import tempfile, torch; from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp(); save_file({"w": torch.ones(2, 3)}, f"{d}/model.safetensors")
    >>> ckpt = Checkpoint.open(d)
    >>> ckpt.names(), ckpt.info("w")
    (['w'], TensorInfo(dtype='F32', shape=(2, 3)))
    """

    def __init__(self, path: Path, revision: str | None = None, source: str | None = None) -> None:
        self.path = path
        self.revision = revision
        self.source = source or str(path)
        self._files = self._find_files()
        self._handles: dict[Path, MappedSafetensors] = {}
        self._lock = threading.Lock()
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        for f in self._files:
            h = self._handle(f)
            for key in h.keys():
                if key in self._where:
                    raise FormatError(f"tensor {key!r} appears in both {self._where[key].name} and {f.name}")
                self._where[key] = f
        for key, f in self._where.items():
            self._info[key] = TensorInfo(*self._handle(f).info(key))

    @classmethod
    def open(cls, name_or_path: str | os.PathLike, **kwargs) -> "Checkpoint":
        """Open a local folder or Hub repo id (``revision``, ``token``, ``cache_dir``, ``local_files_only``)."""
        path, commit = resolve(name_or_path, **kwargs)
        return cls(path, commit, str(name_or_path))

    def _confined(self, relpath: str, where: str) -> Path:
        """``path/relpath`` if it is a plain name whose file, links followed, stays inside the
        checkpoint folder (``limits.confined_file``; a Hub cache snapshot's blobs count as
        inside). A base from the Hub is untrusted input like a delta. The message is the same
        whether or not a target outside exists."""
        try:
            return confined_file(self.path, relpath, where)
        except FormatError:
            raise CheckpointError(
                f"{self.source}: {where} names {relpath!r}, which is not a file inside the checkpoint folder (deltahub follows no link "
                "out of it); the checkpoint is corrupted or hostile: download it again from a source you trust"
            ) from None

    def _find_files(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file() or index.is_symlink():
            where = f"{self.source}/{SAFETENSORS_INDEX}"
            data = read_json(self._confined(SAFETENSORS_INDEX, SAFETENSORS_INDEX), where, max_bytes=MAX_INDEX_BYTES)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise FormatError(f"{where}: 'weight_map' must be an object mapping tensor names to shard file names; the checkpoint is corrupted")
            # Every shard the index names must be a plain file name inside the folder: a Hub repo is
            # free to write "../../x" there.
            files = sorted({self._confined(f, f"{SAFETENSORS_INDEX} weight_map") for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{self.source}: shard(s) {missing} named in {SAFETENSORS_INDEX} are missing; download the checkpoint again")
            return files
        files = sorted(self._confined(p.name, "the folder") for p in self.path.glob("*.safetensors") if not p.name.startswith("delta-"))
        odd = [f.name for f in files if not f.is_file()]  # a FIFO or device would block the read forever
        if odd:
            raise CheckpointError(f"{self.source}: {odd[0]} is not a regular file; the checkpoint is corrupted or hostile")
        if files:
            return files
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.source} holds only pickle weights ({', '.join(pickles)}); deltahub reads safetensors only, since pickles can run code. "
                "Convert once with: python -c \"from transformers import AutoModel; "
                f"AutoModel.from_pretrained('{self.source}').save_pretrained('OUT_DIR')\""
            )
        raise CheckpointError(f"{self.source} has no *.safetensors weights")

    def _handle(self, f: Path):
        with self._lock:
            if f not in self._handles:
                try:
                    self._handles[f] = MappedSafetensors(f)
                except OSError as e:
                    raise FormatError(f"{f} cannot be read ({e})") from None
            return self._handles[f]

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard), which keeps reads sequential."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor into memory of its own (its memory goes when the tensor does)."""
        with self.borrow(name) as t:
            return t.clone()

    @contextmanager
    def borrow(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor as a read-only view of the file's pages for the ``with`` block, which
        then leave this process's memory: no copy, and nothing resident afterwards.

        >>> import tempfile, torch; from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp(); save_file({"w": torch.ones(2, 3)}, f"{d}/model.safetensors")
        >>> with Checkpoint.open(d).borrow("w") as w: float(w.sum())
        6.0
        """
        try:
            f = self._where[name]
        except KeyError:
            raise KeyError(f"{self.source} has no tensor {name!r}") from None
        with self._handle(f).borrow(name) as t:
            yield t

    def sample_digest(self, name: str) -> str:
        """:func:`sample_digest` of a stored tensor, reading only the rows it hashes."""
        with self.borrow(name) as t:
            return sample_digest(t)

    def fingerprint(self) -> str:
        """The spec's fingerprint of tensor names, dtypes and shapes."""
        return _fingerprint((n, i.dtype, i.shape) for n, i in self._info.items())

    def file(self, relpath: str) -> Path | None:
        """``path/relpath`` if that file exists, refused (:class:`CheckpointError`) when it is not
        a plain name or is a link leading out of the folder."""
        p = self._confined(relpath, "a file name")
        return p if p.is_file() else None

    def config(self) -> dict | None:
        """``config.json`` as a dict (``None`` without one), size and nesting bounded
        (``limits.read_json``); :class:`FormatError` naming the file if it is not a JSON object."""
        p = self.file("config.json")
        if p is None:
            return None
        data = read_json(p, f"{self.source}/config.json")
        if not isinstance(data, dict):
            raise FormatError(f"{self.source}/config.json is not a JSON object; the checkpoint is corrupted")
        return data

    def total_bytes(self) -> int:
        """Bytes of all tensors (what storing this checkpoint whole costs, headers aside)."""
        return sum(itemsize(i.dtype) * math.prod(i.shape) for i in self._info.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)
