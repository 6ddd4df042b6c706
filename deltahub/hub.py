"""The Hub as version history: push, pull, log and rollback of delta repos.

Every push is one commit made against the head it started from (so a concurrent push fails
instead of overwriting) and one tag (``v1``, ``v2``, ... unless named). Shards are grouped by
transformer block and written deterministically, so a new version uploads only the shards
whose bytes changed: the Hub stores files by content hash. Rollback is a forward commit that
copies the old version's files on the server side; nothing is re-uploaded and history stays.

What others pushed is untrusted (spec/SECURITY.md): ``history`` reads each version's
``delta_config.json`` bounded and field by field, and lists a malformed one as unreadable
(:attr:`Version.problem`) instead of failing; the card escapes every value it shows. ``push``
uploads only the files a delta repo consists of, and ``pull`` downloads only those.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .chain import MissingParentError, is_parent_config  # push and rollback refuse a version whose parent is not on the Hub
from .card import human_bytes, md_code, md_text, render_card
from .errors import BaseMismatchError, DeltahubError, FormatError
from .format import CONFIG_NAME, DeltaReader
from .format.config import CARD_NAME, FINETUNED_CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, SHARD_NAME, TOKENIZER_FILES, is_repo_file, validate_config
from .format.limits import MAX_CONFIG_BYTES, confined_file, read_json
from .format.repo import sha256_file

_VERSION_TAG = re.compile(r"^v(\d+)$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
# What pull downloads: exactly the spec's repo files (format.config.is_repo_file), as
# snapshot_download patterns (fnmatch over the whole path, so nothing in a subfolder matches).
REPO_FILE_PATTERNS = [
    CONFIG_NAME, INDEX_NAME, FINETUNED_CONFIG_NAME, GENERATION_CONFIG_NAME, CARD_NAME, *TOKENIZER_FILES,
    "delta-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors",
]
# Files the Hub and push manage themselves: never uploaded from the folder nor deleted.
_MANAGED = (CARD_NAME, ".gitattributes")
# Tries at tagging a landed commit when other pushes keep taking the next vN.
_TAG_TRIES = 5


class HubError(DeltahubError):
    """A Hub operation failed; the message says why and what to do."""


class LocalBaseError(HubError):
    """A push of a delta whose base is not a Hub id pinned to a revision (only a local path)."""


# A Hub repo id ("org/name" or "name"), as base.name_or_path records one.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_hub_base(config: dict, folder: str | os.PathLike) -> None:
    """Refuse (:class:`LocalBaseError`, with the command that fixes it) a delta config whose
    ``base`` is not a Hub repo id with a revision, so others could not fetch the base."""
    base = config.get("base") if isinstance(config.get("base"), dict) else {}
    name, revision = base.get("name_or_path"), base.get("revision")
    if isinstance(name, str) and _REPO_ID.fullmatch(name) and isinstance(revision, str) and revision:
        return
    what = f"the local folder {name}" if isinstance(name, str) and name else "no base at all"
    if isinstance(name, str) and _REPO_ID.fullmatch(name):
        what = f"{name} without a revision"
    raise LocalBaseError(
        f"{folder}: {CONFIG_NAME} records {what} as the base (base.name_or_path, base.revision), which nobody who pulls this "
        f"delta can fetch. Record the Hub id of that base without recompressing: `deltahub set-base {shlex.quote(str(folder))} ORG/NAME@REVISION` "
        "(deltahub.set_base_id), checked against the Hub, then push again; or push anyway with --allow-local-base (allow_local_base=True)"
    )


def check_hub_parent(api: HfApi, config: dict, where: str, token) -> None:
    """Refuse (:class:`MissingParentError`) a chain member whose parent is not a Hub version
    that decodes to the weights it names: ``parent.name_or_path`` a repo id, ``parent.revision``
    a commit there, its config's ``finetuned.weights`` the child's ``parent.weights``. Nothing
    may leave a version whose parent is gone."""
    from .format.config import MAX_CHAIN_DEPTH

    for _ in range(MAX_CHAIN_DEPTH):  # down to the keyframe: configs only
        config = _check_one_parent(api, config, where, token)
        if config is None:
            return
        where = f"{where} (through its parent)"
    raise MissingParentError(f"{where}: the chain is deeper than {MAX_CHAIN_DEPTH} versions; the repo is corrupted")


def _check_one_parent(api: HfApi, config: dict, where: str, token) -> dict | None:
    """The parent's config when ``config`` is a chain member whose parent is on the Hub as it says (None for a keyframe)."""
    parent = config.get("parent")
    if not isinstance(parent, dict):
        return None
    name, revision = parent.get("name_or_path"), parent.get("revision")
    fix = ("push the parent version first and compress this one against it by its Hub id (--parent REPO --parent-revision COMMIT), "
           "or compress this version against the base (a keyframe)")
    if not (isinstance(name, str) and _REPO_ID.fullmatch(name) and isinstance(revision, str) and _HEX40.fullmatch(revision)):
        raise MissingParentError(f"{where}: its parent is {name}{'@' + revision if revision else ''}, not a Hub repo at a commit, so nobody who pulls it could load it; {fix}")
    try:
        cfg, problem = _config_at(api, name, revision, token)
    except HfHubHTTPError as e:
        raise MissingParentError(f"{where}: its parent {name}@{revision[:12]} cannot be read on the Hub ({_hub_error(e, name)}); {fix}") from None
    if cfg is None or problem:
        raise MissingParentError(f"{where}: its parent {name}@{revision[:12]} is not a readable deltahub version on the Hub ({problem or 'no ' + CONFIG_NAME}); {fix}")
    if not is_parent_config(cfg, parent):
        raise MissingParentError(f"{where}: {name}@{revision[:12]} decodes to other weights than the parent this version was made against (or stands on another number of versions); {fix}")
    return cfg


