"""``deltahub diff A B``: what changed between two decoded models, and what B costs given A.

A and B are each a delta repo (a local folder, or a Hub id at a revision: ``user/run@v1``) or a
model checkpoint (a folder of safetensors weights, or a Hub model id). Deltas are decoded through
the same checked paths as ``apply`` and the loaders (:func:`sources.open_pair`, the records
checked against their base before anything is decoded, :func:`sources.decode_checked`), model
checkpoints through :class:`~deltahub.checkpoint.Checkpoint`; one tensor of each side is held
at a time, never a whole model.

The report (:class:`DiffReport`) says, per tensor of either decoded model, whether it is
bit-identical or changed, and for a changed one the share of its elements that are
bit-identical, the relative Frobenius difference ``‖B − A‖ / ‖A‖`` and the largest absolute
difference; the tensors only A or only B has; which of B's files A already holds (same content,
by SHA-256; for a Hub repo, the LFS SHA-256 and git blob id of the Hub's file listing, so nothing
is hashed twice); and what B costs given A: the bytes of B's files that A does not hold (what a
push of B after A uploads, or a second download fetches) and what a bit-exact ``lossless``
delta of B against A would store (what a chained version against A would cost).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .card import human_bytes
from .checkpoint import SAFETENSORS_INDEX, Checkpoint, CheckpointError, resolve
from .encoding import encode_tensor
from .errors import DeltahubError, InvalidTensorError
from .format import CONFIG_NAME, DeltaReader
from .format.config import SHARD_NAME, TOKENIZER_FILES, is_repo_file
from .format.dtypes import itemsize
from .progress import progress as progress_bar
from .sources import DELTA_FILE_PATTERNS, HubOptions, decode_checked, one_line, open_pair, repo_file

# Elements compared at a time: 2^20 (8 MiB per side in float64), whatever the tensor's size.
_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
# Files of a model checkpoint besides its weights that a diff counts (those deltahub reads or copies).
_MODEL_FILES = (SAFETENSORS_INDEX, "config.json", "generation_config.json", *TOKENIZER_FILES)


class DiffError(DeltahubError, ValueError):
    """The two sides of a diff cannot be opened as given (a missing folder, a revision given
    twice or for a local folder, a base for a model checkpoint)."""


@dataclass
class DiffSide:
    """One side of a diff: what was given, what it is (``"delta"`` or ``"model"``), the local
    folder read, and the Hub commit when it came from the Hub."""

    source: str
    kind: str
    path: str
    revision: str | None = None
    commit: str | None = None

    def __str__(self) -> str:
        where = f"@{self.revision}" if self.revision else ""
        at = f" at commit {self.commit}" if self.commit else ""
        return f"{self.source}{where} ({'delta' if self.kind == 'delta' else 'model checkpoint'}{at})"


@dataclass
class TensorDiff:
    """One tensor of A or B.

    ``status``: ``"identical"`` (same shape, dtype and bits), ``"changed"``, ``"only_a"`` or
    ``"only_b"``. For a tensor both have, ``compared`` elements were compared: all of them, or the
    rows both have when dimension 0 differs (0 when other dimensions differ); among them
    ``identical_share`` are bit-identical (A converted to B's dtype first when the dtypes
    differ), ``rel_diff`` is ``‖B − A‖ / ‖A‖`` (infinite when A is zero and B is not) and
    ``max_abs_diff`` the largest ``|B − A|``. ``delta_bytes`` is what a bit-exact delta of B
    against A stores for it, ``delta_how`` how: ``"unchanged"`` (0 bytes), ``"lossless"``
    (``encode_tensor(name, a, b, method="lossless")``), ``"whole"`` (B's tensor stored whole:
    new, reshaped, non-float or non-finite) or ``"removed"`` (0 bytes)."""

    name: str
    status: str
    shape_a: list[int] | None
    shape_b: list[int] | None
    dtype_a: str | None
    dtype_b: str | None
    compared: int = 0
    identical_share: float | None = None
    rel_diff: float | None = None
    max_abs_diff: float | None = None
    delta_bytes: int = 0
    delta_how: str = "unchanged"

    @property
    def dense_bytes(self) -> int:
        """Bytes of B's tensor (0 for a tensor only A has)."""
        return math.prod(self.shape_b) * itemsize(self.dtype_b) if self.shape_b is not None and self.dtype_b else 0


