"""Which Hub model a delta's base is: recording a Hub id (``ORG/NAME[@REV]``) for a base read
from a local folder, checked against the Hub where it answers.

A delta is useful to others only if its config names a base they can fetch: a Hub repo id
pinned to a commit. A base compressed from a local copy (the usual case right after training)
gets one with ``compress(..., base_id="ORG/NAME@REV")``, or afterwards, without recompressing,
with :func:`set_base_id` (``deltahub set-base DELTA ORG/NAME@REV``).

The check downloads no weights: only the safetensors headers of the Hub repo (a few KB to MB,
by HTTP range requests), from which the spec's fingerprint of tensor names, dtypes and shapes
(spec/FORMAT.md §4.1) is computed and compared with the local base's. What the Hub sends is
untrusted: the index is read bounded (``limits.read_json``), its shard names must be files the
repo lists, and headers are bounded by huggingface_hub (25 MB).
"""

from __future__ import annotations

import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .checkpoint import SAFETENSORS_INDEX, HubRef
from .errors import BaseMismatchError, DeltahubError, FormatError
from .format.config import CARD_NAME, CONFIG_NAME, fingerprint
from .format.limits import MAX_INDEX_BYTES, confined_file, read_json

# "org/name" or "name" (the Hub's rules: letters, digits, "-", "_", "."; no "--" or "..").
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# A branch, tag or commit: no spaces, control characters or "..".
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
# Tensor differences named in a mismatch message.
_SHOWN = 5

Entries = Mapping[str, tuple[str | None, tuple[int, ...]]]


class BaseIdError(DeltahubError, ValueError):
    """A base id cannot be recorded: malformed, or not a safetensors model the Hub shows."""


class BaseIdNotCheckedWarning(UserWarning):
    """A Hub id was recorded for a base without comparing it with the Hub (offline, or
    ``check=False``); ``base.id_checked`` is false in the delta's config."""


@dataclass
class BaseId:
    """A Hub id recorded for a delta's base: ``revision`` is the commit where the Hub answered;
    ``checked`` says whether the Hub's tensor names, dtypes and shapes were compared with the
    base's fingerprint; ``note`` says why not."""

    repo_id: str
    revision: str | None
    checked: bool
    note: str = ""

    def entries(self) -> dict:
        """The ``base`` fields of ``delta_config.json`` it sets."""
        return {"name_or_path": self.repo_id, "revision": self.revision, "id_checked": self.checked}

    def __str__(self) -> str:
        return str(HubRef(self.repo_id, self.revision))


def parse_base_id(text: str) -> HubRef:
    """``"ORG/NAME"`` or ``"ORG/NAME@REV"`` as a :class:`HubRef`; :class:`BaseIdError` otherwise.

    >>> parse_base_id("Qwen/Qwen2.5-0.5B@main")
    HubRef(repo_id='Qwen/Qwen2.5-0.5B', revision='main')
    """
    repo_id, _, revision = str(text).partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or (revision and (not _REVISION.match(revision) or ".." in revision)) or text.endswith("@"):
        raise BaseIdError(
            f"{str(text)[:200]!r} is not a Hub model id: write ORG/NAME or ORG/NAME@REVISION (a commit, tag or branch), e.g. Qwen/Qwen2.5-0.5B@main"
        )
    return HubRef(repo_id, revision or None)


def _unreachable() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the Hub did not answer (offline mode, no network, timeouts)."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        kinds.append(getattr(mod, "TransportError", None) or getattr(mod, "ConnectionError", None) or ConnectionError)
    return tuple(kinds)


def _offline(local_files_only: bool) -> str | None:
    from huggingface_hub import constants

    if local_files_only:
        return "downloads are off (local_files_only=True)"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return None