class ConcurrentPushError(HubError):
    """The branch moved while pushing: someone else pushed first."""


class UntaggedPushError(HubError):
    """The push's commit landed on the branch but could not be tagged.

    ``result`` is the push (``result.commit`` landed, ``result.tag`` is empty) and ``command``
    the ``hf`` command that tags it."""

    def __init__(self, message: str, result: "PushResult", command: str):
        super().__init__(message)
        self.result, self.command = result, command


@dataclass
class Version:
    """One version of a delta repo: a commit on the branch, with its tags and its delta's figures."""

    commit: str
    tags: list[str]
    date: datetime | None
    message: str
    method: str | None = None
    ratio: float | None = None
    stored_bytes: int | None = None
    dense_bytes: int | None = None
    base: str | None = None
    base_fingerprint: str | None = None
    # A version stored against its parent (spec §4.4): "REPO@COMMIT" of the parent, and how many
    # versions stand below it down to its keyframe (0: a keyframe, stored against the base).
    parent: str | None = None
    depth: int = 0
    weights: str | None = None  # finetuned.weights: which weights this version decodes to
    files: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # path -> (size, lfs sha256)
    # Why this commit's delta_config.json cannot be read (too large, not JSON, a field of the wrong
    # type), or None. Such a version is listed with method None and left out of totals and cards.
    problem: str | None = None


@dataclass
class History:
    """Versions newest first, and what the history costs."""

    repo_id: str
    versions: list[Version]

    @property
    def stored_bytes(self) -> int:
        """Bytes the Hub keeps for all versions: each distinct file content once."""
        seen: dict[str, int] = {}
        for v in self.versions:
            for path, (size, oid) in v.files.items():
                seen[oid or f"{v.commit}:{path}"] = size
        return sum(seen.values())

    @property
    def full_model_bytes(self) -> int:
        """What keeping every version as a full fine-tuned model would cost."""
        return sum(v.dense_bytes or 0 for v in self.versions if v.method is not None)

    @property
    def unreadable(self) -> list[Version]:
        """Versions whose ``delta_config.json`` cannot be read (:attr:`Version.problem`), newest first."""
        return [v for v in self.versions if v.problem]

    def summary(self) -> str:
        n = sum(1 for v in self.versions if v.method is not None)
        full = self.full_model_bytes
        saved = f", {full / self.stored_bytes:.1f}x less" if self.stored_bytes else ""
        text = f"{n} version{'s take' if n != 1 else ' takes'} {human_bytes(self.stored_bytes)} on the Hub; as full models they would take {human_bytes(full)}{saved}"
        if self.unreadable:
            names = ", ".join(", ".join(v.tags) or v.commit[:8] for v in self.unreadable)
            text += f"; {len(self.unreadable)} unreadable version{'s' if len(self.unreadable) != 1 else ''} left out ({names})"
        return text


@dataclass
class PushResult:
    """What a push or rollback did. ``tag`` is the tag actually used ("" for a pull request)."""

    repo_id: str
    commit: str
    tag: str
    url: str
    uploaded_bytes: int
    reused_bytes: int
    files: int
    # Names in the pushed folder that are not part of a delta repo (or shards the index does not
    # name), so were not uploaded; folders end with "/".
    skipped: list[str] = field(default_factory=list)
    # Anything the caller should know, e.g. that the planned tag was taken by another push.
    note: str = ""

    def __str__(self) -> str:
        where = f"{self.repo_id}@{self.tag}" if self.tag else f"a pull request to {self.repo_id} ({self.url})"
        text = (
            f"pushed {where} ({self.commit[:12]}): {self.files} files, {human_bytes(self.uploaded_bytes)} uploaded, "
            f"{human_bytes(self.reused_bytes)} already on the Hub"
        )
        if self.note:
            text += f"; {self.note}"
        if self.skipped:
            text += f"; not uploaded (not part of a delta repo): {', '.join(self.skipped)}"
        return text


