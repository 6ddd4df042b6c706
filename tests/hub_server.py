"""A test double of the Hugging Face Hub, at the network boundary.

``HubServer`` is a small HTTP server (stdlib only: ``http.server`` in a background thread, bound to
127.0.0.1) that speaks the part of the Hub HTTP API that ``huggingface_hub`` (2.x, legacy LFS path)
uses: repo creation/info/deletion, ``/resolve`` downloads (HEAD + GET, ranges), the preupload / LFS
batch / upload / verify / NDJSON commit sequence, refs, tags, branches, commit listings, tree and
paths-info listings and ``whoami``. ``huggingface_hub`` runs unchanged against it with::

    HF_ENDPOINT=http://127.0.0.1:PORT  HF_HUB_DISABLE_XET=1

``HF_HUB_DISABLE_XET=1`` is required for uploads: with ``hf_xet`` installed the client otherwise
picks the Xet protocol without asking the server, and this double does not speak Xet.

``huggingface_hub`` reads ``HF_ENDPOINT`` (and ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``) once, at
import time. To point a process at this server, either set the variables before the first import
(``reserve_port()`` gives the port before the server exists), or run the client in a subprocess.

On its own, from the repository root: ``python -m tests.hub_server [--port N]`` serves until Ctrl-C
and prints the variables to set in the client's shell (:func:`main`).

Storage model, per repo: commits are immutable snapshots ``{path -> entry}`` (entry: sha256, size,
LFS or not, git oid) with parents, title, message, date and authors; branches, tags and PR refs
(``refs/pr/N``) point at commit ids. File contents live once, content-addressed by sha256, under
``<storage_dir>/blobs``; the metadata is kept in memory and mirrored to ``<storage_dir>/state.json``
after every change, so a new server on the same folder sees the same repos. All state changes hold
one lock.

Test hooks (plain attributes, read and written from the test thread):

- ``fail_next_lfs_upload = True`` (or an int N): the next (N) LFS upload PUT(s) are answered with
  ``lfs_failure_status`` (default 403) after the body is read; nothing is stored. The default is not
  500 on purpose: huggingface_hub retries 5xx on LFS uploads with back-off (1 s, 2 s, ...), so a
  single 500 is a *transient* failure the client recovers from (set ``lfs_failure_status = 500`` to
  test exactly that).
- ``before_commit`` / ``after_commit``: one-shot callables run by the server thread that handles a
  commit, outside the lock, so they may make HTTP requests of their own to this server (another
  user's push racing this one). ``before_commit(repo_type, repo_id, revision)`` runs before the
  commit is applied (its parent check then sees what the hook did); ``after_commit(repo_type,
  repo_id, commit_id)`` runs after it is applied, before the client gets the answer.
- ``fail_next(method, path_pattern, status=403, times=1)``: the next ``times`` requests whose method
  and path (no query; ``re.search``) match are answered with ``status`` and nothing is done, e.g.
  ``fail_next("POST", r"/tag/")`` makes the next tag creation fail, ``fail_next("DELETE",
  "/api/repos/delete")`` the next repo deletion.
- ``lfs_bytes_uploaded`` / ``lfs_uploads`` / ``lfs_failed_uploads``: counters of LFS bodies stored.
- ``requests``: list of ``(method, path, status)`` of every request served (no headers, so no tokens).
- ``errors``: tracebacks of unexpected server-side exceptions (answered with 500); a test can assert
  it is empty.
- Server-side introspection without HTTP: ``branch_head``, ``resolve``, ``list_files``,
  ``read_file``, ``commit_ids``, ``refs``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

__all__ = ["HubServer", "HubError", "reserve_port", "git_blob_oid", "lfs_pointer"]

LFS_THRESHOLD = 10 * 1000 * 1000  # files this large or larger go to LFS, whatever their name
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_SUBPATHS = {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "tag", "branch"}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 1 << 20

# The .gitattributes the Hub puts in the initial commit of a new repo (LFS-tracked patterns).
DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


def reserve_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host``: bind port 0, read the port, close. Pass it to ``HubServer(port=...)``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (``git hash-object``), as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


class HubError(Exception):
    """An HTTP error answer: status, message (JSON ``error`` and ``X-Error-Message``), optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


