"""The Hub as version history: push, pull, log and rollback of delta repos.

Every push is one commit made against the head it started from (so a concurrent push fails
instead of overwriting) and one tag (``v1``, ``v2``, ... unless named). Shards are grouped by
transformer block and written deterministically, so a new version uploads only the shards
whose bytes changed: the Hub stores files by content hash. Rollback is a forward commit that
copies the old version's files on the server side; nothing is re-uploaded and history stays.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .card import human_bytes, render_card
from .errors import BaseMismatchError, DeltahubError
from .format import CONFIG_NAME, DeltaReader
from .sources import DELTA_FILE_PATTERNS, sha256_file

_VERSION_TAG = re.compile(r"^v(\d+)$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


class HubError(DeltahubError):
    """A Hub operation failed; the message says why and what to do."""


class ConcurrentPushError(HubError):
    """The branch moved while pushing: someone else pushed first."""


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
    files: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # path -> (size, lfs sha256)


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

    def summary(self) -> str:
        n = sum(1 for v in self.versions if v.method is not None)
        full = self.full_model_bytes
        saved = f", {full / self.stored_bytes:.1f}x less" if self.stored_bytes else ""
        return f"{n} version{'s' if n != 1 else ''} take {human_bytes(self.stored_bytes)} on the Hub; as full models they would take {human_bytes(full)}{saved}"


@dataclass
class PushResult:
    repo_id: str
    commit: str
    tag: str
    url: str
    uploaded_bytes: int
    reused_bytes: int
    files: int

    def __str__(self) -> str:
        where = f"{self.repo_id}@{self.tag}" if self.tag else f"a pull request to {self.repo_id} ({self.url})"
        return (
            f"pushed {where} ({self.commit[:12]}): {self.files} files, {human_bytes(self.uploaded_bytes)} uploaded, "
            f"{human_bytes(self.reused_bytes)} already on the Hub"
        )


def _api(token: str | bool | None) -> HfApi:
    return HfApi(token=token)


def _hub_error(e: Exception, repo_id: str) -> HubError:
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"no repo {repo_id!r} is visible on the Hub (check the name, or log in for private repos)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo_id}: {e}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    return HubError(f"{repo_id}: the Hub answered {status or 'an error'}: {str(e).splitlines()[0]}")



def _tree(api: HfApi, repo_id: str, revision: str) -> dict[str, tuple[int, str | None]]:
    out = {}
    for entry in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        if isinstance(entry, RepoFile):
            out[entry.path] = (entry.size, entry.lfs.sha256 if entry.lfs else None)
    return out


def _config_at(api: HfApi, repo_id: str, revision: str, token) -> dict | None:
    try:
        path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token)
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text())


def history(repo_id: str, *, branch: str = "main", token: str | bool | None = None, with_files: bool = True) -> History:
    """The versions of a delta repo on ``branch``, newest first.

    Example::

        for v in deltahub.history("user/my-delta").versions:
            print(v.tags, v.commit[:8], v.method, v.ratio)
    """
    api = _api(token)
    try:
        refs = api.list_repo_refs(repo_id)
        commits = api.list_repo_commits(repo_id, revision=branch)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    tags_by_commit: dict[str, list[str]] = {}
    for t in refs.tags:
        tags_by_commit.setdefault(t.target_commit, []).append(t.name)
    versions = []
    for c in commits:
        v = Version(c.commit_id, sorted(tags_by_commit.get(c.commit_id, []), key=_tag_key), c.created_at, (c.title or "").strip())
        cfg = _config_at(api, repo_id, c.commit_id, token)
        if cfg is not None:
            base = cfg.get("base", {})
            v.method = cfg.get("method", {}).get("name")
            totals = cfg.get("totals", {})
            v.ratio, v.stored_bytes, v.dense_bytes = totals.get("ratio"), totals.get("stored_bytes"), totals.get("dense_bytes")
            v.base = (base.get("name_or_path") or "") + (f"@{base['revision'][:12]}" if base.get("revision") else "")
            v.base_fingerprint = base.get("fingerprint")
            if with_files:
                v.files = _tree(api, repo_id, c.commit_id)
        versions.append(v)
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
    for v in rows:
        date = v.date.strftime("%Y-%m-%d") if v.date else "now"
        commit = v.commit[:8] if v.commit else "this"
        lines.append(f"| {', '.join(v.tags) or '-'} | {commit} | {date} | {v.method} | {v.ratio} | {human_bytes(v.stored_bytes or 0)} | {v.message} |")
    return "\n".join(lines) + "\n"


def _head(api: HfApi, repo_id: str, branch: str) -> tuple[str | None, list[str]]:
    refs = api.list_repo_refs(repo_id)
    head = next((b.target_commit for b in refs.branches if b.name == branch), None)
    return head, [t.name for t in refs.tags]


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
) -> PushResult:
    """Upload a delta repo folder as one new version (one commit, one tag).

    The commit is made against the branch head seen when the push started: if someone else
    pushed meanwhile, :class:`ConcurrentPushError` is raised and nothing is changed. Only shards
    whose content is not on the Hub yet are uploaded.

    Example::

        deltahub.push("my-delta", "user/my-delta", message="lr 1e-5, 3 epochs")   # tagged v1, v2, ...
    """
    reader = DeltaReader(path)  # refuses anything that is not a complete delta repo
    api = _api(token)
    branch = branch or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        head, tags = _head(api, repo_id, branch)
        if head is None:
            api.create_branch(repo_id, branch=branch)
            head, tags = _head(api, repo_id, branch)
        tag = tag or _next_tag(tags)
        if tag in tags:
            raise HubError(f"{repo_id} already has a version tagged {tag!r}; choose another --tag")
        hist = history(repo_id, branch=branch, token=token)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    known = {oid for v in hist.versions for (_, oid) in v.files.values() if oid}
    head_files = hist.versions[0].files if hist.versions else {}
    local = {p.relative_to(reader.path).as_posix(): p for p in sorted(reader.path.rglob("*")) if p.is_file() and p.name != "README.md"}
    uploaded = reused = 0
    ops: list = []
    for rel, p in local.items():
        size = p.stat().st_size
        if rel.endswith(".safetensors"):
            if sha256_file(p) in known:
                reused += size
            else:
                uploaded += size
        ops.append(CommitOperationAdd(rel, p))
    new = Version("", [tag], None, message or f"deltahub push {tag}", reader.config.get("method", {}).get("name"), reader.config.get("totals", {}).get("ratio"), reader.config.get("totals", {}).get("stored_bytes"))
    card = render_card(reader.config, repo_id) + "\n" + _versions_table(hist, new)
    ops.append(CommitOperationAdd("README.md", card.encode()))
    ops += [CommitOperationDelete(rel) for rel in head_files if rel not in local and rel not in ("README.md", ".gitattributes")]
    commit = _commit(api, repo_id, ops, message or f"deltahub push {tag}", head, branch, create_pr)
    if create_pr:  # not a version until merged: no tag; the result points at the pull request
        return PushResult(repo_id, commit.oid, "", commit.pr_url or commit.commit_url, uploaded, reused, len(ops))
    try:
        api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=message)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    return PushResult(repo_id, commit.oid, tag, commit.commit_url, uploaded, reused, len(ops))


def _commit(api: HfApi, repo_id: str, ops: list, message: str, parent: str | None, branch: str, create_pr: bool):
    try:
        return api.create_commit(repo_id, ops, commit_message=message, parent_commit=parent, revision=branch, create_pr=create_pr)
    except HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) == 412:
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
) -> Path:
    """Download a version (tag, branch or commit) into the Hugging Face cache, or ``local_dir``.

    With ``HF_HUB_OFFLINE=1`` it answers from the cache.

    Example::

        path = deltahub.pull("user/my-delta", revision="v2")
    """
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, token=token, cache_dir=cache_dir, allow_patterns=DELTA_FILE_PATTERNS))
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None


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
    deleted, history and tags stay. A version made against another base is refused unless
    ``force=True``.

    Example::

        deltahub.rollback("user/my-delta", to="v2")
    """
    api = _api(token)
    try:
        head, tags = _head(api, repo_id, branch)
        refs = api.list_repo_refs(repo_id)
        by_tag = {t.name: t.target_commit for t in refs.tags}
        if to in by_tag:
            target = by_tag[to]
        elif _HEX40.match(to):
            target = to
        else:
            known = ", ".join(sorted(by_tag, key=_tag_key)) or "none"
            raise HubError(f"{repo_id} has no version {to!r}; its versions are: {known}")
        target_cfg = _config_at(api, repo_id, target, token)
        head_cfg = _config_at(api, repo_id, head, token) if head else None
        if target_cfg is None:
            raise HubError(f"{repo_id}@{to} holds no {CONFIG_NAME}: it is not a deltahub version")
        if head_cfg and head_cfg.get("base", {}).get("fingerprint") != target_cfg.get("base", {}).get("fingerprint") and not force:
            raise BaseMismatchError(
                f"{repo_id}@{to} was made against another base ({target_cfg.get('base', {}).get('name_or_path')}) than the head "
                f"({head_cfg.get('base', {}).get('name_or_path')}); pass force=True (--force) to roll back anyway"
            )
        target_files = _tree(api, repo_id, target)
        head_files = _tree(api, repo_id, head) if head else {}
        hist = history(repo_id, branch=branch, token=token, with_files=False)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    tag = tag or _next_tag(tags)
    ops: list = []
    for path, (size, oid) in target_files.items():
        if path in ("README.md", ".gitattributes") or head_files.get(path) == (size, oid):
            continue
        if oid:
            ops.append(CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=target))
        else:
            ops.append(CommitOperationAdd(path, Path(hf_hub_download(repo_id, path, revision=target, token=token))))
    ops += [CommitOperationDelete(p) for p in head_files if p not in target_files and p not in ("README.md", ".gitattributes")]
    msg = message or f"Roll back to {to}"
    cfg = target_cfg
    new = Version("", [tag], None, msg, cfg.get("method", {}).get("name"), cfg.get("totals", {}).get("ratio"), cfg.get("totals", {}).get("stored_bytes"))
    ops.append(CommitOperationAdd("README.md", (render_card(cfg, repo_id) + "\n" + _versions_table(hist, new)).encode()))
    commit = _commit(api, repo_id, ops, msg, head, branch, False)
    try:
        api.create_tag(repo_id, tag=tag, revision=commit.oid, tag_message=msg)
    except HfHubHTTPError as e:
        raise _hub_error(e, repo_id) from None
    return PushResult(repo_id, commit.oid, tag, commit.commit_url, 0, sum(s for s, o in target_files.values() if o), len(ops))
