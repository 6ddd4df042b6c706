"""A delta repo on disk (spec/FORMAT.md, "Repository layout"): the writer and the reader.

The writer puts everything in a temporary sibling folder and renames it into place only when
the config, the index and every shard are complete, so an interrupted run never leaves a
delta that looks complete.
"""

from __future__ import annotations

import json
import hashlib
import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..errors import FormatError, OutputError
from . import records as rec
from .components import check_fields
from .components.lowrank import CODED_FEATURE
from .config import CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, SHARD_NAME, dumps_config, loads_config, shard_name, validate_config
from .limits import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, confined_file, read_json
from .safetensors_stream import MappedSafetensors, SafetensorsStreamWriter

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# "model.layers.12.mlp.up_proj.weight" -> "model.layers.12": tensors of one block share a shard.
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")
# A repo folder of a Hugging Face cache: models--user--name (datasets--, spaces-- likewise).
_CACHE_REPO = re.compile(r"(models|datasets|spaces)--.+")


def layer_group(name: str) -> str:
    """The transformer block a tensor belongs to ("" for embeddings, final norm, heads)."""
    m = _LAYER.match(name)
    return m.group(1) if m else ""


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def check_out_dir(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check an output folder before any work starts, and tidy what killed writers left beside it.

    Refused with :class:`OutputError`, with or without ``overwrite``: an output that is, contains
    or lies inside one of ``inputs`` (real paths compared, links followed; names that are not
    local paths, such as Hub ids, are skipped) or inside a Hugging Face cache repo folder
    (``models--*``), since replacing it would delete the input and writing inside it changes it.
    Refused with ``FileExistsError``: a non-empty output, unless ``overwrite``.
    Stale partial and old folders of ``path`` are handled first (:func:`clean_stale`).
    """
    p = Path(path)
    _check_not_input(p, inputs)
    clean_stale(p)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{p} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)")
        _check_replaceable(p)
    return p


# What overwrite may replace: a folder holding a delta, an adapter or a model (what deltahub
# writes), never any other folder (a home directory, a Hugging Face cache) a typo or a shared job
# file may name.
REPLACEABLE_MARKERS = ("delta_config.json", "adapter_config.json", "config.json")


def _check_replaceable(out: Path) -> None:
    fix = "remove it yourself if it should go, or choose another folder"
    if not out.is_dir():
        raise OutputError(f"the output {out} is a file, not a folder; overwrite replaces folders deltahub wrote only: {fix}")
    names = {child.name for child in out.iterdir()}
    if not names & set(REPLACEABLE_MARKERS):
        raise OutputError(f"the output {out} holds no {', '.join(REPLACEABLE_MARKERS)}: not a delta, adapter or model folder, so overwrite "
                          f"will not replace it (it would delete everything in it): {fix}")
    from huggingface_hub import constants

    real = Path(os.path.realpath(out))
    cache = Path(os.path.realpath(constants.HF_HUB_CACHE))
    if any(_CACHE_REPO.match(n) for n in names) or real == cache or real in cache.parents:
        raise OutputError(f"the output {out} holds a Hugging Face cache; overwrite would delete the cached models: {fix}")


def _check_not_input(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    real = Path(os.path.realpath(out))
    repo = _cache_repo(real)
    if repo is not None:
        raise OutputError(f"the output {out} lies inside the Hugging Face cache repo {repo}; writing there would change the cached model; choose an output folder outside the cache")
    for given in inputs:
        if given is None or not os.path.lexists(Path(given).expanduser()):
            continue  # a Hub id or a missing path: nothing on disk to harm
        root = Path(os.path.realpath(Path(given).expanduser()))
        # An input in the cache protects its whole cached repo (snapshots link into blobs/).
        root = _cache_repo(root) or root
        if real == root:
            how = "is"
        elif root in real.parents:
            how = "lies inside"
        elif real in root.parents:
            how = "contains"
        else:
            continue
        raise OutputError(
            f"the output {out} {how} the input {given}" + (f" ({root})" if str(root) != str(given) else "")
            + "; writing there (even with --overwrite) could delete or change the input; choose an output folder that is not an input and neither holds nor lies inside one"
        )


def _cache_repo(real: Path) -> Path | None:
    """The Hugging Face cache repo folder (``.../models--user--name``, with ``snapshots/``) that
    ``real`` is or lies inside, if any."""
    for folder in (real, *real.parents):
        if _CACHE_REPO.match(folder.name) and (folder / "snapshots").is_dir():
            return folder
    return None


def _umask_of_proc() -> int | None:
    # Linux >= 4.7 shows the umask here; reading it is thread-safe, unlike os.umask's set-and-restore.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Elsewhere the umask is read once, here, at import (set-and-restore is racy once threads run).
_IMPORT_UMASK = _umask_by_setting() if _umask_of_proc() is None else 0o022


def current_umask() -> int:
    """The process's umask (read without changing it where the system allows)."""
    mask = _umask_of_proc()
    return _IMPORT_UMASK if mask is None else mask


def _is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host; anything uncertain counts as alive."""
    if pid <= 0:
        return True  # never signal 0 or -1 (a process group, every process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # e.g. PermissionError: alive, another user's
    return True


def clean_stale(out: Path) -> None:
    """Remove the partial and old folders that dead writers of ``out`` left beside it.

    Only entries named exactly ``.{out.name}.partial-{pid}-{tag}`` or ``.{out.name}.old-{pid}-{tag}``
    (what :func:`partial_dir` and :func:`install_dir` make) whose ``pid`` is no live process on
    this host are touched; links are never followed or removed. Recovery of an interrupted
    overwrite: a writer killed between moving the old ``out`` aside and renaming the new one in
    leaves ``out`` missing and its old version in ``.old-``; the newest such old folder is then
    renamed back to ``out`` (the user keeps the previous output; the unfinished new one, in its
    partial folder, is discarded and the run must be redone). Does nothing off POSIX systems,
    where liveness cannot be checked this way.
    """
    if os.name != "posix" or not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-([0-9]{{1,10}})-[a-z0-9_]{{4,32}}")
    stale: list[tuple[str, os.DirEntry]] = []
    try:
        with os.scandir(out.parent) as entries:
            for entry in entries:
                m = pattern.fullmatch(entry.name)
                if m and not entry.is_symlink() and not _is_alive(int(m.group(2))):
                    stale.append((m.group(1), entry))
    except OSError:
        return  # tidying is a courtesy: an unlistable parent is for the write itself to report
    olds = [e for kind, e in stale if kind == "old"]
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda e: e.stat(follow_symlinks=False).st_ctime)
        try:
            os.rename(newest.path, out)
            stale = [(k, e) for k, e in stale if e is not newest]
        except OSError:
            return  # another process got there first: leave everything for the next writer
    for _, entry in stale:
        _remove(Path(entry.path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


class Partial:
    """The partial folder of one write: a new empty hidden folder ``.{name}.partial-{pid}-{tag}``
    beside the output, on the same filesystem (so that renaming it into place is atomic), named
    with the writer's pid (so that a later writer can tell a dead run's leftovers,
    :func:`clean_stale`), private (0700) until :func:`install_dir` gives it the usual permissions.

    Its name is recorded before the folder is made, so :meth:`remove` finds it wherever an
    interrupt (Ctrl-C, SIGTERM) lands, even between ``mkdir`` and the caller's next line.
    """

    def __init__(self) -> None:
        self.path: Path | None = None

    def make(self, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        while self.path is None:
            self.path = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                self.path = None  # not ours: never to be removed
        return self.path

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def partial_dir(out: Path) -> Path:
    """A new partial folder for ``out`` (:class:`Partial`)."""
    return Partial().make(out)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    # SIGINT and SIGTERM wait until both renames of install_dir are done (main thread, POSIX).
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def usual_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions ``mkdir`` and ``open`` give under the
    process's umask (folders ``0o777 & ~umask``, files ``0o666 & ~umask``): ``mkdtemp`` makes
    0700 folders and some writers (safetensors' ``save_file``) 0600 files. Links are left alone."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def install_dir(tmp: Path, out: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out``. An existing ``out`` is moved aside first
    (to ``.{name}.old-{pid}-{tag}``) and removed only afterwards, so ``out`` is never a mix of old
    and new files; if the process dies in between, the next writer puts the old one back
    (:func:`clean_stale`). The output gets the usual permissions first (:func:`usual_permissions`)."""
    usual_permissions(tmp)
    backup = None
    with _signals_deferred():
        if os.path.lexists(out):
            backup = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out, backup)
        try:
            os.replace(tmp, out)
        except BaseException:
            if backup is not None and not os.path.lexists(out):
                os.replace(backup, out)  # the new output could not go in: the old one stays
            raise
    if backup is not None:
        _remove(backup)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Write a folder atomically: yield an empty temporary folder beside ``out_dir`` that is
    renamed into place when the block succeeds and removed when it fails (any exception,
    KeyboardInterrupt included), so an interrupted run never leaves a folder that looks
    complete. A non-empty ``out_dir`` is refused unless ``overwrite``, and an ``out_dir`` that is,
    holds or lies inside one of ``inputs`` always (:func:`check_out_dir`).

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "result"
    >>> with atomic_dir(out) as tmp:
    ...     _ = (tmp / "a.txt").write_text("done")
    >>> sorted(p.name for p in out.iterdir())
    ['a.txt']
    """
    out = check_out_dir(out_dir, overwrite, inputs)
    partial = Partial()
    try:
        tmp = partial.make(out)
        yield tmp
        install_dir(tmp, out)
    except BaseException:
        partial.remove()
        raise


def config_text(cfg: dict, fixed: int) -> str:
    """The text of ``delta_config.json`` for ``cfg``. If ``cfg["totals"]["dense_bytes"]`` is
    given, ``totals.stored_bytes`` (``fixed``: the bytes of shards and index, plus the config
    file itself) and ``totals.ratio`` are filled in, in ``cfg`` too, and the text is exactly
    as long as that count says (encoded as UTF-8, as ``write_text`` writes it)."""
    text = dumps_config(cfg)
    totals = cfg.get("totals")
    if isinstance(totals, dict) and "dense_bytes" in totals:
        # The config counts its own size. Raise the guess until the text fits in it, then pad
        # with spaces (valid JSON whitespace) so the file is exactly that long.
        dense = totals["dense_bytes"]
        stored = fixed + len(text.encode())
        while True:
            cfg["totals"] = {**totals, "stored_bytes": stored, "ratio": round(stored / dense, 6) if dense else None}
            text = dumps_config(cfg)
            if fixed + len(text.encode()) <= stored:
                text = text[:-1] + " " * (stored - fixed - len(text.encode())) + "\n"
                break
            stored = fixed + len(text.encode())
    return text


class DeltaWriter:
    """Write a delta repo tensor by tensor with bounded memory.

    >>> import tempfile, torch
    >>> from deltahub.format.components import encode_dense
    >>> out = tempfile.mkdtemp() + "/delta"
    >>> with DeltaWriter(out) as w:
    ...     record, tensors = rec.make_record("dense", (2,), "F32", [encode_dense(torch.ones(2), torch.float32)])
    ...     w.add("norm.weight", record, tensors)
    ...     path = w.finish({})
    >>> DeltaReader(path).names()
    ['norm.weight']
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False, shard_by_layer: bool = True,
        inputs: Iterable[str | os.PathLike | None] = (),
    ) -> None:
        # ``inputs``: the folders and files the delta is made from, which out_dir must not touch.
        self.out_dir = check_out_dir(out_dir, overwrite, inputs)
        self.max_shard_size = parse_size(max_shard_size)
        # Not atomic_dir: the writer outlives one block (finish() installs, abort() discards).
        # The folder is made on first use (_tmp), inside the caller's with block, so an interrupt
        # between this constructor and __enter__ cannot leave it behind.
        self._partial = Partial()
        self._records: dict[str, dict] = {}
        self._shards: list[tuple[Path, list[str]]] = []
        self._writer: SafetensorsStreamWriter | None = None
        self._keys: list[str] = []
        self._sha: list[str] = []
        self._done = False
        self.shard_by_layer = shard_by_layer
        self._group: str | None = None

    def __enter__(self) -> "DeltaWriter":
        return self

    @property
    def _tmp(self) -> Path:
        return self._partial.path or self._partial.make(self.out_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def _roll(self, incoming: int, group: str) -> None:
        # A new shard at each transformer block (so an unchanged block gives identical shard bytes
        # in the next version, which the Hub stores once) and whenever the size limit is reached.
        if self._writer is not None and self._writer.nbytes and (
            self._writer.nbytes + incoming > self.max_shard_size or (self.shard_by_layer and group != self._group)
        ):
            self._close_shard()
        self._group = group
        if self._writer is None:
            path = self._tmp / f"shard-{len(self._shards):05d}.tmp"
            self._writer = SafetensorsStreamWriter(path, metadata={"format": "pt", "deltahub_format_version": FORMAT_VERSION})
            self._keys = []

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._sha.append(self._writer.close())
        self._shards.append((self._writer.path, self._keys))
        self._writer = None

    def add(self, name: str, record: dict, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add one tensor's record; ``tensors`` are keyed ``"{i}.{field}"`` as made by ``records.make_record``."""
        if name in self._records:
            raise ValueError(f"tensor {name!r} added twice")
        if rec.SEPARATOR in name:
            raise ValueError(f"tensor name {name!r} contains the reserved separator {rec.SEPARATOR!r}")
        rec.validate_record(name, record)
        full = {f"{name}{rec.SEPARATOR}{k}": t for k, t in tensors.items()}
        layout = rec.record_layout(name, record)
        check_fields(f"tensor {name!r}", layout, full)
        size = sum(t.numel() * t.element_size() for t in full.values())
        if full:
            self._roll(size, layer_group(name))
            for key in sorted(full, key=lambda k: list(layout).index(k)):
                self._writer.add(key, full[key])
                self._keys.append(key)
        self._records[name] = record

    def add_file(self, relpath: str, data: bytes | str | os.PathLike) -> None:
        """Copy an extra file (fine-tune config, tokenizer files, model card) into the repo."""
        dest = self._tmp / relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            dest.write_bytes(data)
        else:
            shutil.copyfile(data, dest)

    @property
    def records(self) -> Mapping[str, dict]:
        """The records added so far, by tensor name."""
        return self._records

    def stored_bytes(self) -> int:
        """Bytes of shards written so far (data and headers)."""
        done = sum(p.stat().st_size for p, _ in self._shards)
        return done + (self._writer.nbytes if self._writer else 0)

    def finish(self, config: Mapping, card: Callable[[dict], str] | None = None) -> Path:
        """Write shards, index and ``delta_config.json``, then move the repo into place.

        If ``config["totals"]["dense_bytes"]`` is given, ``stored_bytes`` (shards, index and the
        config file itself) and ``ratio`` are filled in. ``card(config)`` renders ``README.md``.
        """
        if self._writer is not None:
            self._close_shard()
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        checksums: dict[str, str] = {}
        total_size = 0
        for i, ((path, keys), sha) in enumerate(zip(self._shards, self._sha), start=1):
            final = shard_name(i, total)
            os.replace(path, self._tmp / final)
            total_size += (self._tmp / final).stat().st_size
            checksums[final] = sha
            for k in keys:
                weight_map[k] = final
        index = {"metadata": {"total_size": total_size, "format_version": FORMAT_VERSION, "sha256": checksums}, "weight_map": weight_map}
        (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **{k: v for k, v in config.items() if k != "tensors"}}
        # Coded codes change how the repo decodes: listed in `requires`, a reader that does not
        # know them refuses the repo by name instead of failing on a field's size (spec §1.7).
        if any(has_coded_segment(r) for r in self._records.values()) and CODED_FEATURE not in cfg.get("requires", []):
            cfg["requires"] = [*cfg.get("requires", []), CODED_FEATURE]
        cfg["tensors"] = self._records
        text = config_text(cfg, total_size + (self._tmp / INDEX_NAME).stat().st_size)
        (self._tmp / CONFIG_NAME).write_text(text)
        if card is not None:
            (self._tmp / "README.md").write_text(card(cfg))
        install_dir(self._tmp, self.out_dir)
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        """Throw away everything written so far."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._partial.remove()
        self._done = True


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class DeltaReader:
    """Read a delta repo from a local folder: config, records, stored tensors, decoding.

    Tensors are read lazily from memory-mapped shards; nothing is loaded until asked for.
    With ``check_shards`` (what ``open_delta``, and so every loader, sets), a shard is hashed
    against its SHA-256 in the index when first opened, after its header's checks, so that a
    corrupted shard is refused rather than decoded.
    """

    check_shards: bool = False

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # Both files through confined_file: a link leading out of the repo is refused, and the
        # error is the same whether or not its target exists.
        cfg_path = confined_file(self.path, CONFIG_NAME, f"{self.path}: {CONFIG_NAME}")
        if not cfg_path.is_file():
            raise FormatError(f"{self.path} has no {CONFIG_NAME}: it is not a deltahub delta repo")
        self.config = read_json(cfg_path, str(cfg_path), max_bytes=MAX_CONFIG_BYTES)
        if not isinstance(self.config, dict):
            raise FormatError(f"{cfg_path} must hold a JSON object")
        validate_config(self.config)
        self.records: dict[str, dict] = self.config["tensors"]
        index_path = confined_file(self.path, INDEX_NAME, f"{self.path}: {INDEX_NAME}")
        if not index_path.is_file():
            raise FormatError(f"{self.path} has no {INDEX_NAME}; the delta is incomplete")
        self.index = read_json(index_path, str(index_path), max_bytes=MAX_INDEX_BYTES)
        self.weight_map: dict[str, str] = check_index(self.index, str(index_path))
        self._handles: dict[str, MappedSafetensors] = {}
        self._broken: dict[str, FormatError] = {}
        self._lock = threading.Lock()  # transformers' loader threads decode at once

    def shard_path(self, shard: str, key: str | None = None) -> Path:
        """The path of a shard the index names, confined to the repo (no link leading out)."""
        return confined_file(self.path, shard, f"{INDEX_NAME} entry" + (f" for {key!r}" if key else ""))

    def checksums(self) -> dict[str, str]:
        """``metadata.sha256`` of the index (checked by :func:`check_index`): shard -> hex digest."""
        return (self.index.get("metadata") or {}).get("sha256") or {}

    def names(self) -> list[str]:
        return list(self.records)

    def record(self, name: str) -> dict:
        try:
            return self.records[name]
        except KeyError:
            raise KeyError(f"the delta has no record for tensor {name!r}") from None

    def _handle(self, shard: str, key: str | None = None) -> MappedSafetensors:
        with self._lock:
            if shard in self._broken:
                # A bad shard is parsed once, not once per tensor (a 100 MB hostile header).
                raise FormatError(str(self._broken[shard]))
            if shard not in self._handles:
                try:
                    path = self.shard_path(shard, key)
                    if not path.is_file():
                        raise FormatError(f"shard {shard} is missing from {self.path}; download the delta again")
                    try:
                        handle = MappedSafetensors(path)  # header typed, tensors tiling the file: hashing costs what it declares
                        want = self.checksums().get(shard)
                        if self.check_shards and want is not None and sha256_file(path) != want:
                            raise FormatError(f"shard {shard} of {self.path} does not match its SHA-256 in {INDEX_NAME}: it is corrupted; download the delta again "
                                              "(deltahub verify lists every problem)")
                        self._handles[shard] = handle
                    except OSError as e:
                        raise FormatError(f"shard {shard} cannot be read ({e})") from None
                except FormatError as e:
                    self._broken[shard] = e
                    raise
            return self._handles[shard]

    def shard_header(self, shard: str) -> None:
        """Open shard ``shard`` (a name the index gives): its header parsed, typed and tiling the
        file, or :class:`FormatError` (missing, truncated, corrupted)."""
        self._handle(shard)

    @contextmanager
    def borrow(self, key: str) -> Iterator[torch.Tensor]:
        """A stored tensor by its full key ``"{name}::{i}.{field}"``, as a view of the shard's
        pages for the ``with`` block (see :class:`MappedSafetensors`)."""
        shard = self.weight_map.get(key)
        if shard is None:
            raise FormatError(f"stored tensor {key!r} is not in {INDEX_NAME}; the delta is incomplete")
        handle = self._handle(shard, key)
        if key not in handle:
            raise FormatError(f"stored tensor {key!r} is not in {shard}, though {INDEX_NAME} says so; the delta is corrupted")
        with handle.borrow(key) as t:
            yield t

    def get(self, key: str) -> torch.Tensor:
        """A stored tensor by its full key, in memory of its own."""
        with self.borrow(key) as t:
            return t.clone()

    def decode(self, name: str, base: torch.Tensor | None) -> torch.Tensor | None:
        """The fine-tuned tensor ``name`` given the base's tensor (``None`` if removed).

        The stored tensors are read as views of the shards' pages and given back after."""
        with ExitStack() as borrowed:
            return rec.decode_record(name, self.record(name), lambda key: borrowed.enter_context(self.borrow(key)), base)

    def iter_decoded(self, base: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.records:
            t = self.decode(name, base.get(name))
            if t is not None:
                yield name, t


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_index(index: object, where: str = INDEX_NAME) -> dict[str, str]:
    """Check the structure of a parsed ``delta.safetensors.index.json`` (spec §3.2) and return its
    ``weight_map``: an object of stored keys to shard names ``delta-i-of-N.safetensors`` (one N,
    1 <= i <= N), ``metadata`` an object whose ``sha256`` maps shard names to 64 lowercase hex digits.
    Shard names are checked here so that no path from the index ever reaches ``open``."""
    if not isinstance(index, dict):
        raise FormatError(f"{where} must hold a JSON object; the file is corrupted")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{where}: field 'weight_map' must be an object of stored keys to shard names, got {type(weight_map).__name__}; the file is corrupted or hostile")
    totals: set[str] = set()
    for key, shard in weight_map.items():
        m = SHARD_NAME.match(shard) if isinstance(shard, str) else None
        if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
            raise FormatError(f"{where}: the entry for {key!r} names {str(shard)[:100]!r}, not a shard name delta-0000i-of-0000N.safetensors; the index is corrupted or hostile")
        totals.add(m.group(2))
    if len(totals) > 1:
        raise FormatError(f"{where}: shard names disagree on the shard count ({sorted(totals)}); the index is corrupted or hostile")
    metadata = index.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError(f"{where}: field 'metadata' must be an object, got {type(metadata).__name__}; the file is corrupted or hostile")
    sha = metadata.get("sha256", {})
    if not isinstance(sha, dict) or not all(isinstance(k, str) and SHARD_NAME.match(k) and isinstance(v, str) and _HEX64.match(v) for k, v in sha.items()):
        raise FormatError(f"{where}: field 'metadata.sha256' must map shard names to 64 lowercase hex digits; the file is corrupted or hostile")
    return weight_map


def has_coded_segment(record: Mapping) -> bool:
    """Whether a record holds a lowrank segment whose codes are coded (spec §6.3, format 1.2)."""
    return any(
        isinstance(seg, Mapping) and "coding" in seg and "bits" in seg
        for comp in record.get("components") or []
        if isinstance(comp, Mapping) and comp.get("type") == "lowrank"
        for factor in ("u", "v")
        for seg in comp.get(factor) or []
    )