def hub_tensors(ref: HubRef, token: str | bool | None = None) -> tuple[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """The commit ``ref`` points at and ``{tensor: (dtype, shape)}`` of its safetensors weights,
    read from the headers alone. The weights are chosen as :class:`~deltahub.checkpoint.Checkpoint`
    chooses them: the shards ``model.safetensors.index.json`` names, else every top-level
    ``*.safetensors``. Hub errors pass through (the caller tells "no answer" from "no such repo")."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import SafetensorsParsingError

    api = HfApi(token=token)
    info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    commit = info.sha
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    where = f"{ref.repo_id}@{(commit or '')[:12]}"
    if SAFETENSORS_INDEX in sizes:
        if (sizes[SAFETENSORS_INDEX] or 0) > MAX_INDEX_BYTES:
            raise BaseIdError(f"{where}: {SAFETENSORS_INDEX} holds {sizes[SAFETENSORS_INDEX]} bytes, more than the {MAX_INDEX_BYTES} deltahub reads")
        index = read_json(hf_hub_download(ref.repo_id, SAFETENSORS_INDEX, revision=commit, token=token), f"{where}/{SAFETENSORS_INDEX}", max_bytes=MAX_INDEX_BYTES)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise BaseIdError(f"{where}/{SAFETENSORS_INDEX}: 'weight_map' must be an object of tensor names to shard files")
        files = sorted({f for f in weight_map.values() if isinstance(f, str) and f in sizes})
        if len(files) != len(set(map(str, weight_map.values()))):
            raise BaseIdError(f"{where}/{SAFETENSORS_INDEX} names shard files the repo does not hold; the Hub repo is incomplete")
    else:
        files = sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f and not f.startswith("delta-"))
    if not files:
        raise BaseIdError(f"{where} holds no safetensors weights, so it cannot be the base of a delta (deltahub reads safetensors only)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        try:
            header = api.parse_safetensors_file_metadata(ref.repo_id, f, revision=commit)
        except (SafetensorsParsingError, RecursionError, ValueError) as e:
            raise BaseIdError(f"{where}/{f}: its safetensors header cannot be read ({str(e)[:200]})") from None
        for name, t in header.tensors.items():
            tensors[name] = (str(t.dtype), tuple(int(d) for d in t.shape))
    return commit, tensors


def differences(local: Entries, hub: Entries, limit: int = _SHOWN) -> list[str]:
    """How the tensors of a local base and of a Hub repo differ (``None`` dtypes are not compared)."""
    diffs = []
    for name in sorted(local.keys() & hub.keys()):
        (ld, ls), (hd, hs) = local[name], hub[name]
        if ls != hs:
            diffs.append(f"{name}: shape {list(ls)} locally, {list(hs)} on the Hub")
        elif ld is not None and ld != hd:
            diffs.append(f"{name}: dtype {ld} locally, {hd} on the Hub")
    diffs += [f"{n}: not on the Hub" for n in sorted(local.keys() - hub.keys())]
    diffs += [f"{n}: on the Hub, not in the local base" for n in sorted(hub.keys() - local.keys())]
    more = len(diffs) - limit
    return diffs[:limit] + ([f"and {more} more"] if more > 0 else [])


def check_base_id(
    base_id: str | HubRef,
    local_fingerprint: str | None,
    local: Entries,
    *,
    check: bool = True,
    token: str | bool | None = None,
    local_files_only: bool = False,
    what: str = "the local base",
) -> BaseId:
    """The Hub id to record for a base whose tensors are ``local`` (``{name: (dtype, shape)}``).

    Where the Hub answers, the repo's safetensors headers (:func:`hub_tensors`) must give the
    fingerprint ``local_fingerprint``, else :class:`BaseMismatchError` naming the differences;
    the revision is pinned to the commit it points at. A repo or revision the Hub does not
    show is :class:`BaseIdError`. Where it does not answer (``HF_HUB_OFFLINE``,
    ``local_files_only``, no network) or with ``check=False``, the id is recorded as given,
    ``checked`` false, and a :class:`BaseIdNotCheckedWarning` says so."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    ref = base_id if isinstance(base_id, HubRef) else parse_base_id(base_id)
    reason = "check=False (--no-check)" if not check else _offline(local_files_only)
    if reason is None and not local_fingerprint:
        raise BaseMismatchError(f"{what} has no recorded fingerprint, so {ref} cannot be checked against it; record it unchecked with check=False (--no-check)")
    if reason is None:
        try:
            commit, tensors = hub_tensors(ref, token)
        except RevisionNotFoundError:
            raise BaseIdError(f"{ref.repo_id} has no revision {ref.revision!r} on {constants.ENDPOINT}; give a commit, tag or branch it has") from None
        except RepositoryNotFoundError:
            raise BaseIdError(f"no model {ref.repo_id!r} is visible on {constants.ENDPOINT} (check the name, or log in for a private repo)") from None
        except HfHubHTTPError as e:
            raise BaseIdError(f"checking {ref} on the Hub failed: {str(e).splitlines()[0]}; retry, or record it unchecked with check=False (--no-check)") from None
        except FormatError as e:
            raise BaseIdError(f"{ref}: {e}") from None
        except _unreachable():
            reason = f"{constants.ENDPOINT} cannot be reached"
        else:
            if fingerprint((n, d, s) for n, (d, s) in tensors.items()) != local_fingerprint:
                diffs = differences(local, tensors)
                raise BaseMismatchError(
                    f"{what} is not {ref.repo_id}@{commit[:12]}: "
                    + ("; ".join(diffs) if diffs else "tensor names, dtypes or shapes differ from its fingerprint")
                    + ". Give the Hub id of the model the base was downloaded or copied from (ORG/NAME@REVISION)"
                )
            return BaseId(ref.repo_id, commit, True)
    note = f"{ref} was recorded without checking it against the Hub ({reason}); base.id_checked is false"
    if not ref.revision or not _HEX40.match(ref.revision):
        note += "; pin it to a commit (ORG/NAME@COMMIT) so the delta always finds the same base"
    if check:  # asked for a check that could not be made: say so (check=False asked for none)
        warnings.warn(note, BaseIdNotCheckedWarning, stacklevel=3)
    return BaseId(ref.repo_id, ref.revision, False, note)


def checkpoint_entries(ckpt) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a :class:`~deltahub.checkpoint.Checkpoint`."""
    return {n: (ckpt.info(n).dtype, tuple(ckpt.info(n).shape)) for n in ckpt.names()}


def record_entries(records: Mapping[str, Mapping]) -> dict[str, tuple[None, tuple[int, ...]]]:
    """``{name: (None, shape)}`` of the base tensors a delta's records describe (every record
    but ``added``; a record's dtype is the fine-tune's, so the base's is unknown here)."""
    return {n: (None, tuple(r.get("base_shape") or r["shape"])) for n, r in records.items() if r.get("kind") != "added"}


@dataclass
class SetBaseResult:
    """What :func:`set_base_id` wrote: the delta folder, the id recorded and the new totals."""

    path: Path
    base: BaseId
    stored_bytes: int | None
    ratio: float | None
    # Set when the longer config takes the repo past its method.ratio target (a few bytes on a
    # tiny delta): the figures stay honest, the caller is told.
    note: str = ""

    def __str__(self) -> str:
        checked = "checked against the Hub" if self.base.checked else "NOT checked against the Hub"
        notes = "".join(f"; {n}" for n in (self.base.note, self.note) if n)
        return f"{self.path}: base recorded as {self.base} ({checked}); delta_config.json and README.md rewritten" + notes


def set_base_id(
    delta_dir: str | os.PathLike, base_id: str, *, check: bool = True, token: str | bool | None = None, local_files_only: bool = False
) -> SetBaseResult:
    """Record ``base_id`` (``"ORG/NAME[@REV]"``) as the base of the delta in ``delta_dir``,
    without recompressing: ``delta_config.json`` (``base.name_or_path``, ``base.revision``,
    ``base.id_checked``; ``totals.stored_bytes`` and ``totals.ratio`` recounted, the file's own
    size included) and the card ``README.md`` are rewritten, each by an atomic rename.

    The id is checked against the delta's recorded ``base.fingerprint`` as in
    :func:`check_base_id` (Hub headers only; a mismatch raises :class:`BaseMismatchError`
    and nothing changes). A delta inside the Hugging Face cache is refused: its files are the
    cache's (copy it out first: ``deltahub pull REPO --local-dir DIR``).

    Example::

        deltahub.set_base_id("my-delta", "Qwen/Qwen2.5-0.5B@main")   # then deltahub.push(...)
    """
    from .card import render_card
    from .format import DeltaReader
    from .format.repo import _cache_repo, config_text
    from .sources import delta_shard_bytes

    path = Path(delta_dir)
    cache = _cache_repo(Path(os.path.realpath(path)))
    if cache is not None:
        raise BaseIdError(f"{path} lies inside the Hugging Face cache ({cache}); rewriting it would change the cached files. Copy it out first (deltahub pull REPO --local-dir DIR) and set the base there")
    reader = DeltaReader(path)  # bounded, validated; refuses anything that is not a delta repo
    cfg = dict(reader.config)
    base = cfg.get("base") if isinstance(cfg.get("base"), dict) else {}
    recorded = base.get("fingerprint")
    bid = check_base_id(base_id, recorded, record_entries(reader.records), check=check, token=token, local_files_only=local_files_only, what=f"the base recorded in {path}/{CONFIG_NAME}")
    cfg["base"] = {**base, **bid.entries()}
    index = confined_file(path, "delta.safetensors.index.json", f"{path}: index")
    text = config_text(cfg, delta_shard_bytes(reader) + index.stat().st_size)
    _replace(path, CONFIG_NAME, text.encode())
    _replace(path, CARD_NAME, render_card(cfg).encode())
    totals = cfg.get("totals") if isinstance(cfg.get("totals"), dict) else {}
    return SetBaseResult(path, bid, totals.get("stored_bytes"), totals.get("ratio"), _over_target(cfg))


def _over_target(cfg: Mapping) -> str:
    """A note if ``totals.ratio`` now exceeds the ``method.ratio`` the delta was made for."""
    method = cfg.get("method") if isinstance(cfg.get("method"), Mapping) else {}
    totals = cfg.get("totals") if isinstance(cfg.get("totals"), Mapping) else {}
    target, ratio = method.get("ratio"), totals.get("ratio")
    if isinstance(target, (int, float)) and isinstance(ratio, (int, float)) and ratio > target:
        return f"the repo now stores {ratio:.6f} of the dense delta, above its target {target:g} (the config grew by the base id)"
    return ""


def _replace(folder: Path, name: str, data: bytes) -> None:
    """Write ``folder/name`` by renaming a complete temporary file over it (same folder, same
    permissions as the file it replaces), so a reader never sees half a file."""
    target = confined_file(folder, name, f"{folder}: {name}")
    tmp = folder / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        mode = target.stat().st_mode & 0o777 if target.is_file() else None
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