@dataclass
class FileDiff:
    """One of B's files: its size, and the file of A with the same content (``None``: new).
    ``weights`` marks delta shards and model weight files."""

    name: str
    size: int
    weights: bool
    same_as: str | None = None

    @property
    def shared(self) -> bool:
        return self.same_as is not None


@dataclass
class DiffReport:
    """What changed from A to B (see the module docstring). ``tensors`` in A's order, then the
    tensors only B has; ``files`` are B's files."""

    a: DiffSide
    b: DiffSide
    tensors: list[TensorDiff] = field(default_factory=list)
    files: list[FileDiff] = field(default_factory=list)

    def _names(self, status: str) -> list[str]:
        return [t.name for t in self.tensors if t.status == status]

    @property
    def changed(self) -> list[str]:
        """Tensors both have whose shape, dtype or bits differ."""
        return self._names("changed")

    @property
    def identical(self) -> list[str]:
        return self._names("identical")

    @property
    def only_a(self) -> list[str]:
        return self._names("only_a")

    @property
    def only_b(self) -> list[str]:
        return self._names("only_b")

    @property
    def file_bytes(self) -> int:
        """Bytes of all of B's files."""
        return sum(f.size for f in self.files)

    @property
    def new_file_bytes(self) -> int:
        """Bytes of B's files whose content A does not hold: what B costs given A, file by file."""
        return sum(f.size for f in self.files if not f.shared)

    @property
    def shared_shards(self) -> list[str]:
        """B's shard (weight) files whose content A holds."""
        return [f.name for f in self.files if f.weights and f.shared]

    @property
    def lossless_delta_bytes(self) -> int:
        """What a bit-exact delta of B against A stores: the sum of :attr:`TensorDiff.delta_bytes`."""
        return sum(t.delta_bytes for t in self.tensors)

    def summary(self) -> list[str]:
        """Three lines: tensors, files, and the cost of a chained lossless delta."""
        shards = [f for f in self.files if f.weights]
        new = [f for f in self.files if not f.shared]
        changed_dense = sum(t.dense_bytes for t in self.tensors if t.status in ("changed", "only_b"))
        return [
            f"tensors: {len(self.changed)} changed, {len(self.identical)} identical, {len(self.only_a)} only in A, {len(self.only_b)} only in B",
            f"files: {len(self.shared_shards)} of B's {len(shards)} shard file(s) are in A; B's files not in A: "
            f"{human_bytes(self.new_file_bytes)} of {human_bytes(self.file_bytes)} ({len(new)} of {len(self.files)} files)",
            f"a lossless delta of B against A (a chained version) would store {human_bytes(self.lossless_delta_bytes)} "
            f"for the {human_bytes(changed_dense)} of B's changed and new tensors",
        ]

    def __str__(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}"]
        for t in self.tensors:
            if t.status != "identical":
                lines.append(f"  {t.status:9} {t.name}" + (f"  rel. diff {t.rel_diff:.3g}, {t.identical_share:.1%} bit-identical" if t.identical_share is not None and t.rel_diff is not None else ""))
        return "\n".join(lines + self.summary())

    def to_dict(self) -> dict:
        """JSON values (NaN and infinities are left as floats; the CLI writes them as null)."""
        from dataclasses import asdict

        return {
            "a": asdict(self.a),
            "b": asdict(self.b),
            "summary": {
                "changed": len(self.changed), "identical": len(self.identical), "only_a": len(self.only_a), "only_b": len(self.only_b),
                "files_b": len(self.files), "files_shared": sum(f.shared for f in self.files), "file_bytes_b": self.file_bytes, "new_file_bytes": self.new_file_bytes,
                "shards_b": sum(f.weights for f in self.files), "shards_shared": len(self.shared_shards), "lossless_delta_bytes": self.lossless_delta_bytes,
            },
            "changed": self.changed, "only_a": self.only_a, "only_b": self.only_b, "shared_shards": self.shared_shards,
            "tensors": [{**asdict(t), "dense_bytes": t.dense_bytes} for t in self.tensors],
            "files": [{**asdict(f), "shared": f.shared} for f in self.files],
        }