def _api(token: str | bool | None) -> HfApi:
    return HfApi(token=token)


def _status(e: Exception) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


def _hub_error(e: Exception, repo_id: str) -> HubError:
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"no repo {repo_id!r} is visible on the Hub (check the name, or log in for private repos)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo_id}: {e}")
    return HubError(f"{repo_id}: the Hub answered {_status(e) or 'an error'}: {str(e).splitlines()[0]}")



def _tree(api: HfApi, repo_id: str, revision: str) -> dict[str, tuple[int, str | None]]:
    """``path -> (size, content id)``: an LFS file's SHA-256, a small file's ``git:<blob id>``
    (two configs of one size are still told apart), None when the Hub gives neither."""
    out = {}
    for entry in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        if isinstance(entry, RepoFile):
            out[entry.path] = (entry.size, entry.lfs.sha256 if entry.lfs else (f"git:{entry.blob_id}" if entry.blob_id else None))
    return out


def _is_lfs(oid: str | None) -> bool:
    return bool(oid) and not oid.startswith("git:")


def _config_at(api: HfApi, repo_id: str, revision: str, token, files: dict | None = None) -> tuple[dict | None, str | None]:
    """``(config, None)`` of ``delta_config.json`` at ``revision``, ``(None, None)`` if there is
    none, or ``(None, problem)`` if it cannot be read as a deltahub config: larger than
    MAX_CONFIG_BYTES (checked on the listed size before downloading), not JSON, nested too deep,
    or a field of the wrong type (:func:`_check_config`). ``files`` is the commit's tree if known."""
    where = f"{CONFIG_NAME} at {revision[:12]}"
    if files is not None:
        size = files[CONFIG_NAME][0] if CONFIG_NAME in files else None
    else:
        found = [f for f in api.get_paths_info(repo_id, [CONFIG_NAME], revision=revision) if isinstance(f, RepoFile)]
        size = found[0].size if found else None
    if size is None:
        return None, None
    if size > MAX_CONFIG_BYTES:
        return None, f"{where} holds {size} bytes, more than the {MAX_CONFIG_BYTES} deltahub reads"
    try:
        path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token)
    except EntryNotFoundError:
        return None, None
    try:
        cfg = read_json(path, where, max_bytes=MAX_CONFIG_BYTES)
        _check_config(cfg, where)
    except FormatError as e:
        return None, str(e)
    return cfg, None


def _field(obj: dict, key: str, kinds: tuple[type, ...], where: str, path: str, required: bool = False):
    """``obj[key]`` if it has one of ``kinds`` (None if absent and not ``required``), else FormatError naming the field."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = " or ".join({dict: "an object", str: "a string", int: "an integer", float: "a number"}[k] for k in kinds)
        got = "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
        raise FormatError(f"{where}: field {path!r} is {got}, expected {want}; this version was not written by deltahub (or was edited by hand)")
    return value


def _check_config(cfg: object, where: str) -> None:
    """The checks a version's config must pass to be listed, compared and rolled back to: a
    deltahub config (format, format_version, tensors), ``base`` an object of strings and sample
    digests, ``method`` an object with a ``name``, ``totals`` numbers. FormatError names the field."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{where} must hold a JSON object")
    try:
        validate_config(cfg)
    except FormatError as e:  # its message starts with the file's name: add which version
        text = str(e)
        raise FormatError(where + text[len(CONFIG_NAME):] if text.startswith(CONFIG_NAME) else f"{where}: {text}") from None
    base = _field(cfg, "base", (dict,), where, "base", required=True)
    for key in ("name_or_path", "revision", "fingerprint"):
        _field(base, key, (str,), where, f"base.{key}")
    samples = _field(base, "samples", (dict,), where, "base.samples") or {}
    bad = next((n for n, d in samples.items() if not isinstance(d, str)), None)
    if bad is not None:
        raise FormatError(f"{where}: field 'base.samples' holds {type(samples[bad]).__name__} for {bad!r}, expected a digest string")
    method = _field(cfg, "method", (dict,), where, "method", required=True)
    if not _field(method, "name", (str,), where, "method.name", required=True):
        raise FormatError(f"{where}: field 'method.name' is empty")
    totals = _field(cfg, "totals", (dict,), where, "totals") or {}
    _field(totals, "ratio", (int, float), where, "totals.ratio")
    for key in ("stored_bytes", "dense_bytes"):
        _field(totals, key, (int,), where, f"totals.{key}")


def _fill(v: Version, cfg: dict) -> Version:
    """``v`` with its delta's figures from a config that passed :func:`_check_config`."""
    base, totals = cfg["base"], cfg.get("totals") or {}
    v.method = cfg["method"]["name"]
    v.ratio, v.stored_bytes, v.dense_bytes = totals.get("ratio"), totals.get("stored_bytes"), totals.get("dense_bytes")
    v.base = (base.get("name_or_path") or "") + (f"@{base['revision']}" if base.get("revision") else "")
    v.base_fingerprint = base.get("fingerprint")
    parent = cfg.get("parent")
    if isinstance(parent, dict):
        v.parent = parent["name_or_path"] + (f"@{parent['revision']}" if parent.get("revision") else "")
        v.depth = parent["depth"]
    v.weights = (cfg.get("finetuned") or {}).get("weights")
    return v


