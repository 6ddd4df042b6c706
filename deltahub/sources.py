"""Where deltas and their bases come from: local folders or Hub repos, and the check that a
base is the one a delta was made against."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from .checkpoint import Checkpoint, resolve
from .errors import BaseMismatchError
from .format import DeltaReader

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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def open_base(
    reader: DeltaReader, base: str | os.PathLike | None = None, base_revision: str | None = None, hub: HubOptions | None = None, *, verify: bool = False
) -> Checkpoint:
    """The base checkpoint: the one given, or the one recorded in ``delta_config.json`` at its
    pinned revision; with ``verify``, checked to be the delta's base (:func:`check_base`)."""
    hub = hub or HubOptions()
    recorded = reader.config.get("base", {})
    if base is None:
        base = recorded.get("name_or_path")
        if not base:
            raise BaseMismatchError("the delta records no base model; pass base=... (a local folder or Hub id)")
        if base_revision is None:
            base_revision = recorded.get("revision")
    ckpt = Checkpoint.open(base, revision=base_revision, **hub.kwargs())
    if verify:
        check_base(reader, ckpt)
    return ckpt


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
    """Raise :class:`BaseMismatchError` naming the differences if ``base`` is not the delta's base."""
    raise_base_mismatch(reader, base.source, base_differences(reader, base), "Pass the right base, or verify_base=False (--no-verify-base) to load anyway.")


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