def _repo_not_found(repo_type: str, repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {_URL_PREFIX.get(repo_type, '')}{repo_id}", "RepoNotFound")


def _rev_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


class HubServer:
    """A local, in-process stand-in for the Hugging Face Hub HTTP API (see the module docstring).

    Args:
        storage_dir: folder for blobs and ``state.json``; a temporary folder (removed by ``stop``) if None.
        port: TCP port on ``host``; 0 picks a free one (see ``url`` once started).
        host: interface to bind; keep the default loopback address.
        tokens: ``{token: username}`` of accepted bearer tokens; None accepts any token as user ``user``.
        require_auth_for_writes: answer 401 to writes (create, commit, upload, tag, branch, delete) sent
            without a token, as the Hub does.
        lfs_threshold: files of at least this size are LFS whatever their name.
        binary_as_lfs: files whose first 512 bytes hold a NUL byte are LFS (the Hub's binary sniffing
            on the ``sample`` the client sends to ``preupload``).
        lfs_multipart_chunk_size: if set, LFS objects larger than this are uploaded with the Hub's
            multipart protocol (one PUT per chunk, then a completion POST).
        initial_gitattributes: put the Hub's default ``.gitattributes`` in each new repo's initial commit.
        verbose: print one line per request (method, path, status; never headers) to stderr.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike | None = None,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        tokens: dict[str, str] | None = None,
        require_auth_for_writes: bool = True,
        lfs_threshold: int = LFS_THRESHOLD,
        binary_as_lfs: bool = True,
        lfs_multipart_chunk_size: int | None = None,
        initial_gitattributes: bool = True,
        verbose: bool = False,
    ):
        self._own_storage = storage_dir is None
        self.storage_dir = Path(tempfile.mkdtemp(prefix="hubserver-") if storage_dir is None else storage_dir)
        self.host, self.port = host, int(port)
        self.tokens = tokens
        self.require_auth_for_writes = require_auth_for_writes
        self.lfs_threshold = lfs_threshold
        self.binary_as_lfs = binary_as_lfs
        self.lfs_multipart_chunk_size = lfs_multipart_chunk_size
        self.initial_gitattributes = initial_gitattributes
        self.verbose = verbose

        self.lfs_failure_status = 403
        self.before_commit = None  # one-shot callable(repo_type, repo_id, revision), run before a commit is applied
        self.after_commit = None  # one-shot callable(repo_type, repo_id, commit_id), run after it is applied
        self._failures: list[list] = []  # [method, compiled pattern, status, times left] (fail_next)
        self._lfs_failures_pending = 0
        self.lfs_bytes_uploaded = 0
        self.lfs_uploads = 0
        self.lfs_failed_uploads = 0
        self.requests: list[tuple[str, str, int]] = []
        self.errors: list[str] = []

        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._state: dict = {"counter": 0, "repos": {}}
        (self.storage_dir / "blobs").mkdir(parents=True, exist_ok=True)
        (self.storage_dir / "tmp").mkdir(parents=True, exist_ok=True)
        state_file = self.storage_dir / "state.json"
        if state_file.exists():
            self._state = json.loads(state_file.read_text())

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the value for ``HF_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        handler = type("BoundHubHandler", (_Handler,), {"hub": self})
        httpd = ThreadingHTTPServer((self.host, self.port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"HubServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            with self._lock:
                conns = list(self._conns)
            for conn in conns:  # close kept-alive connections so no handler thread outlives the server
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._thread = None
        if self._own_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks

    @property
    def fail_next_lfs_upload(self) -> bool:
        return self._lfs_failures_pending > 0

    @fail_next_lfs_upload.setter
    def fail_next_lfs_upload(self, value: bool | int) -> None:
        with self._lock:
            self._lfs_failures_pending = int(value)

    def fail_next(self, method: str, path_pattern: str, status: int = 403, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path_pattern`` (``re.search``
        on the path without its query) with ``status``, doing nothing else. Not 5xx by default:
        huggingface_hub retries those on some endpoints."""
        with self._lock:
            self._failures.append([method.upper(), re.compile(path_pattern), int(status), int(times)])

    def _take_request_failure(self, method: str, path: str) -> int | None:
        """The status to fail this request with (one use of a ``fail_next`` entry), or None."""
        with self._lock:
            for f in self._failures:
                if f[0] == method and f[3] > 0 and f[1].search(path):
                    f[3] -= 1
                    self._failures = [g for g in self._failures if g[3] > 0]
                    return f[2]
        return None

    # ------------------------------------------------------------------ introspection (no HTTP)

    def _repo(self, repo_id: str, repo_type: str = "model") -> dict:
        repo = self._state["repos"].get(f"{repo_type}:{repo_id}")
        if repo is None:
            raise _repo_not_found(repo_type, repo_id)
        return repo

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return f"{repo_type}:{repo_id}" in self._state["repos"]

    def resolve(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit id ``revision`` (branch, tag, ``refs/...``, full or short sha) points at."""
        with self._lock:
            return self._resolve(self._repo(repo_id, repo_type), revision)

    def branch_head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._repo(repo_id, repo_type)["branches"][branch]

    def refs(self, repo_id: str, repo_type: str = "model") -> dict:
        """``{"branches": {...}, "tags": {...}, "prs": {...}}`` name -> commit id (copies)."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return {k: dict(repo[k]) for k in ("branches", "tags", "prs")}

    def commit_ids(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """First-parent history of ``revision``, newest first."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return [c["id"] for c in self._history(repo, self._resolve(repo, revision))]

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, dict]:
        """``{path: {"sha256", "size", "lfs", "oid"}}`` at ``revision``."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return {p: dict(e) for p, e in repo["commits"][self._resolve(repo, revision)]["tree"].items()}

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        entry = self.list_files(repo_id, revision, repo_type).get(path)
        if entry is None:
            raise KeyError(path)
        return self._blob_path(entry["sha256"]).read_bytes()

    def commit_directly(self, repo_id: str, files: dict[str, bytes], title: str, branch: str = "main", repo_type: str = "model") -> str:
        """Commit regular files to ``branch`` without HTTP (another user's push, for race tests)."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            head = repo["branches"][branch]
            tree = dict(repo["commits"][head]["tree"])
            for path, data in files.items():
                tree[path] = self._entry_regular(data)
            cid = self._new_commit(repo, [head], tree, title, "", "someone-else")
            repo["branches"][branch] = cid
            self._save()
            return cid

    # ------------------------------------------------------------------ storage helpers

    def _save(self) -> None:
        path = self.storage_dir / "state.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, path)

    def _blob_path(self, sha256: str) -> Path:
        return self.storage_dir / "blobs" / sha256[:2] / sha256

    def _store_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self._blob_path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.storage_dir / "tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return sha

    def _store_file(self, tmp: str, sha: str) -> None:
        dest = self._blob_path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            os.unlink(tmp)
        else:
            os.replace(tmp, dest)

    def _new_commit(self, repo: dict, parents: list[str], tree: dict, title: str, message: str, author: str) -> str:
        self._state["counter"] += 1
        date = _now_iso()
        seed = json.dumps([repo["type"], repo["id"], parents, sorted((p, e["oid"]) for p, e in tree.items()), title, message, date, self._state["counter"]])
        cid = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][cid] = {"id": cid, "parents": parents, "title": title, "message": message, "date": date, "authors": [author], "tree": tree}
        return cid

    def _entry_regular(self, data: bytes) -> dict:
        return {"sha256": self._store_bytes(data), "size": len(data), "lfs": False, "oid": git_blob_oid(data)}

    @staticmethod
    def _entry_lfs(sha256: str, size: int) -> dict:
        return {"sha256": sha256, "size": size, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha256, size))}

    # ------------------------------------------------------------------ repo logic (callers hold the lock)

    def _resolve(self, repo: dict, rev: str) -> str:
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["tags"]:
            return repo["tags"][rev]
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/pr/", "prs")):
            if rev.startswith(prefix) and rev[len(prefix):] in repo[table]:
                return repo[table][rev[len(prefix):]]
        if rev in repo["commits"]:
            return rev
        if re.fullmatch(r"[0-9a-f]{5,39}", rev):
            matches = [c for c in repo["commits"] if c.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise _rev_not_found(rev)

    def _writable_ref(self, repo: dict, rev: str) -> tuple[str, str]:
        """(table, name) of the ref a commit to ``rev`` moves: a branch or a PR ref."""
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        if rev in repo["branches"]:
            return "branches", rev
        if rev.startswith("refs/pr/") and rev[len("refs/pr/"):] in repo["prs"]:
            return "prs", rev[len("refs/pr/"):]
        if rev in repo["tags"] or rev in repo["commits"]:
            raise HubError(400, f"Invalid rev id: {rev} is not a branch")
        raise _rev_not_found(rev)

    def _history(self, repo: dict, cid: str) -> list[dict]:
        out, seen = [], set()
        while cid and cid not in seen and len(out) <= len(repo["commits"]):
            seen.add(cid)
            c = repo["commits"][cid]
            out.append(c)
            cid = c["parents"][0] if c["parents"] else None
        return out

    def _gitattributes_lfs_patterns(self, tree: dict) -> list[str]:
        entry = tree.get(".gitattributes")
        if entry is None or entry["lfs"]:
            return []
        patterns = []
        for line in self._blob_path(entry["sha256"]).read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    def is_lfs(self, path: str, size: int, sample: bytes, tree: dict) -> bool:
        """Upload mode decision of ``preupload`` (override in a subclass to change the rules)."""
        if size >= self.lfs_threshold:
            return True
        if self.binary_as_lfs and b"\0" in sample:
            return True
        base = path.rsplit("/", 1)[-1]
        for pat in self._gitattributes_lfs_patterns(tree):
            if "/" in pat.strip("/"):
                if fnmatch.fnmatchcase(path, pat.lstrip("/")) or fnmatch.fnmatchcase(path, pat.lstrip("/").replace("**/", "")):
                    return True
            elif fnmatch.fnmatchcase(base, pat):
                return True
        return False

    def _tree_items(self, repo: dict, cid: str, base: str, recursive: bool, expand: bool) -> list[dict]:
        tree = repo["commits"][cid]["tree"]
        base = base.strip("/")
        if base and base in tree:
            raise HubError(404, f"{base} is a file, not a directory", "EntryNotFound")
        prefix = base + "/" if base else ""
        files = {p: e for p, e in tree.items() if p.startswith(prefix)}
        if base and not files:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": cid})
        dirs: set[str] = set()
        for p in files:
            parts = p[len(prefix):].split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add(prefix + "/".join(parts[:i]))
        if not recursive:
            files = {p: e for p, e in files.items() if "/" not in p[len(prefix):]}
            dirs = {d for d in dirs if "/" not in d[len(prefix):]}
        items = [self._dir_item(repo, cid, d, expand) for d in sorted(dirs)]
        items += [self._file_item(repo, cid, p, e, expand) for p, e in sorted(files.items())]
        return items

    def _file_item(self, repo: dict, cid: str, path: str, e: dict, expand: bool) -> dict:
        item = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
        if e["lfs"]:
            item["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
        if expand:
            item["lastCommit"] = self._last_commit(repo, cid, path)
        return item

    def _dir_oid(self, tree: dict, path: str) -> str | None:
        prefix = path + "/"
        content = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(prefix))
        return hashlib.sha1(json.dumps(content).encode()).hexdigest() if content else None

    def _dir_item(self, repo: dict, cid: str, path: str, expand: bool) -> dict:
        item = {"type": "directory", "oid": self._dir_oid(repo["commits"][cid]["tree"], path), "path": path}
        if expand:
            item["lastCommit"] = self._last_commit(repo, cid, path)
        return item

    def _last_commit(self, repo: dict, cid: str, path: str) -> dict:
        def key(c):
            e = c["tree"].get(path)
            return e["oid"] if e is not None else self._dir_oid(c["tree"], path)

        history = self._history(repo, cid)
        last = history[0]
        for c in history[1:]:
            if key(c) != key(last):
                break
            last = c
        return {"id": last["id"], "title": last["title"], "date": last["date"]}

    def _safetensors_summary(self, tree: dict) -> dict | None:
        params: dict[str, int] = {}
        for p, e in tree.items():
            if not p.endswith(".safetensors"):
                continue
            try:
                with open(self._blob_path(e["sha256"]), "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n)) if n <= 25_000_000 else {}
                for name, info in header.items():
                    if name != "__metadata__":
                        count = 1
                        for d in info["shape"]:
                            count *= int(d)
                        params[info["dtype"]] = params.get(info["dtype"], 0) + count
            except Exception:  # not a valid safetensors file: ignored, as the Hub does
                continue
        return {"parameters": params, "total": sum(params.values())} if params else None

    def _repo_url(self, repo: dict) -> str:
        return f"{self.url}/{_URL_PREFIX[repo['type']]}{repo['id']}"


class _Handler(BaseHTTPRequestHandler):
    """One connection; routes each request to a ``HubServer``. ``hub`` is set on a per-server subclass."""

    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "HubServer/1.0"
    timeout = 60  # idle kept-alive connections end after this

    # ---------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._conns.discard(self.connection)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are recorded in ``hub.requests`` by ``_respond``; headers are never logged

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _iter_body(self):
        """Yield the request body in chunks (Content-Length or chunked transfer encoding)."""
        if self._body_done:
            return
        self._body_done = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, _CHUNK))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline(65537)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, _CHUNK))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                left -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict:
        raw = self._body()
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "Malformed JSON body")
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data

    def _respond(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json") -> None:
        if not self._body_done:  # drain what the client sent so the kept-alive connection stays in sync
            try:
                for _ in self._iter_body():
                    pass
            except Exception:
                self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._record(status)

    def _record(self, status: int) -> None:
        path = self.path.split("?", 1)[0]
        with self.hub._lock:
            self.hub.requests.append((self.command, path, status))
        if self.hub.verbose:
            print(f"[hub] {self.command} {path} -> {status}", file=sys.stderr)

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._respond(status, json.dumps(data).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode("ascii").replace("\n", " ")
        if err.code:
            headers["X-Error-Code"] = err.code
        body = dict(err.body or {})
        body.setdefault("error", err.message)
        self._json(body, err.status, headers)

    def _dispatch(self, method: str) -> None:
        self._body_done = False
        try:
            status = self.hub._take_request_failure(method, self.path.split("?", 1)[0])
            if status is not None:
                raise HubError(status, f"Simulated failure of {method} {self.path.split('?', 1)[0]} (HubServer.fail_next)")
            self._route(method)
        except HubError as err:
            self._error(err)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:
            tb = traceback.format_exc()
            with self.hub._lock:
                self.hub.errors.append(tb)
            self.close_connection = True
            try:
                self._error(HubError(500, "Internal server error (see HubServer.errors)"))
            except Exception:
                pass

    # ---------------------------------------------------------------- auth

    def _user(self, required: bool = False) -> str | None:
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token:
            if self.hub.tokens is None:
                return "user"
            if token in self.hub.tokens:
                return self.hub.tokens[token]
            raise HubError(401, "Invalid credentials in Authorization header")
        if required:
            raise HubError(401, "Invalid username or password.")
        return None

    def _write_user(self) -> str:
        return self._user(required=self.hub.require_auth_for_writes) or "user"

    def _tree_at(self, repo_type: str, repo_id: str, rev: str) -> tuple[dict, str, dict]:
        """(repo, commit id, tree) of a readable repo at ``rev``; callers hold the lock."""
        repo = self._readable(repo_type, repo_id)
        cid = self.hub._resolve(repo, rev)
        return repo, cid, repo["commits"][cid]["tree"]

    def _readable(self, repo_type: str, repo_id: str) -> dict:
        """The repo, if it exists and the caller may see it (callers hold the lock)."""
        repo = self.hub._state["repos"].get(f"{repo_type}:{repo_id}")
        if repo is None:
            raise _repo_not_found(repo_type, repo_id)
        if repo["private"] and self._user() is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    # ---------------------------------------------------------------- routing

    def _route(self, method: str) -> None:
        raw_path, _, query = self.path.partition("?")
        q = parse_qs(query, keep_blank_values=True)
        segs = raw_path.split("/")[1:]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]

        if segs[:1] == ["api"]:
            return self._route_api(method, segs[1:], q)
        if segs[:1] == ["__lfs"]:
            return self._route_lfs(method, segs[1:], q)
        if raw_path.endswith(".git/info/lfs/objects/batch") and method == "POST":
            repo_type, rest = self._split_type(raw_path[1 : -len(".git/info/lfs/objects/batch")].split("/"))
            return self._lfs_batch(repo_type, unquote("/".join(rest)))
        if "resolve" in segs and method in ("GET", "HEAD"):
            repo_type, rest = self._split_type(segs)
            if len(rest) >= 4 and rest[2] == "resolve":
                repo_id, tail = f"{unquote(rest[0])}/{unquote(rest[1])}", rest[3:]
            elif len(rest) >= 3 and rest[1] == "resolve":
                repo_id, tail = unquote(rest[0]), rest[2:]
            else:
                raise HubError(404, "Not found")
            if len(tail) < 2:
                raise HubError(404, "Not found", "EntryNotFound")
            return self._resolve_file(repo_type, repo_id, unquote(tail[0]), unquote("/".join(tail[1:])), head=method == "HEAD")
        raise HubError(404, f"Not found: {method} {raw_path}")

    @staticmethod
    def _split_type(segs: list[str]) -> tuple[str, list[str]]:
        if segs and segs[0] in ("datasets", "spaces") and len(segs) > 1:
            return _REPO_TYPES[segs[0]], segs[1:]
        return "model", segs

    def _route_api(self, method: str, segs: list[str], q: dict) -> None:
        hub = self.hub
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if segs == ["validate-yaml"] and method == "POST":
            self._body()
            return self._json({"errors": [], "warnings": []})
        if not segs or segs[0] not in _REPO_TYPES or len(segs) < 2:
            raise HubError(404, f"Not found: /api/{'/'.join(segs)}")
        repo_type, rest = _REPO_TYPES[segs[0]], segs[1:]
        if len(rest) >= 2 and (hub.has_repo(f"{unquote(rest[0])}/{unquote(rest[1])}", repo_type) or rest[1] not in _API_SUBPATHS):
            repo_id, tail = f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2:]
        else:
            repo_id, tail = unquote(rest[0]), rest[1:]
        action = tail[0] if tail else None
        rev_rest = unquote("/".join(tail[1:])) if len(tail) > 1 else None

        if action is None and method == "GET":
            return self._info(repo_type, repo_id, "main", q)
        if action == "revision" and method == "GET" and rev_rest:
            return self._info(repo_type, repo_id, rev_rest, q)
        if action == "tree" and method == "GET" and len(tail) >= 2:
            return self._tree(repo_type, repo_id, unquote(tail[1]), unquote("/".join(tail[2:])), q)
        if action == "paths-info" and method == "POST" and rev_rest:
            return self._paths_info(repo_type, repo_id, rev_rest)
        if action == "preupload" and method == "POST" and rev_rest:
            return self._preupload(repo_type, repo_id, rev_rest)
        if action == "commit" and method == "POST" and rev_rest:
            return self._commit(repo_type, repo_id, rev_rest, q)
        if action == "refs" and method == "GET" and len(tail) == 1:
            return self._refs(repo_type, repo_id, q)
        if action == "commits" and method == "GET":
            return self._commits(repo_type, repo_id, rev_rest or "main", q)
        if action == "tag" and rev_rest and method in ("POST", "DELETE"):
            return self._tag(method, repo_type, repo_id, rev_rest)
        if action == "branch" and rev_rest and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, rev_rest)
        raise HubError(404, f"Not found: {method} /api/{'/'.join(segs)}")

    # ---------------------------------------------------------------- endpoints: account and repos

    def _whoami(self) -> None:
        user = self._user(required=True)
        self._json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": f"{user}@example.com", "emailVerified": True, "canPay": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hubserver", "role": "write"}},
        })

    def _create_repo(self) -> None:
        user = self._write_user()
        body = self._json_body()
        name, org = body.get("name"), body.get("organization") or user
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name or "--" in name or not _NAME_RE.match(org):
            raise HubError(400, f"Invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        hub = self.hub
        with hub._lock:
            key = f"{repo_type}:{repo_id}"
            if key in hub._state["repos"]:
                repo = hub._state["repos"][key]
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": hub._repo_url(repo)})
            repo = {
                "type": repo_type, "id": repo_id, "private": body.get("visibility") == "private" or bool(body.get("private")),
                "created_at": _now_iso(), "branches": {}, "tags": {}, "prs": {}, "commits": {}, "lfs_objects": {},
                "next_pr": 1,
            }
            tree = {".gitattributes": hub._entry_regular(DEFAULT_GITATTRIBUTES.encode())} if hub.initial_gitattributes else {}
            repo["branches"]["main"] = hub._new_commit(repo, [], tree, "initial commit", "", user)
            hub._state["repos"][key] = repo
            hub._save()
            url = hub._repo_url(repo)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        user = self._write_user()
        body = self._json_body()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        with self.hub._lock:
            if self.hub._state["repos"].pop(f"{repo_type}:{repo_id}", None) is None:
                raise _repo_not_found(repo_type, repo_id)
            self.hub._save()
        self._json({})

    def _info(self, repo_type: str, repo_id: str, rev: str, q: dict) -> None:
        hub = self.hub
        with hub._lock:
            repo = self._readable(repo_type, repo_id)
            cid = hub._resolve(repo, rev)
            commit = repo["commits"][cid]
            tree = commit["tree"]
            blobs = _truthy(q.get("blobs"))
            siblings = []
            for p, e in sorted(tree.items()):
                s = {"rfilename": p}
                if blobs:
                    s.update({"size": e["size"], "blobId": e["oid"]})
                    if e["lfs"]:
                        s["lfs"] = {"size": e["size"], "sha256": e["sha256"], "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
                siblings.append(s)
            ns = repo_id.split("/")[0] if "/" in repo_id else None
            data = {
                "_id": hashlib.sha1(f"{repo_type}:{repo_id}".encode()).hexdigest()[:24], "id": repo_id, "author": ns,
                "sha": cid, "lastModified": commit["date"], "createdAt": repo["created_at"], "private": repo["private"],
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(e["size"] for e in tree.values()),
            }
            if repo_type == "model":
                data.update({"modelId": repo_id, "spaces": []})
                st = hub._safetensors_summary(tree)
                if st:
                    data["safetensors"] = st
        self._json(data)

    def _tree(self, repo_type: str, repo_id: str, rev: str, path: str, q: dict) -> None:
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            cid = self.hub._resolve(repo, rev)
            items = self.hub._tree_items(repo, cid, path, _truthy(q.get("recursive")), _truthy(q.get("expand")))
        self._json(items)

    def _paths_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        raw = self._body()
        if "json" in (self.headers.get("Content-Type") or ""):
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths") or [], bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy(form.get("expand"))
        if isinstance(paths, str):
            paths = [paths]
        hub = self.hub
        with hub._lock:
            repo, cid, tree = self._tree_at(repo_type, repo_id, rev)
            items = []
            for p in paths:
                p = p.strip("/")
                if p in tree:
                    items.append(hub._file_item(repo, cid, p, tree[p], expand))
                elif p and any(k.startswith(p + "/") for k in tree):
                    items.append(hub._dir_item(repo, cid, p, expand))
        self._json(items)

    # ---------------------------------------------------------------- endpoints: refs

    def _refs(self, repo_type: str, repo_id: str, q: dict) -> None:
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            data = {
                "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo["branches"].items())],
                "converts": [],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo["tags"].items())],
            }
            if _truthy(q.get("include_prs")):
                data["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c} for n, c in sorted(repo["prs"].items(), key=lambda x: int(x[0]))]
        self._json(data)

    def _commits(self, repo_type: str, repo_id: str, rev: str, q: dict) -> None:
        formatted = "formatted" in q.get("expand[]", []) or "formatted" in q.get("expand", [])
        with self.hub._lock:
            repo = self._readable(repo_type, repo_id)
            items = []
            for c in self.hub._history(repo, self.hub._resolve(repo, rev)):
                item = {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"], "authors": [{"user": a} for a in c["authors"]]}
                if formatted:
                    item["formatted"] = {"title": c["title"], "message": c["message"]}
                items.append(item)
        self._json(items)

    def _tag(self, method: str, repo_type: str, repo_id: str, rev_or_tag: str) -> None:
        self._write_user()
        hub = self.hub
        if method == "POST":
            body = self._json_body()
            tag = body.get("tag")
            if not isinstance(tag, str) or not tag or tag.startswith("refs/") or " " in tag:
                raise HubError(400, f"Invalid tag name: {tag!r}")
            with hub._lock:
                repo = self._readable(repo_type, repo_id)
                cid = hub._resolve(repo, rev_or_tag)
                if tag in repo["tags"]:
                    raise HubError(409, f"Tag {tag} already exists")
                repo["tags"][tag] = cid
                hub._save()
            return self._json({})
        with hub._lock:
            repo = self._readable(repo_type, repo_id)
            tag = rev_or_tag[len("refs/tags/"):] if rev_or_tag.startswith("refs/tags/") else rev_or_tag
            if repo["tags"].pop(tag, None) is None:
                raise _rev_not_found(rev_or_tag)
            hub._save()
        self._json({})

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        self._write_user()
        hub = self.hub
        if method == "POST":
            body = self._json_body()
            if branch.startswith("refs/") or " " in branch or not branch:
                raise HubError(400, f"Invalid branch name: {branch!r}")
            with hub._lock:
                repo = self._readable(repo_type, repo_id)
                if branch in repo["branches"]:
                    raise HubError(409, f"Reference refs/heads/{branch} already exists")
                repo["branches"][branch] = hub._resolve(repo, body.get("startingPoint") or "main")
                hub._save()
            return self._json({})
        with hub._lock:
            repo = self._readable(repo_type, repo_id)
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            if repo["branches"].pop(branch, None) is None:
                raise _rev_not_found(branch)
            hub._save()
        self._json({})

    # ---------------------------------------------------------------- endpoints: downloads

    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str, head: bool) -> None:
        hub = self.hub
        with hub._lock:
            repo = self._readable(repo_type, repo_id)
            cid = hub._resolve(repo, rev)
            entry = repo["commits"][cid]["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": cid})
        size = entry["size"]
        headers = {"X-Repo-Commit": cid, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise HubError(416, f"Invalid range: {rng}", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1) == "":
                start, end = max(0, size - int(m.group(2))), size - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size or start > end:
                raise HubError(416, f"Range not satisfiable: {rng}", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        headers["Content-Disposition"] = f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"'
        if not self._body_done:
            self._body()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and length:
            with open(hub._blob_path(entry["sha256"]), "rb") as f:
                f.seek(start)
                left = length
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
        self._record(status)

    # ---------------------------------------------------------------- endpoints: uploads

    def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
        self._write_user()
        body = self._json_body()
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a 'files' list")
        hub = self.hub
        with hub._lock:
            repo, cid, tree = self._tree_at(repo_type, repo_id, rev)
            out = []
            for f in files:
                path, size = f.get("path"), f.get("size")
                if not isinstance(path, str) or not isinstance(size, int):
                    raise HubError(400, "Each file needs a 'path' and a 'size'")
                sample = base64.b64decode(f.get("sample") or "")
                lfs = hub.is_lfs(path, size, sample, tree)
                item = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                cur = tree.get(path)
                if cur is not None:
                    item["oid"] = cur["sha256"] if cur["lfs"] else cur["oid"]
                out.append(item)
        self._json({"files": out, "commitOid": cid})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        self._write_user()
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported")
        hub = self.hub
        objects = []
        with hub._lock:
            repo = self._readable(repo_type, repo_id)
            for obj in body.get("objects") or []:
                oid, size = obj.get("oid"), obj.get("size")
                if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int) and size >= 0):
                    objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": {"code": 422, "message": "Invalid oid or size"}})
                    continue
                item = {"oid": oid, "size": size}
                if oid not in repo["lfs_objects"]:  # no action for objects already there: that is the dedup
                    base = f"{hub.url}/__lfs/{repo_type}/{quote(repo_id)}/{oid}"
                    chunk = hub.lfs_multipart_chunk_size
                    if chunk and size > chunk:
                        header = {"chunk_size": str(chunk)}
                        for i in range((size + chunk - 1) // chunk):
                            header[str(i + 1)] = f"{base}/part/{i + 1}?size={size}"
                        upload = {"href": f"{base}/complete?size={size}", "header": header}
                    else:
                        upload = {"href": f"{base}?size={size}", "header": {}}
                    item["authenticated"] = True
                    item["actions"] = {"upload": upload, "verify": {"href": f"{base}/verify", "header": {}}}
                objects.append(item)
        self._respond(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), content_type="application/vnd.git-lfs+json")

    def _route_lfs(self, method: str, segs: list[str], q: dict) -> None:
        # /__lfs/{type}/{repo_id (quoted, may hold '/')}/{oid}[/part/{n} | /complete | /verify]
        if len(segs) < 3 or segs[0] not in _URL_PREFIX:
            raise HubError(404, "Not found")
        repo_type, rest = segs[0], segs[1:]
        idx = next((i for i, s in enumerate(rest) if re.fullmatch(r"[0-9a-f]{64}", s)), None)
        if idx is None or idx == 0:
            raise HubError(404, "Not found")
        repo_id, oid, tail = unquote("/".join(rest[:idx])), rest[idx], rest[idx + 1 :]
        size = int(q["size"][-1]) if q.get("size") else None
        with self.hub._lock:
            self.hub._repo(repo_id, repo_type)
        if method == "PUT" and not tail:
            return self._lfs_put(repo_type, repo_id, oid, size)
        if method == "PUT" and len(tail) == 2 and tail[0] == "part":
            return self._lfs_put_part(repo_type, repo_id, oid, int(tail[1]))
        if method == "POST" and tail == ["complete"]:
            return self._lfs_complete(repo_type, repo_id, oid, size)
        if method == "POST" and tail == ["verify"]:
            body = self._json_body()
            with self.hub._lock:
                stored = self.hub._repo(repo_id, repo_type)["lfs_objects"].get(oid)
            if stored is None or ("size" in body and body["size"] != stored):
                raise HubError(404, f"LFS object {oid} not found")
            return self._json({})
        raise HubError(404, "Not found")

    def _take_failure(self) -> bool:
        with self.hub._lock:
            if self.hub._lfs_failures_pending > 0:
                self.hub._lfs_failures_pending -= 1
                return True
        return False

    def _receive_to_tmp(self) -> tuple[str, str, int]:
        h = hashlib.sha256()
        n = 0
        fd, tmp = tempfile.mkstemp(dir=self.hub.storage_dir / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._iter_body():
                    h.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp, h.hexdigest(), n

    def _fail_upload(self, tmp: str, n: int) -> None:
        os.unlink(tmp)
        with self.hub._lock:
            self.hub.lfs_failed_uploads += 1
        raise HubError(self.hub.lfs_failure_status, f"Simulated LFS upload failure after {n} bytes")

    def _add_lfs_object(self, repo_type: str, repo_id: str, tmp: str, sha: str, n: int) -> None:
        hub = self.hub
        hub._store_file(tmp, sha)
        with hub._lock:
            hub._repo(repo_id, repo_type)["lfs_objects"][sha] = n
            hub.lfs_uploads += 1
            hub._save()

    def _lfs_put(self, repo_type: str, repo_id: str, oid: str, size: int | None) -> None:
        fail = self._take_failure()
        tmp, sha, n = self._receive_to_tmp()
        if fail:
            return self._fail_upload(tmp, n)
        if sha != oid or (size is not None and n != size):
            os.unlink(tmp)
            raise HubError(400, f"Checksum mismatch: expected {oid} ({size} bytes), got {sha} ({n} bytes)")
        with self.hub._lock:
            self.hub.lfs_bytes_uploaded += n
        self._add_lfs_object(repo_type, repo_id, tmp, sha, n)
        self._respond(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _parts_dir(self, repo_type: str, repo_id: str, oid: str) -> Path:
        d = self.hub.storage_dir / "tmp" / "parts" / hashlib.sha1(f"{repo_type}:{repo_id}:{oid}".encode()).hexdigest()
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _lfs_put_part(self, repo_type: str, repo_id: str, oid: str, part: int) -> None:
        fail = self._take_failure()
        tmp, _, n = self._receive_to_tmp()
        if fail:
            return self._fail_upload(tmp, n)
        with open(tmp, "rb") as f:
            etag = hashlib.md5(f.read()).hexdigest()
        os.replace(tmp, self._parts_dir(repo_type, repo_id, oid) / f"{part}")
        with self.hub._lock:
            self.hub.lfs_bytes_uploaded += n
        self._respond(200, b"", {"ETag": f'"{etag}"'}, content_type="text/plain")

    def _lfs_complete(self, repo_type: str, repo_id: str, oid: str, size: int | None) -> None:
        body = self._json_body()
        parts = sorted(body.get("parts") or [], key=lambda p: p.get("partNumber", 0))
        d = self._parts_dir(repo_type, repo_id, oid)
        h, n = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.hub.storage_dir / "tmp")
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                part_file = d / str(p.get("partNumber"))
                if not part_file.exists():
                    os.unlink(tmp)
                    raise HubError(400, f"Missing part {p.get('partNumber')}")
                data = part_file.read_bytes()
                if f'"{hashlib.md5(data).hexdigest()}"' != p.get("etag") and hashlib.md5(data).hexdigest() != p.get("etag"):
                    os.unlink(tmp)
                    raise HubError(400, f"ETag mismatch for part {p.get('partNumber')}")
                h.update(data)
                out.write(data)
                n += len(data)
        shutil.rmtree(d, ignore_errors=True)
        if h.hexdigest() != oid or (size is not None and n != size):
            os.unlink(tmp)
            raise HubError(400, f"Checksum mismatch after multipart completion: expected {oid}")
        self._add_lfs_object(repo_type, repo_id, tmp, oid, n)
        self._json({})

    def _commit(self, repo_type: str, repo_id: str, rev: str, q: dict) -> None:
        user = self._write_user()
        raw = self._body()
        lines = []
        for line in raw.split(b"\n"):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise HubError(400, "Malformed NDJSON commit payload")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a 'header' line")
        header = lines[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "Commit summary is required")
        description = header.get("description") or ""
        parent = header.get("parentCommit")
        create_pr = _truthy(q.get("create_pr"))
        hub = self.hub
        hook, hub.before_commit = hub.before_commit, None  # one-shot: lets a test land a competing commit now
        if hook is not None:
            hook(repo_type, repo_id, rev)

        # Regular file contents are stored before taking the lock (content-addressed, harmless if unused).
        prepared = []
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if key not in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                raise HubError(400, f"Unknown commit operation: {key!r}")
            if not isinstance(path, str) or not path or any(part in ("", ".", "..") for part in path.rstrip("/").split("/")) or path.startswith("/"):
                if not (key == "deletedFolder" and isinstance(path, str) and path.strip("/") == ""):
                    raise HubError(400, f"Invalid path: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "Only base64 encoding is supported")
                data = base64.b64decode(value.get("content") or "")
                if len(data) >= hub.lfs_threshold:
                    raise HubError(400, f"{path}: files of {hub.lfs_threshold} bytes or more must be uploaded with LFS")
                prepared.append((key, path, hub._entry_regular(data)))
            else:
                prepared.append((key, path, value))

        with hub._lock:
            repo = self._readable(repo_type, repo_id)
            if create_pr:
                base = hub._resolve(repo, parent) if parent else hub._resolve(repo, rev)
                table, ref = "prs", None
            else:
                table, ref = hub._writable_ref(repo, rev)
                base = repo[table][ref]
                if parent and not (base == parent or (len(parent) < 40 and base.startswith(parent))):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.", "PreconditionFailed")
            tree = dict(repo["commits"][base]["tree"])
            for key, path, value in prepared:
                if key == "file":
                    tree[path] = value
                elif key == "lfsFile":
                    oid = value.get("oid")
                    stored = repo["lfs_objects"].get(oid)
                    if value.get("algo", "sha256") != "sha256" or stored is None:
                        raise HubError(422, f"{path}: LFS object {oid} was not uploaded to this repo (no LFS object with this oid)")
                    if "size" in value and value["size"] != stored:
                        raise HubError(422, f"{path}: LFS object {oid} has size {stored}, not {value['size']}")
                    tree[path] = hub._entry_lfs(oid, stored)
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:  # deletedFolder
                    prefix = path.strip("/")
                    doomed = [p for p in tree if not prefix or p.startswith(prefix + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
            cid = hub._new_commit(repo, [base], tree, summary, description, user)
            pr_url = None
            if create_pr:
                num = str(repo["next_pr"])
                repo["next_pr"] += 1
                repo["prs"][num] = cid
                pr_url = f"{hub._repo_url(repo)}/discussions/{num}"
            else:
                repo[table][ref] = cid
            hub._save()
            url = hub._repo_url(repo)
        hook, hub.after_commit = hub.after_commit, None  # one-shot: lets a test race what follows a landed commit
        if hook is not None:
            hook(repo_type, repo_id, cid)
        self._json({"success": True, "commitOid": cid, "commitUrl": f"{url}/commit/{cid}", "hookOutput": "", "pullRequestUrl": pr_url})


# ---------------------------------------------------------------------- standalone

USAGE = """Run the Hub test double on its own, until Ctrl-C (or SIGTERM):

    python -m tests.hub_server [--port 8765] [--storage-dir DIR] [--token TOKEN] [--verbose]

from the repository root. It prints the variables that point huggingface_hub (and so deltahub,
``hf`` and transformers) at it; set them in the client's shell before it starts.
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.hub_server``: start a ``HubServer``, print its URL and the environment to
    set, serve until SIGINT/SIGTERM, stop cleanly. Exit status 0."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m tests.hub_server", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one, printed)")
    ap.add_argument("--storage-dir", type=Path, default=None, help="keep repos here across runs (default: a temporary folder, removed on exit)")
    ap.add_argument("--token", default=None, help="accept only this token (as user --user); default: any token, as user 'user'")
    ap.add_argument("--user", default="user", help="the user name of --token (default: user)")
    ap.add_argument("--verbose", action="store_true", help="print one line per request to stderr")
    args = ap.parse_args(argv)

    server = HubServer(args.storage_dir, args.port, tokens={args.token: args.user} if args.token else None, verbose=args.verbose)
    try:
        server.start()
    except OSError as e:  # port taken, no permission: one line, not a traceback
        print(f"cannot listen on 127.0.0.1:{args.port}: {e.strerror or e}", file=sys.stderr)
        server.stop()  # removes its temporary storage
        return 1
    token = args.token or "hf_local"
    user = args.user if args.token else "user"
    print(f"Hub test double at {server.url} (storage: {server.storage_dir}; writes need a token; whoami: {user})")
    print("Point huggingface_hub at it in the client's shell, before it starts:")
    print(f"  export HF_ENDPOINT={server.url}")
    print("  export HF_HUB_DISABLE_XET=1")
    print(f"  export HF_TOKEN={token}" + ("" if args.token else "    # any token is accepted"))
    print("Ctrl-C stops it.", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait, so the signal handler runs promptly on every platform
        pass
    server.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