# ------------------------------------------------------------------ opening a side


@dataclass
class _Listed:
    """A file of a Hub repo's listing: its size and content keys (``sha256:`` of an LFS file,
    ``git:`` blob id of a regular one), each checked for form (the listing is untrusted)."""

    size: int | None
    keys: frozenset[str]


class _Side:
    """An opened side: a delta (reader and base) or a model checkpoint."""

    def __init__(self, info: DiffSide, listing: dict[str, _Listed] | None, reader: DeltaReader | None = None, base: Checkpoint | None = None, ckpt: Checkpoint | None = None):
        self.info, self.listing, self.reader, self.base, self.ckpt = info, listing, reader, base, ckpt

    def names(self) -> list[str]:
        """The decoded model's tensor names (a delta's records that are not ``removed``)."""
        if self.reader is not None:
            return [n for n, r in self.reader.records.items() if r["kind"] != "removed"]
        return self.ckpt.names()

    def meta(self, name: str) -> tuple[str, list[int]]:
        if self.reader is not None:
            rec = self.reader.record(name)
            return rec["dtype"], list(rec["shape"])
        i = self.ckpt.info(name)
        return i.dtype, list(i.shape)

    @contextmanager
    def tensor(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor of the decoded model for the block: decoded and checked (a delta), or a
        view of the file's pages (a model checkpoint)."""
        if self.reader is not None:
            yield decode_checked(self.reader, self.base, name)
            return
        with self.ckpt.borrow(name) as t:
            yield t

    def file_names(self) -> list[tuple[str, bool]]:
        """``(name, weights)`` of the side's files: a delta repo's files (FORMAT.md §3.1; of the
        shards, those its index names), or a checkpoint's weight files, index, configs and
        tokenizer files."""
        present = self.listing.keys() if self.listing is not None else _listdir(Path(self.info.path))
        if self.reader is not None:
            shards = sorted(set(self.reader.weight_map.values()))
            return [(s, True) for s in shards] + [(n, False) for n in sorted(present) if is_repo_file(n) and not SHARD_NAME.match(n)]
        weights = [f.name for f in self.ckpt._files]
        return [(w, True) for w in weights] + [(n, False) for n in _MODEL_FILES if n in present and n not in weights]

    def files(self) -> dict[str, tuple[int, frozenset[str], bool]]:
        """``{name: (size, content keys, weights)}``: from the Hub's listing where it gives the
        keys, else hashed here (SHA-256 and git blob id in one pass), each file confined to the
        folder and a regular file (``sources.repo_file``)."""
        out = {}
        for name, weights in self.file_names():
            listed = (self.listing or {}).get(name)
            if listed is not None and listed.keys and listed.size is not None:
                out[name] = (listed.size, listed.keys, weights)
                continue
            path = repo_file(self.info.path, name, str(self.info))
            if path is None:
                continue  # a shard the index names but the folder lacks fails when decoded, with its own message
            out[name] = (*_digests(path), weights)
        return out


def _listdir(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _digests(path: os.PathLike) -> tuple[int, frozenset[str]]:
    """Size, and ``sha256:`` and ``git:`` (git blob id, what the Hub lists for a file kept in git)
    keys of a file's content, in one pass of 16 MiB reads."""
    size = os.stat(path).st_size
    sha, git = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    read = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
            git.update(chunk)
            read += len(chunk)
    keys = {f"sha256:{sha.hexdigest()}"}
    if read == size:  # a file that changed while read has no git key (the header counted its old size)
        keys.add(f"git:{git.hexdigest()}")
    return read, frozenset(keys)


def _looks_like_path(text: str) -> bool:
    return text.count("/") > 1 or text.startswith((".", "/", "~")) or os.sep != "/" and os.sep in text


def _split(text: str, revision: str | None, which: str) -> tuple[str, str | None]:
    """``(source, revision)`` of an argument: an existing folder as is; ``REPO@REV`` split (the
    revision may be given once, there or with ``revision``)."""
    text = str(text)
    if os.path.lexists(os.path.expanduser(text)):
        if revision is not None:
            raise DiffError(f"{which}: {text} is a local folder; a revision ({revision!r}) only applies to Hub repos")
        return text, None
    if _looks_like_path(text):
        raise DiffError(f"{which}: {text} is not a folder (and not a Hub repo id like 'user/my-delta'); check the path")
    if "@" not in text:
        return text, revision
    from .base_id import BaseIdError, parse_base_id

    try:
        ref = parse_base_id(text)
    except BaseIdError:
        raise DiffError(f"{which}: {one_line(text, 200)!r} is neither an existing folder nor a Hub id REPO or REPO@REVISION (e.g. user/my-delta@v2)") from None
    if revision is not None and revision != ref.revision:
        raise DiffError(f"{which}: the revision is given twice ({ref.revision!r} in {text!r} and {revision!r}); give it once")
    return ref.repo_id, ref.revision


def _hub_listing(repo_id: str, revision: str | None, hub: HubOptions, which: str) -> tuple[str | None, dict[str, _Listed] | None]:
    """The commit ``revision`` points at and the repo's top-level files there, from one
    ``model_info`` call (nothing downloaded); ``(None, None)`` when the Hub is not asked (offline,
    ``local_files_only``) or does not answer: the side is then read from the cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    from .base_id import _unreachable

    if hub.local_files_only or constants.HF_HUB_OFFLINE:
        return None, None
    try:
        info = HfApi(token=hub.token).model_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise CheckpointError(f"{which}: {repo_id} has no revision {revision!r}; list its versions with `deltahub log {repo_id}`") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{which}: {repo_id} is not a local folder and no Hub repo of that name is visible (check the name, or log in for private repos)") from None
    except HFValidationError:
        raise DiffError(f"{which}: {one_line(repo_id, 200)} is neither an existing folder nor a Hub repo id like 'user/my-delta'") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise DiffError(f"{which}: {repo_id}: the Hub answered {status or 'an error'}: {one_line(str(e).splitlines()[0] if str(e) else e)}") from None
    except _unreachable():
        return None, None
    commit = info.sha if isinstance(info.sha, str) and _HEX40.match(info.sha) else None
    listing: dict[str, _Listed] = {}
    for s in info.siblings or []:
        name = getattr(s, "rfilename", None)
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            continue
        size = s.size if isinstance(s.size, int) and not isinstance(s.size, bool) and s.size >= 0 else None
        lfs = getattr(s.lfs, "sha256", None) if s.lfs is not None else None
        if s.lfs is not None:
            keys = {f"sha256:{lfs}"} if isinstance(lfs, str) and _HEX64.match(lfs) else set()
        else:
            blob = s.blob_id
            keys = {f"git:{blob}"} if isinstance(blob, str) and _HEX40.match(blob) else set()
        listing[name] = _Listed(size, frozenset(keys))
    return commit, listing


def _open_side(text: str | os.PathLike, revision: str | None, base: str | os.PathLike | None, hub: HubOptions, verify_base: bool, which: str) -> _Side:
    source, revision = _split(str(text), revision, which)
    listing = commit = None
    local = Path(source).expanduser()
    if os.path.lexists(local):
        if not local.is_dir():
            raise DiffError(f"{which}: {source} is not a folder; pass the folder of a delta repo or of a model checkpoint")
        is_delta = os.path.lexists(local / CONFIG_NAME)
    else:
        commit, listing = _hub_listing(source, revision, hub, which)
        if listing is not None:
            is_delta = CONFIG_NAME in listing
        else:  # offline: what the cache holds at that revision
            cached, commit = resolve(source, revision=revision, allow_patterns=DELTA_FILE_PATTERNS, **hub.kwargs())
            is_delta = os.path.lexists(cached / CONFIG_NAME)
    # Opened at the revision as given (so that the cache learns a tag for offline use), then the
    # listing is taken again should the revision have moved since it was listed.
    if is_delta:
        reader, base_ckpt = open_pair(source, base, revision=revision, hub=hub, verify_base=verify_base)
        opened = getattr(reader, "commit", None)
        side = _Side(DiffSide(source, "delta", str(reader.path), revision, opened or commit), listing, reader=reader, base=base_ckpt)
    else:
        if base is not None:
            raise DiffError(f"{which}: {source} is a model checkpoint, not a delta: it has no base to override (drop --base-{which[-1].lower()})")
        ckpt = Checkpoint.open(source, revision=revision, **hub.kwargs())
        opened = ckpt.revision
        side = _Side(DiffSide(source, "model", str(ckpt.path), revision, opened or commit), listing, ckpt=ckpt)
    if listing is not None and opened and opened != commit:
        side.listing = _hub_listing(source, opened, hub, which)[1]
    return side


# ------------------------------------------------------------------ comparing


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _compare(name: str, a: torch.Tensor, b: torch.Tensor, da: str, db: str) -> TensorDiff:
    """Compare one tensor of A and B a stretch of :data:`_CHUNK` elements at a time, then price
    B against A with a lossless record."""
    row = TensorDiff(name, "changed", list(a.shape), list(b.shape), da, db)
    same_shape = tuple(a.shape) == tuple(b.shape)
    if same_shape:
        va, vb = a, b
    elif a.dim() == b.dim() and a.dim() > 0 and a.shape[1:] == b.shape[1:]:
        n = min(a.shape[0], b.shape[0])
        va, vb = a[:n], b[:n]
    else:
        va = vb = None
    if va is not None:
        fa, fb = va.reshape(-1), vb.reshape(-1)
        equal, diff2, norm2, worst = 0, 0.0, 0.0, 0.0
        for s in range(0, fa.numel(), _CHUNK):
            ca, cb = fa[s : s + _CHUNK], fb[s : s + _CHUNK]
            equal += int((_bits(ca.to(cb.dtype).contiguous()) == _bits(cb.contiguous())).sum())
            wa, wb = ca.to(torch.float64), cb.to(torch.float64)
            d = wb - wa
            diff2 += float((d * d).sum())
            norm2 += float((wa * wa).sum())
            if d.numel():
                m = float(d.abs().max())
                worst = m if m > worst or math.isnan(m) else worst
        row.compared = fa.numel()
        row.identical_share = equal / fa.numel() if fa.numel() else None
        row.rel_diff = math.sqrt(diff2) / math.sqrt(norm2) if norm2 > 0 else (0.0 if diff2 == 0 else math.inf)
        if math.isnan(diff2):
            row.rel_diff = math.nan
        row.max_abs_diff = worst
        if same_shape and a.dtype == b.dtype and equal == fa.numel():
            row.status = "identical"
            return row
    if same_shape and a.is_floating_point() and b.is_floating_point():
        try:
            row.delta_bytes, row.delta_how = encode_tensor(name, a, b, method="lossless", ratio=None).nbytes, "lossless"
            return row
        except InvalidTensorError:  # NaN or Inf in A or B: no delta, B is stored whole
            pass
    row.delta_bytes, row.delta_how = _whole_nbytes(name, b), "whole"
    return row


def _whole_nbytes(name: str, b: torch.Tensor) -> int:
    """What storing B's tensor whole costs: an ``added`` record where the format has one (a finite
    float tensor), else its raw bytes."""
    if b.is_floating_point():
        try:
            return encode_tensor(name, None, b, method="dense", ratio=None).nbytes
        except InvalidTensorError:
            pass
    return b.numel() * b.element_size()


def _match_files(a: _Side, b: _Side) -> list[FileDiff]:
    by_key: dict[str, str] = {}
    for name, (_, keys, _w) in a.files().items():
        for k in keys:
            by_key.setdefault(k, name)
    out = []
    for name, (size, keys, weights) in b.files().items():
        same = next((by_key[k] for k in sorted(keys) if k in by_key), None)
        out.append(FileDiff(name, size, weights, same))
    return out


def diff(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    revision_a: str | None = None,
    revision_b: str | None = None,
    base_a: str | os.PathLike | None = None,
    base_b: str | os.PathLike | None = None,
    verify_base: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    progress: bool = False,
) -> DiffReport:
    """Compare two decoded models, tensor by tensor, and say what B costs given A.

    ``a`` and ``b`` are each a delta repo or a model checkpoint: a local folder, or a Hub id,
    at a revision given as ``REPO@REV`` or with ``revision_a``/``revision_b`` (a tag, branch or
    commit). A delta is decoded against the base its config records (``base_a``/``base_b`` to
    pass another copy of it), checked to be that base unless ``verify_base=False``; every record
    is checked against the base before anything is decoded, and every decoded tensor for NaN or
    Inf where the base is finite, as ``apply`` does. One tensor of each side is in memory at a
    time. Errors are :class:`DeltahubError` subclasses (a missing folder: :class:`DiffError`).

    Example::

        report = deltahub.diff("user/my-delta@v1", "user/my-delta@v3")
        print(report.changed)                  # the tensors whose bits differ
        print(report.shared_shards)            # v3's shard files that v1 already holds
        print(report.new_file_bytes, report.lossless_delta_bytes)   # what v3 costs given v1
        deltahub.diff("my-delta", "./my-finetune")   # a delta against the fine-tune it stores
    """
    hub = HubOptions(token, cache_dir, local_files_only)
    side_a = _open_side(a, revision_a, base_a, hub, verify_base, "A")
    side_b = _open_side(b, revision_b, base_b, hub, verify_base, "B")
    for side in (side_a, side_b):
        if side.reader is not None:
            # Every shard's header, typed and tiling its file (a truncated shard fails here), even
            # when every tensor it holds is identical by digest and so is not decoded.
            for shard in sorted(set(side.reader.weight_map.values())):
                side.reader.shard_header(shard)
    report = DiffReport(side_a.info, side_b.info)
    names_a, names_b = side_a.names(), side_b.names()
    in_a, in_b = set(names_a), set(names_b)
    order = names_a + [n for n in names_b if n not in in_a]
    for name in progress_bar(order, desc="Comparing", enabled=progress):
        if name not in in_b:
            da, sa = side_a.meta(name)
            report.tensors.append(TensorDiff(name, "only_a", sa, None, da, None, delta_how="removed"))
        elif name not in in_a:
            db, sb = side_b.meta(name)
            with side_b.tensor(name) as tb:
                cost = _whole_nbytes(name, tb)
            report.tensors.append(TensorDiff(name, "only_b", None, sb, None, db, delta_bytes=cost, delta_how="whole"))
        else:
            (da, _), (db, _) = side_a.meta(name), side_b.meta(name)
            # Decoded on both sides even when the records hold the same digest: a record's digest
            # is the author's claim, the bits are what the reader gets.
            with side_a.tensor(name) as ta, side_b.tensor(name) as tb:
                report.tensors.append(_compare(name, ta, tb, da, db))
    report.files = _match_files(side_a, side_b)
    return report