def history(repo_id: str, *, branch: str = "main", token: str | bool | None = None, with_files: bool = True) -> History:
    """The versions of a delta repo on ``branch``, newest first.

    A commit whose ``delta_config.json`` cannot be read is listed with :attr:`Version.problem`
    set (and method None), so one bad commit does not stop ``log``, ``push`` or ``rollback``.

    Example::

        for v in deltahub.history("user/my-delta").versions:
            print(v.tags, v.commit[:8], v.method, v.ratio, v.problem or "")
    """
    api = _api(token)
    try:
        refs = api.list_repo_refs(repo_id)
        commits = api.list_repo_commits(repo_id, revision=branch)
        tags_by_commit: dict[str, list[str]] = {}
        for t in refs.tags:
            tags_by_commit.setdefault(t.target_commit, []).append(t.name)
        versions = []
        for c in commits:
            v = Version(c.commit_id, sorted(tags_by_commit.get(c.commit_id, []), key=_tag_key), c.created_at, (c.title or "").strip())
            files = _tree(api, repo_id, c.commit_id) if with_files else None
            cfg, v.problem = _config_at(api, repo_id, c.commit_id, token, files)
            if cfg is not None:
                _fill(v, cfg).files = files or {}
            versions.append(v)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    return History(repo_id, versions)


def _tag_key(tag: str) -> tuple[int, str]:
    m = _VERSION_TAG.match(tag)
    return (int(m.group(1)) if m else -1, tag)


def _next_tag(tags: list[str]) -> str:
    numbers = [int(m.group(1)) for t in tags if (m := _VERSION_TAG.match(t))]
    return f"v{max(numbers, default=0) + 1}"


def _versions_table(hist: History, new: Version | None) -> str:
    rows = ([new] if new else []) + [v for v in hist.versions if v.method is not None]
    lines = ["## Versions", "", "| version | commit | date | method | ratio | stored | message |", "|---|---|---|---|---|---|---|"]
    for v in rows:  # everything but the date and sizes came from someone's commit: escaped
        date = v.date.strftime("%Y-%m-%d") if v.date else "now"
        commit = md_code(v.commit[:8]) if v.commit else "this"
        ratio = f"{v.ratio:.4f}" if isinstance(v.ratio, (int, float)) else "-"
        lines.append(f"| {md_text(', '.join(v.tags) or '-')} | {commit} | {date} | {md_code(v.method)} | {ratio} | {human_bytes(v.stored_bytes or 0)} | {md_text(v.message)} |")
    return "\n".join(lines) + "\n"


def _refs(api: HfApi, repo_id: str, branch: str) -> tuple[str | None, dict[str, str]]:
    """The head of ``branch`` (None if there is no such branch) and ``{tag: commit}``."""
    refs = api.list_repo_refs(repo_id)
    head = next((b.target_commit for b in refs.branches if b.name == branch), None)
    return head, {t.name: t.target_commit for t in refs.tags}


def _head(api: HfApi, repo_id: str, branch: str) -> tuple[str | None, list[str]]:
    head, tags = _refs(api, repo_id, branch)
    return head, list(tags)


def _repo_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The files of ``folder`` that a delta repo consists of (:func:`format.config.is_repo_file`),
    as ``{name: real path}``, and the names of everything else in it (folders end with "/").

    Nothing that is not a repo file is opened: a ``.env`` or a link to a secret is only named.
    A repo file that is a link leading out of the folder is refused (FormatError naming it; the
    message is the same whether or not the target exists). The card is left out of both: push
    writes its own."""
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder: push takes a delta repo folder written by `deltahub compress`")
    files: dict[str, Path] = {}
    skipped: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = entry.name
        if name == CARD_NAME:
            continue
        if not is_repo_file(name):
            skipped.append(name + "/" if entry.is_dir(follow_symlinks=False) else name)
            continue
        try:
            path = confined_file(folder, name, f"push of {folder}")
        except FormatError as e:
            raise FormatError(f"{e}. push uploads only files inside the folder: copy {name} into it instead of linking it") from None
        real = Path(os.path.realpath(path))  # upload what was checked, even if the link changes later
        if real.is_file():
            files[name] = real
        else:
            skipped.append(name + "/" if real.is_dir() else name)
    return files, skipped


def _select_shards(reader: DeltaReader, files: dict[str, Path], skipped: list[str]) -> None:
    """Keep in ``files`` only the shards the index names (others go to ``skipped``); FormatError
    if the index names a shard the folder lacks."""
    named = set(reader.weight_map.values())
    for shard in sorted(named):
        if not isinstance(shard, str) or not SHARD_NAME.match(shard):
            raise FormatError(f"{reader.path}: {INDEX_NAME} names {shard!r}, which is not a shard file name (delta-NNNNN-of-NNNNN.safetensors); write the delta again")
        if shard not in files:
            raise FormatError(f"{reader.path}: shard {shard}, named in {INDEX_NAME}, is missing; write the delta again with `deltahub compress`")
    for name in [n for n in files if SHARD_NAME.match(n) and n not in named]:
        del files[name]
        skipped.append(name)
    skipped.sort()


def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> bool:
    """Create ``repo_id`` unless it exists; True if this call created it."""
    try:
        api.create_repo(repo_id, private=private)
        return True
    except HfHubHTTPError as e:
        if _status(e) == 409:
            return False
        if _status(e) in (401, 402, 403):  # no right to create in that namespace: fine if it exists
            try:
                api.repo_info(repo_id)
                return False
            except HfHubHTTPError:
                pass
        raise _hub_error(e, repo_id) from None


def _undo_created_repo(api: HfApi, repo_id: str, start: dict[str, str] | None, error: Exception) -> DeltahubError:
    """After the first push to a repo it created failed before its commit landed: delete the repo
    (so no empty repo is left) if nobody else used it meanwhile, and say so in the error; else say
    that an empty repo was left and how to remove it."""
    err = error if isinstance(error, DeltahubError) else HubError(f"{repo_id}: {error}")
    said = str(err).rstrip(". ")
    try:
        refs = api.list_repo_refs(repo_id)
        untouched = start is not None and not refs.tags and all(b.target_commit in start.values() for b in refs.branches)
        if untouched:
            api.delete_repo(repo_id)
            return type(err)(f"{said}. The empty repo {repo_id} that this push created was deleted.")
        reason = "it changed meanwhile, so it was kept" if start is not None else "its state could not be read, so it was kept"
    except HfHubHTTPError as e:
        reason = f"deleting it failed: the Hub answered {_status(e) or 'an error'}"
    return type(err)(
        f"{said}. This push created {repo_id} and left it without a version ({reason}); "
        f"remove it with `hf repos delete {repo_id}` (or HfApi().delete_repo({repo_id!r})) if nobody uses it."
    )


def _tag_landed(api: HfApi, repo_id: str, result: PushResult, tag: str, *, auto: bool, message: str | None, branch: str) -> PushResult:
    """Tag the commit of ``result``, which has landed on ``branch``, and return ``result`` with the
    tag used. A ``vN`` another push took meanwhile moves on to the next free ``vN`` (a few tries);
    any other failure raises :class:`UntaggedPushError`, which says the commit landed and gives
    the command that tags it."""
    wanted = tag
    reason = ""
    for _ in range(_TAG_TRIES):
        try:
            api.create_tag(repo_id, tag=tag, revision=result.commit, tag_message=message)
            result.tag = tag
            if tag != wanted:
                result.note = f"{wanted} was taken by another push meanwhile, so this version is {tag}"
            return result
        except HfHubHTTPError as e:
            reason = str(e).splitlines()[0].rstrip(". ")
            if _status(e) != 409:
                break
        try:  # the name was taken meanwhile: by us (a retried request) or by another push
            _, tags = _refs(api, repo_id, branch)
        except HfHubHTTPError:
            break
        if tags.get(tag) == result.commit:
            result.tag = tag
            return result
        reason = f"{tag} was taken by another push meanwhile"
        if not auto:
            break
        tag = _next_tag(list(tags))
    suggest = tag if auto else f"{wanted}-2"
    command = f"hf repos tag create {repo_id} {suggest} --revision {result.commit}"
    result.tag = ""
    raise UntaggedPushError(
        f"{repo_id}: the commit {result.commit} landed on {branch}, but tagging it failed ({reason}). "
        f"The version is on the Hub without a tag; tag it with `{command}` "
        f"(or HfApi().create_tag({repo_id!r}, tag={suggest!r}, revision={result.commit!r})).",
        result,
        command,
    )


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    tag: str | None = None,
    message: str | None = None,
    private: bool | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    allow_local_base: bool = False,
) -> PushResult:
    """Upload a delta repo folder as one new version (one commit, one tag).

    A delta whose base is not a Hub repo id pinned to a revision (a local folder, recorded by
    ``compress`` from a local base) is refused with :class:`LocalBaseError` before the Hub is
    asked anything: nobody who pulls it could load it. The message gives the fix, a one-line
    command that records the base's Hub id without recompressing (``deltahub set-base``,
    :func:`deltahub.set_base_id`); ``allow_local_base=True`` pushes it anyway.

    Only the files a delta repo consists of are uploaded (:func:`format.config.is_repo_file`:
    config, index, the shards the index names, the fine-tune's config, generation config,
    tokenizer files) plus a card written here; anything else in the folder (``.env``, notes,
    folders) is listed in :attr:`PushResult.skipped` and never read. A repo file that is a link
    leading out of the folder is refused (FormatError).

    The commit is made against the branch head seen when the push started: if someone else
    pushed meanwhile, :class:`ConcurrentPushError` is raised and nothing is changed. Only shards
    whose content is not on the Hub yet are uploaded. Once the commit has landed the push counts:
    if another push took the planned ``vN`` meanwhile, the next free ``vN`` is used (see
    ``PushResult.tag`` and ``note``); if tagging fails otherwise, :class:`UntaggedPushError`
    gives the commit and the command that tags it. If this push created the repo and fails
    before its commit lands, the repo is deleted again (or the error says how to remove it).

    Example::

        deltahub.push("my-delta", "user/my-delta", message="lr 1e-5, 3 epochs")   # tagged v1, v2, ...
    """
    folder = Path(path)
    files, skipped = _repo_files(folder)  # before anything is read: a link out is refused here
    reader = DeltaReader(folder)  # refuses anything that is not a complete delta repo
    _select_shards(reader, files, skipped)
    _check_config(reader.config, f"{folder}: {CONFIG_NAME}")  # what others' `log` must be able to read
    if not allow_local_base:
        check_hub_base(reader.config, folder)
    api = _api(token)
    try:
        _parent_on_hub(api, reader, files, repo_id, branch or "main", token)
        check_hub_parent(api, reader.config, str(folder), token)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    branch = branch or "main"
    created = _create_repo(api, repo_id, private)
    start = None
    try:
        if created:
            start, _ = _refs(api, repo_id, "main")
            start = {"main": start} if start else {}
        result, tag, auto = _push_commit(api, reader, files, skipped, repo_id, tag, message, branch, create_pr, token)
    except Exception as e:
        if created:
            raise _undo_created_repo(api, repo_id, start, _hub_error(e, repo_id) if isinstance(e, HfHubHTTPError) else e) from None
        if isinstance(e, HfHubHTTPError):
            raise _hub_error(e, repo_id) from None
        raise
    if create_pr:  # not a version until merged: no tag; the result points at the pull request
        return result
    return _tag_landed(api, repo_id, result, tag, auto=auto, message=message, branch=branch)


def _parent_on_hub(api: HfApi, reader: DeltaReader, files: dict, repo_id: str, branch: str, token) -> None:
    """A chain member whose parent is a local folder is pushed against the version of
    ``repo_id`` that decodes to the same weights (``finetuned.weights``), when the repo has one:
    the uploaded ``delta_config.json`` names that version (the local file is left as it is), so
    a run compressed locally version by version can be pushed version by version."""
    from .chain import is_local_parent
    from .format.repo import config_text
    from .sources import delta_shard_bytes

    parent = reader.config.get("parent")
    if not isinstance(parent, dict) or not is_local_parent(parent["name_or_path"]) or not api.repo_exists(repo_id):
        return
    for v in history(repo_id, branch=branch, token=token, with_files=False).versions:
        if v.weights == parent["weights"] and v.depth == parent["depth"] - 1 and not v.problem:
            cfg = {**reader.config, "parent": {**parent, "name_or_path": repo_id, "revision": v.commit}}
            fixed = delta_shard_bytes(reader) + files[INDEX_NAME].stat().st_size
            reader.config = cfg  # what the card, the checks and the commit see
            files[CONFIG_NAME] = config_text(cfg, fixed).encode()
            return


def _push_commit(api: HfApi, reader: DeltaReader, files: dict[str, Path], skipped: list[str], repo_id: str, tag: str | None, message: str | None, branch: str, create_pr: bool, token) -> tuple[PushResult, str, bool]:
    """The commit of a push (untagged), the tag planned for it, and whether that tag was chosen here."""
    head, tags = _head(api, repo_id, branch)
    if head is None:
        api.create_branch(repo_id, branch=branch)
        head, tags = _head(api, repo_id, branch)
    auto = tag is None
    tag = tag or _next_tag(tags)
    if tag in tags:
        raise HubError(f"{repo_id} already has a version tagged {tag!r}; choose another --tag")
    hist = history(repo_id, branch=branch, token=token)
    head_files = _tree(api, repo_id, head)  # the head itself, even if its config is unreadable
    known = {oid for v in hist.versions for (_, oid) in v.files.values() if _is_lfs(oid)}
    uploaded = reused = 0
    ops: list = []
    for rel, p in files.items():
        if isinstance(p, bytes):  # a config rewritten for the push (_parent_on_hub)
            ops.append(CommitOperationAdd(rel, p))
            continue
        size = p.stat().st_size
        if SHARD_NAME.match(rel):
            if sha256_file(p) in known:
                reused += size
            else:
                uploaded += size
        ops.append(CommitOperationAdd(rel, p))
    msg = message or f"deltahub push {tag}"
    new = _fill(Version("", [tag], None, msg), reader.config)
    card = render_card(reader.config, repo_id) + "\n" + _versions_table(hist, new)
    ops.append(CommitOperationAdd(CARD_NAME, card.encode()))
    ops += [CommitOperationDelete(rel) for rel in head_files if rel not in files and rel not in _MANAGED]
    commit = _commit(api, repo_id, ops, msg, head, branch, create_pr)
    url = (commit.pr_url or commit.commit_url) if create_pr else commit.commit_url
    return PushResult(repo_id, commit.oid, "", url, uploaded, reused, len(ops), skipped), tag, auto


def _commit(api: HfApi, repo_id: str, ops: list, message: str, parent: str | None, branch: str, create_pr: bool):
    try:
        return api.create_commit(repo_id, ops, commit_message=message, parent_commit=parent, revision=branch, create_pr=create_pr)
    except HfHubHTTPError as e:
        if _status(e) == 412:
            raise ConcurrentPushError(
                f"{repo_id}@{branch} moved while pushing (someone else pushed first); nothing was changed. "
                "Pull the latest version, check it, and push again."
            ) from None
        raise _hub_error(e, repo_id) from None
    except (RuntimeError, OSError) as e:  # huggingface_hub wraps failed LFS uploads in RuntimeError
        cause = e.__cause__ or e
        raise HubError(f"{repo_id}: uploading failed ({str(cause).splitlines()[0]}); nothing was committed, push again") from None


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    base: bool = True,
) -> Path:
    """Download a version (tag, branch or commit) into the Hugging Face cache, or ``local_dir``.

    Only the files a delta repo consists of are downloaded (:data:`REPO_FILE_PATTERNS`), whatever
    else the repo holds. With ``HF_HUB_OFFLINE=1`` it answers from the cache. A version stored
    against its parent brings its parents down to the keyframe into the cache too, so that it
    loads offline afterwards. With ``base=True`` (default) the base the version records, when it
    is a Hub repo at a pinned commit, is brought into the cache as well: then the version loads
    with ``HF_HUB_OFFLINE=1`` on a fresh machine.

    Example::

        path = deltahub.pull("user/my-delta", revision="v2")
    """
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, token=token, cache_dir=cache_dir, allow_patterns=REPO_FILE_PATTERNS))
        _pull_parents(path, token, cache_dir)
        if base:
            _pull_base(path, token, cache_dir)
        return path
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None


def _pull_base(path: Path, token, cache_dir) -> None:
    """The base a version records, into the cache, when it is a Hub repo at a commit (a local
    base, or an unpinned id, is left to loading to find)."""
    from .checkpoint import MODEL_FILE_PATTERNS
    from .format.config import read_config

    from huggingface_hub.errors import HFValidationError

    recorded = read_config(path / CONFIG_NAME, f"{path}/{CONFIG_NAME}").get("base") or {}
    name, revision = recorded.get("name_or_path"), recorded.get("revision")
    if isinstance(name, str) and _REPO_ID.fullmatch(name) and isinstance(revision, str) and _HEX40.fullmatch(revision):
        try:
            snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=MODEL_FILE_PATTERNS)
        except (HfHubHTTPError, HFValidationError) as e:
            raise HubError(
                f"the version was downloaded ({path}), but its base {name}@{revision[:12]} could not be: {str(e).splitlines()[0][:200]}. "
                "Pull with --no-base (base=False) and pass the base when loading (--base), or log in if the base is gated"
            ) from None


def _pull_parents(path: Path, token, cache_dir) -> None:
    """For a version stored against its parent, download each parent down to the keyframe into
    the cache, so that the version loads offline afterwards (at most MAX_CHAIN_DEPTH)."""
    from .format.config import MAX_CHAIN_DEPTH, read_config

    from .chain import ChainError, _parent_config
    from .sources import HubOptions

    for _ in range(MAX_CHAIN_DEPTH):
        child = read_config(path / CONFIG_NAME, f"{path}/{CONFIG_NAME}")
        parent = child.get("parent")
        if parent is None:
            return
        name, revision = parent["name_or_path"], parent.get("revision")
        if not (_REPO_ID.fullmatch(name) and revision):
            return  # a local parent: loading names it if it is missing
        # The parent's config alone first: a parent that is another version, or no version,
        # is refused before its shards are downloaded.
        cfg, _, _, _ = _parent_config(name, revision, HubOptions(token, cache_dir, False))
        if not is_parent_config(cfg, parent):
            raise ChainError(f"{path}: its parent {name}@{revision[:12]} is not the version it was made against (weights digest or depth); the repo is broken or hostile")
        path = Path(snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=REPO_FILE_PATTERNS))


def base_differences(head: dict, target: dict) -> list[str]:
    """How the bases two versions' configs record differ (empty if they are the same base): the
    fingerprint (names, dtypes, shapes), the sample digests of the tensors both record (other
    weights of the same shapes), the revision where both record one, and the name where both are
    pinned Hub ids (local paths of one base differ from machine to machine, so they are not
    compared)."""
    a, b = head.get("base") or {}, target.get("base") or {}
    diffs = []
    if a.get("fingerprint") != b.get("fingerprint"):
        diffs.append("tensor names, dtypes or shapes differ (base.fingerprint)")
    sa, sb = a.get("samples") or {}, b.get("samples") or {}
    if head.get("parent") is not None or target.get("parent") is not None:
        sa = sb = {}  # a chain member's samples are its parent's weights (spec §4.4), not its base's
    other = sorted(n for n in sa.keys() & sb.keys() if sa[n] != sb[n])
    if other:
        diffs.append(f"{len(other)} tensors have the same shape but other weights (base.samples), e.g. {other[0]}")
    if a.get("revision") and b.get("revision"):
        if a.get("name_or_path") != b.get("name_or_path"):
            diffs.append(f"another base model (base.name_or_path {b.get('name_or_path')!r}, not {a.get('name_or_path')!r})")
        if a["revision"] != b["revision"]:
            diffs.append(f"another revision of the base (base.revision {b['revision'][:12]}, not {a['revision'][:12]})")
    return diffs


def rollback(
    repo_id: str,
    to: str,
    *,
    message: str | None = None,
    force: bool = False,
    branch: str = "main",
    tag: str | None = None,
    token: str | bool | None = None,
) -> PushResult:
    """Make the head equal to version ``to`` again, with a new commit and tag.

    LFS files are copied on the server (nothing is re-uploaded), files ``to`` did not have are
    deleted, history and tags stay. Only the files a delta repo consists of are copied. A
    version made against another base (:func:`base_differences`: fingerprint, sample digests,
    revision) is refused with BaseMismatchError unless ``force=True``; a version stored against a
    parent that is not on the Hub is refused (:class:`MissingParentError`); a version whose config
    cannot be read (:attr:`Version.problem`) is refused with HubError. A head whose config
    cannot be read can be rolled back from (that is how one repairs it).

    Example::

        deltahub.rollback("user/my-delta", to="v2")
    """
    api = _api(token)
    try:
        head, by_tag = _refs(api, repo_id, branch)
        if to in by_tag:
            target = by_tag[to]
        elif _HEX40.fullmatch(to):
            target = to
        else:
            known = ", ".join(sorted(by_tag, key=_tag_key)) or "none"
            raise HubError(f"{repo_id} has no version {to!r}; its versions are: {known}")
        target_cfg, problem = _config_at(api, repo_id, target, token)
        if problem:
            raise HubError(f"{repo_id}@{to} cannot be rolled back to: {problem}. Choose another version (`deltahub log {repo_id}` lists them)")
        if target_cfg is None:
            raise HubError(f"{repo_id}@{to} holds no {CONFIG_NAME}: it is not a deltahub version")
        check_hub_parent(api, target_cfg, f"{repo_id}@{to}", token)
        head_cfg = _config_at(api, repo_id, head, token)[0] if head else None
        diffs = base_differences(head_cfg, target_cfg) if head_cfg else []
        if diffs and not force:
            raise BaseMismatchError(
                f"{repo_id}@{to} was made against another base ({target_cfg['base'].get('name_or_path')}) than the head "
                f"({head_cfg['base'].get('name_or_path')}): {'; '.join(diffs)}. Pass force=True (--force) to roll back anyway"
            )
        target_files = {p: f for p, f in _tree(api, repo_id, target).items() if is_repo_file(p)}
        head_files = _tree(api, repo_id, head) if head else {}
        hist = history(repo_id, branch=branch, token=token, with_files=False)
        auto = tag is None
        tag = tag or _next_tag(list(by_tag))
        ops: list = []
        for path, (size, oid) in target_files.items():
            if path in _MANAGED or (oid is not None and head_files.get(path) == (size, oid)):
                continue
            if _is_lfs(oid):
                ops.append(CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=target))
            else:
                ops.append(CommitOperationAdd(path, Path(hf_hub_download(repo_id, path, revision=target, token=token))))
        ops += [CommitOperationDelete(p) for p in head_files if p not in target_files and p not in _MANAGED]
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    msg = message or f"Roll back to {to}"
    new = _fill(Version("", [tag], None, msg), target_cfg)
    ops.append(CommitOperationAdd(CARD_NAME, (render_card(target_cfg, repo_id) + "\n" + _versions_table(hist, new)).encode()))
    commit = _commit(api, repo_id, ops, msg, head, branch, False)
    result = PushResult(repo_id, commit.oid, "", commit.commit_url, 0, sum(s for s, o in target_files.values() if _is_lfs(o)), len(ops))
    return _tag_landed(api, repo_id, result, tag, auto=auto, message=msg, branch=branch)
