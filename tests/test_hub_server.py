"""The Hub test double (tests/hub_server.py) against the real, unchanged ``huggingface_hub`` client.

``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HUB_DISABLE_XET`` at import time and
may already be imported in this process by other test modules, so the round trips run the client in
a subprocess with those variables set. One test also shows the in-process route (explicit
``endpoint=`` plus patched constants). Raw-HTTP tests pin the wire details the client relies on.
"""

from __future__ import annotations

import hashlib
import http.client as http_client
import json
import os
import struct
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import HubServer, git_blob_oid, reserve_port  # noqa: E402

TOKEN = "hf_hubserver_secret_token_0123456789"
REPO = "alice/delta-model"


def make_safetensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A valid safetensors file from ``{name: (dtype, shape, raw bytes)}``."""
    header, offset, data = {"__metadata__": {"format": "pt"}}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


WEIGHTS = make_safetensors({"w": ("F32", [4, 4], bytes(range(64))), "b": ("F32", [4], bytes(range(100, 116)))})


@pytest.fixture
def hub(tmp_path):
    server = HubServer(storage_dir=tmp_path / "hub").start()
    try:
        yield server
    finally:
        server.stop()
    assert server.errors == [], server.errors[0]


def run_client(hub: HubServer, home: Path, code: str, args: dict | None = None, offline: bool = False, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter pointed at ``hub``; it fills the dict ``out``, returned here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    prelude = "import json, sys\nargs = json.loads(sys.argv[1])\nout = {}\n"
    epilogue = "\nprint('RESULT:' + json.dumps(out))\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue, json.dumps(args or {})],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert proc.returncode == 0 and lines, f"client failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT:"):])


def http(hub: HubServer, method: str, path: str, body=None, headers: dict | None = None, token: str | None = TOKEN):
    """(status, headers, body bytes) of one raw request."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    h = {"Content-Type": "application/json"} if isinstance(body, (dict, list)) else {}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    req = urllib.request.Request(hub.url + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


# --------------------------------------------------------------------------- full round trip


ROUND_TRIP = """
from pathlib import Path
from huggingface_hub import (HfApi, CommitOperationAdd, CommitOperationCopy, CommitOperationDelete,
                             snapshot_download, hf_hub_download)
from huggingface_hub.errors import (HfHubHTTPError, EntryNotFoundError, RevisionNotFoundError,
                                    RepositoryNotFoundError)
api = HfApi()
repo = args["repo"]
out["whoami"] = api.whoami()["name"]
url = api.create_repo(repo)
out["repo_url"], out["repo_id"] = str(url), url.repo_id
out["exist_ok"] = api.create_repo(repo, exist_ok=True).repo_id
try:
    api.create_repo(repo)
except HfHubHTTPError as e:
    out["duplicate_status"] = e.response.status_code

c1 = api.upload_folder(repo_id=repo, folder_path=args["folder"], commit_message="first upload")
out["c1"] = c1.oid
out["c1_url"] = c1.commit_url
info = api.model_info(repo, files_metadata=True)
out["info_sha"] = info.sha
out["siblings"] = {s.rfilename: {"size": s.size, "lfs": s.lfs.sha256 if s.lfs else None} for s in info.siblings}
out["safetensors_total"] = info.safetensors.total
api.create_tag(repo, tag="v1", revision=c1.oid)
try:
    api.create_tag(repo, tag="v1")
except HfHubHTTPError as e:
    out["dup_tag_status"] = e.response.status_code
api.create_tag(repo, tag="v1", exist_ok=True)

c2 = api.create_commit(repo, operations=[CommitOperationAdd("config.json", b'{"v": 2}')], commit_message="bump config",
                       commit_description="second", parent_commit=c1.oid)
out["c2"] = c2.oid
refs = api.list_repo_refs(repo)
out["branches"] = {r.name: r.target_commit for r in refs.branches}
out["tags"] = {r.name: r.target_commit for r in refs.tags}
commits = api.list_repo_commits(repo)
out["commits"] = [[c.commit_id, c.title, c.message, c.authors] for c in commits]
out["files_main"] = sorted(api.list_repo_files(repo))

# a push whose parent is stale (someone pushed c2 since c1) must fail
try:
    api.create_commit(repo, operations=[CommitOperationAdd("late.txt", b"late")], commit_message="stale",
                      parent_commit=c1.oid)
    out["stale"] = None
except HfHubHTTPError as e:
    out["stale"] = [type(e).__name__, e.response.status_code, e.server_message]

snaps = {}
for rev in ("v1", "main", c1.oid):
    folder = Path(snapshot_download(repo, revision=rev))
    snaps[rev] = {"path": str(folder), "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
                  "config": (folder / "config.json").read_text()}
out["snaps"] = snaps
one = hf_hub_download(repo, "model.safetensors", revision="v1")
out["one_sha256"] = __import__("hashlib").sha256(Path(one).read_bytes()).hexdigest()
out["local_dir"] = sorted(p.name for p in Path(snapshot_download(repo, local_dir=args["local_dir"])).iterdir())

meta = api.get_safetensors_metadata(repo)
out["st_tensors"] = sorted(meta.files_metadata["model.safetensors"].tensors)
out["st_params"] = meta.parameter_count

for name, call in {
    "missing_file": lambda: hf_hub_download(repo, "nope.txt"),
    "missing_rev": lambda: hf_hub_download(repo, "config.json", revision="no-such-branch"),
    "missing_repo": lambda: api.model_info("alice/does-not-exist"),
}.items():
    try:
        call()
        out[name] = None
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError) as e:
        out[name] = type(e).__name__
out["file_exists"] = [api.file_exists(repo, "config.json"), api.file_exists(repo, "nope.txt")]
out["revision_exists"] = [api.revision_exists(repo, "v1"), api.revision_exists(repo, "nope")]
"""


def test_round_trip(hub, tmp_path):
    folder = write_folder(tmp_path / "src", {"config.json": b'{"v": 1}', "model.safetensors": WEIGHTS, "sub/notes.txt": b"hello\n"})
    out = run_client(hub, tmp_path / "home", ROUND_TRIP, {"repo": REPO, "folder": str(folder), "local_dir": str(tmp_path / "ld")})

    assert out["whoami"] == "user"
    assert out["repo_url"] == f"{hub.url}/{REPO}" and out["repo_id"] == REPO and out["exist_ok"] == REPO
    assert out["duplicate_status"] == 409 and out["dup_tag_status"] == 409
    c1, c2 = out["c1"], out["c2"]
    assert out["c1_url"] == f"{hub.url}/{REPO}/commit/{c1}"
    assert out["info_sha"] == c1
    sha_w = hashlib.sha256(WEIGHTS).hexdigest()
    assert out["siblings"]["model.safetensors"] == {"size": len(WEIGHTS), "lfs": sha_w}
    assert out["siblings"]["config.json"] == {"size": 8, "lfs": None}
    assert out["safetensors_total"] == 20
    assert out["branches"] == {"main": c2} and out["tags"] == {"v1": c1}
    ids = [c[0] for c in out["commits"]]
    assert ids[:2] == [c2, c1] and len(ids) == 3
    assert out["commits"][0][1:] == ["bump config", "second", ["user"]]
    assert out["commits"][2][1] == "initial commit"
    assert out["files_main"] == [".gitattributes", "config.json", "model.safetensors", "sub/notes.txt"]

    name, status, message = out["stale"]
    assert status == 412 and name == "HfHubHTTPError" and "commit has happened since" in message
    assert hub.branch_head(REPO) == c2 and "late.txt" not in hub.list_files(REPO)

    snaps = out["snaps"]
    assert snaps["v1"]["config"] == '{"v": 1}' and snaps[c1]["config"] == '{"v": 1}' and snaps["main"]["config"] == '{"v": 2}'
    assert snaps["v1"]["path"] == snaps[c1]["path"] and snaps["v1"]["path"].endswith(c1)
    assert snaps["main"]["files"] == out["files_main"]
    assert out["one_sha256"] == sha_w
    assert set(out["local_dir"]) >= {"config.json", "model.safetensors", "sub"}
    assert out["st_tensors"] == ["b", "w"] and out["st_params"] == {"F32": 20}
    assert out["missing_file"] == "RemoteEntryNotFoundError"
    assert out["missing_rev"] == "RevisionNotFoundError"
    assert out["missing_repo"] == "RepositoryNotFoundError"
    assert out["file_exists"] == [True, False] and out["revision_exists"] == [True, False]

    # Offline afterwards: the cache alone serves tags, branches and shas; the server sees no request.
    before = len(hub.requests)
    offline = run_client(hub, tmp_path / "home", """
        from pathlib import Path
        from huggingface_hub import snapshot_download, hf_hub_download
        out["paths"] = [snapshot_download(args["repo"], revision=r) for r in ("v1", "main", args["c1"])]
        out["config"] = Path(hf_hub_download(args["repo"], "config.json", revision="v1")).read_text()
    """, {"repo": REPO, "c1": c1}, offline=True)
    assert offline["paths"] == [snaps["v1"]["path"], snaps["main"]["path"], snaps[c1]["path"]]
    assert offline["config"] == '{"v": 1}'
    assert len(hub.requests) == before


# --------------------------------------------------------------------------- LFS: dedup, copy, delete, failures


def test_dedup_copy_and_delete(hub, tmp_path):
    big = os.urandom(300_000)
    out = run_client(hub, tmp_path / "home", """
        from huggingface_hub import HfApi, CommitOperationAdd, CommitOperationCopy, CommitOperationDelete
        api = HfApi()
        repo = args["repo"]
        api.create_repo(repo)
        data = open(args["big"], "rb").read()
        out["c1"] = api.create_commit(repo, operations=[CommitOperationAdd("a/weights.bin", data),
                                                        CommitOperationAdd("readme.txt", b"hi")], commit_message="one").oid
    """, {"repo": REPO, "big": str(write_folder(tmp_path / "f", {"big.bin": big}) / "big.bin")})
    assert hub.lfs_bytes_uploaded == len(big) and hub.lfs_uploads == 1

    out = run_client(hub, tmp_path / "home", """
        from huggingface_hub import HfApi, CommitOperationAdd, CommitOperationCopy, CommitOperationDelete
        api = HfApi()
        repo = args["repo"]
        data = open(args["big"], "rb").read()
        # same content under a new path: the LFS batch answers with no action, nothing is re-uploaded
        out["c2"] = api.create_commit(repo, operations=[CommitOperationAdd("b/same.bin", data)], commit_message="two").oid
        # server-side copy of an LFS file plus a regular file copy, and deletions
        out["c3"] = api.create_commit(repo, operations=[
            CommitOperationCopy("a/weights.bin", "c/copied.bin"),
            CommitOperationCopy("readme.txt", "c/readme-copy.txt"),
            CommitOperationDelete("readme.txt"),
            CommitOperationDelete("b/"),
        ], commit_message="copy and delete").oid
        out["files"] = sorted(api.list_repo_files(repo))
        try:
            api.create_commit(repo, operations=[CommitOperationDelete("never-there.txt")], commit_message="x")
        except Exception as e:
            out["delete_missing"] = type(e).__name__
    """, {"repo": REPO, "big": str(tmp_path / "f" / "big.bin")})
    assert hub.lfs_bytes_uploaded == len(big) and hub.lfs_uploads == 1
    assert out["files"] == [".gitattributes", "a/weights.bin", "c/copied.bin", "c/readme-copy.txt"]
    assert out["delete_missing"] == "RemoteEntryNotFoundError"
    files = hub.list_files(REPO)
    assert files["c/copied.bin"]["lfs"] and files["c/copied.bin"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert hub.read_file(REPO, "c/readme-copy.txt") == b"hi" and not files["c/readme-copy.txt"]["lfs"]
    assert hub.commit_ids(REPO)[:3] == [out["c3"], out["c2"], hub.commit_ids(REPO)[2]]


def test_failed_lfs_upload_leaves_no_commit(hub, tmp_path):
    http(hub, "POST", "/api/repos/create", {"name": "delta-model", "organization": "alice"})
    head = hub.branch_head(REPO)
    hub.fail_next_lfs_upload = True
    code = """
        from huggingface_hub import HfApi, CommitOperationAdd
        try:
            HfApi().create_commit(args["repo"], operations=[CommitOperationAdd("w.safetensors", args["data"].encode()),
                                                            CommitOperationAdd("c.json", b"{}")], commit_message="push")
            out["error"] = None
        except Exception as e:
            out["error"] = [type(e).__name__, type(e.__cause__).__name__, getattr(e.__cause__.response, "status_code", None)]
    """
    out = run_client(hub, tmp_path / "home", code, {"repo": REPO, "data": "x" * 5000 + "\0"})
    assert out["error"] == ["RuntimeError", "HfHubHTTPError", 403]
    assert hub.lfs_failed_uploads == 1 and hub.lfs_bytes_uploaded == 0
    assert hub.branch_head(REPO) == head and len(hub.commit_ids(REPO)) == 1
    assert not hub.fail_next_lfs_upload

    # A transient 500 is retried by the client (1 s back-off) and the push then goes through.
    hub.lfs_failure_status = 500
    hub.fail_next_lfs_upload = True
    out = run_client(hub, tmp_path / "home", code, {"repo": REPO, "data": "y" * 5000 + "\0"})
    assert out["error"] is None and hub.lfs_failed_uploads == 2 and hub.lfs_bytes_uploaded == 5001
    assert sorted(hub.list_files(REPO)) == [".gitattributes", "c.json", "w.safetensors"]


def test_multipart_upload_pull_request_and_encoded_revision(tmp_path):
    with HubServer(storage_dir=tmp_path / "hub", lfs_multipart_chunk_size=64 * 1024) as hub:
        big = os.urandom(200_000)
        out = run_client(hub, tmp_path / "home", """
            import hashlib
            from pathlib import Path
            from huggingface_hub import HfApi, CommitOperationAdd, hf_hub_download
            api = HfApi()
            repo = args["repo"]
            api.create_repo(repo)
            data = open(args["big"], "rb").read()
            info = api.create_commit(repo, operations=[CommitOperationAdd("big.bin", data)], commit_message="via PR",
                                     create_pr=True)
            out["pr"] = [info.pr_url, info.pr_revision, info.pr_num]
            path = hf_hub_download(repo, "big.bin", revision=info.pr_revision)
            out["sha"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            refs = api.list_repo_refs(repo, include_pull_requests=True)
            out["prs"] = [r.ref for r in refs.pull_requests]
            out["main_files"] = api.list_repo_files(repo)
            api.create_branch(repo, branch="dev", revision=info.pr_revision)
            api.create_branch(repo, branch="dev", exist_ok=True)
            out["dev_files"] = sorted(api.list_repo_files(repo, revision="dev"))
            api.delete_branch(repo, branch="dev")
            api.create_tag(repo, tag="t")
            api.delete_tag(repo, tag="t")
            refs = api.list_repo_refs(repo)
            out["refs"] = [[r.name for r in refs.branches], [r.name for r in refs.tags]]
        """, {"repo": REPO, "big": str(write_folder(tmp_path / "f", {"big.bin": big}) / "big.bin")})
        assert hub.errors == []
    assert out["pr"] == [f"{hub.url}/{REPO}/discussions/1", "refs/pr/1", 1]
    assert out["sha"] == hashlib.sha256(big).hexdigest()
    assert out["prs"] == ["refs/pr/1"] and out["main_files"] == [".gitattributes"]
    assert out["dev_files"] == [".gitattributes", "big.bin"]
    assert out["refs"] == [["main"], []]
    assert hub.lfs_bytes_uploaded == len(big)
    assert sum(1 for m, p, s in hub.requests if m == "PUT" and "/part/" in p and s == 200) == 4  # 200 kB in 64 KiB parts


# --------------------------------------------------------------------------- in-process client, explicit endpoint


def test_in_process_client_with_explicit_endpoint(hub, tmp_path, monkeypatch):
    """Without a subprocess: pass ``endpoint=`` everywhere and switch Xet off through the constants."""
    import huggingface_hub as hf
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = hf.HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(REPO)
    info = api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="model.safetensors", repo_id=REPO, commit_message="w")
    path = hf.hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == WEIGHTS and Path(path).parent.name == info.oid
    snap = hf.snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in Path(snap).iterdir()) == [".gitattributes", "model.safetensors"]


# --------------------------------------------------------------------------- wire details (raw HTTP)


def test_wire_protocol_details(hub):
    assert http(hub, "POST", "/api/repos/create", {"name": "delta-model", "organization": "alice"}, token=None)[0] == 401
    assert http(hub, "POST", "/api/repos/create", {"name": "delta-model", "organization": "alice"})[0] == 200
    status, _, body = http(hub, "POST", "/api/repos/create", {"name": "delta-model", "organization": "alice"})
    assert status == 409 and json.loads(body)["url"] == f"{hub.url}/{REPO}"
    head = hub.branch_head(REPO)

    status, h, _ = http(hub, "GET", f"/{REPO}/resolve/main/missing.txt")
    assert (status, h["X-Error-Code"], h["X-Repo-Commit"]) == (404, "EntryNotFound", head)
    assert http(hub, "HEAD", f"/{REPO}/resolve/nope/x")[1]["X-Error-Code"] == "RevisionNotFound"
    assert http(hub, "GET", "/alice/other/resolve/main/x")[1]["X-Error-Code"] == "RepoNotFound"
    assert http(hub, "GET", "/api/models/alice/other")[1]["X-Error-Code"] == "RepoNotFound"

    # preupload: LFS by .gitattributes pattern, by size, by binary sample; regular otherwise
    files = [
        {"path": "a.safetensors", "size": 10, "sample": ""},
        {"path": "big.txt", "size": 10_000_000, "sample": ""},
        {"path": "blob.dat", "size": 3, "sample": "AAEC"},
        {"path": "c.json", "size": 2, "sample": "e30="},
    ]
    status, _, body = http(hub, "POST", f"/api/models/{REPO}/preupload/main", {"files": files})
    assert status == 200
    assert [f["uploadMode"] for f in json.loads(body)["files"]] == ["lfs", "lfs", "lfs", "regular"]

    # LFS batch: an action for a new object; committing an oid that was never uploaded is refused
    oid = hashlib.sha256(b"payload").hexdigest()
    status, _, body = http(hub, "POST", f"/{REPO}.git/info/lfs/objects/batch", {"operation": "upload", "objects": [{"oid": oid, "size": 7}]})
    obj = json.loads(body)["objects"][0]
    assert status == 200 and obj["actions"]["upload"]["href"].startswith(hub.url)
    ndjson = b"\n".join(json.dumps(x).encode() for x in [
        {"key": "header", "value": {"summary": "s", "description": ""}},
        {"key": "lfsFile", "value": {"path": "p.bin", "algo": "sha256", "oid": oid, "size": 7}},
    ])
    assert http(hub, "POST", f"/api/models/{REPO}/commit/main", ndjson, {"Content-Type": "application/x-ndjson"})[0] == 422
    assert hub.branch_head(REPO) == head
    # upload with the wrong content: refused, nothing stored
    assert http(hub, "PUT", obj["actions"]["upload"]["href"][len(hub.url):], b"PAYLOAD", token=None)[0] == 400
    assert http(hub, "PUT", obj["actions"]["upload"]["href"][len(hub.url):], b"payload", token=None)[0] == 200
    status, _, body = http(hub, "POST", f"/{REPO}.git/info/lfs/objects/batch", {"operation": "upload", "objects": [{"oid": oid, "size": 7}]})
    assert "actions" not in json.loads(body)["objects"][0]
    status, _, body = http(hub, "POST", f"/api/models/{REPO}/commit/main", ndjson, {"Content-Type": "application/x-ndjson"})
    c1 = json.loads(body)["commitOid"]
    assert status == 200 and hub.branch_head(REPO) == c1

    # resolve headers and ranges; URL-encoded revisions
    status, h, body = http(hub, "GET", f"/{REPO}/resolve/{c1}/p.bin", headers={"Range": "bytes=2-4"})
    assert (status, body, h["Content-Range"]) == (206, b"ylo", "bytes 2-4/7")
    status, h, _ = http(hub, "HEAD", f"/{REPO}/resolve/refs%2Fheads%2Fmain/p.bin")
    assert status == 200 and h["X-Linked-Etag"] == f'"{oid}"' and h["X-Linked-Size"] == "7" and h["Content-Length"] == "7"
    assert h["X-Repo-Commit"] == c1
    status, h, _ = http(hub, "HEAD", f"/{REPO}/resolve/{c1[:7]}/.gitattributes")
    assert status == 200 and h["ETag"] == f'"{git_blob_oid(hub.read_file(REPO, ".gitattributes"))}"'
    assert http(hub, "GET", f"/{REPO}/resolve/main/p.bin", headers={"Range": "bytes=9-"})[0] == 416

    # request bodies sent with chunked transfer encoding are read too
    conn = http_client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    oid2 = hashlib.sha256(b"chunked body").hexdigest()
    http(hub, "POST", f"/{REPO}.git/info/lfs/objects/batch", {"operation": "upload", "objects": [{"oid": oid2, "size": 12}]})
    conn.request("PUT", f"/__lfs/model/{REPO}/{oid2}?size=12", body=iter([b"chunked", b" body"]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    assert hub.lfs_bytes_uploaded == 7 + 12

    # tags: 409 on duplicates, 404 on unknown revisions
    assert http(hub, "POST", f"/api/models/{REPO}/tag/main", {"tag": "v1"})[0] == 200
    assert http(hub, "POST", f"/api/models/{REPO}/tag/main", {"tag": "v1"})[0] == 409
    assert http(hub, "POST", f"/api/models/{REPO}/tag/nope", {"tag": "v2"})[1]["X-Error-Code"] == "RevisionNotFound"
    status, _, body = http(hub, "GET", f"/api/models/{REPO}/tree/v1?recursive=true")
    assert [(i["type"], i["path"]) for i in json.loads(body)] == [("file", ".gitattributes"), ("file", "p.bin")]


def test_tokens_private_repos_and_logs(tmp_path, capsys):
    with HubServer(storage_dir=tmp_path / "hub", tokens={TOKEN: "alice"}, verbose=True) as hub:
        assert http(hub, "GET", "/api/whoami-v2", token="wrong")[0] == 401
        assert json.loads(http(hub, "GET", "/api/whoami-v2")[2])["name"] == "alice"
        assert http(hub, "POST", "/api/repos/create", {"name": "secret", "visibility": "private"})[0] == 200
        status, h, _ = http(hub, "GET", "/api/models/alice/secret", token=None)
        assert status == 401 and h["X-Error-Code"] == "RepoNotFound"
        assert http(hub, "GET", "/api/models/alice/secret")[0] == 200
        assert hub.errors == []
    err = capsys.readouterr().err
    assert "/api/whoami-v2" in err and TOKEN not in err and "wrong" not in err
    assert TOKEN not in repr(hub.requests) and TOKEN not in (tmp_path / "hub" / "state.json").read_text()


def test_state_survives_a_restart_on_the_same_port_and_folder(tmp_path):
    port = reserve_port()
    with HubServer(storage_dir=tmp_path / "hub", port=port) as hub:
        assert hub.url == f"http://127.0.0.1:{port}"
        http(hub, "POST", "/api/repos/create", {"name": "delta-model", "organization": "alice"})
        head = hub.branch_head(REPO)
    with HubServer(storage_dir=tmp_path / "hub", port=port) as hub:
        status, h, body = http(hub, "GET", f"/{REPO}/resolve/main/.gitattributes")
        assert status == 200 and h["X-Repo-Commit"] == head and b"filter=lfs" in body


def _commit_body(summary: str, files: dict[str, bytes], parent: str | None = None) -> bytes:
    """An NDJSON commit payload of regular files, as huggingface_hub sends it."""
    import base64

    header = {"summary": summary, "description": "", **({"parentCommit": parent} if parent else {})}
    lines = [{"key": "header", "value": header}]
    lines += [{"key": "file", "value": {"path": p, "content": base64.b64encode(d).decode(), "encoding": "base64"}} for p, d in files.items()]
    return b"\n".join(json.dumps(x).encode() for x in lines)


def test_after_commit_hook_races_over_http_and_fail_next_fails_matching_requests(hub):
    http(hub, "POST", "/api/repos/create", {"name": "delta-model", "organization": "alice"})
    head = hub.branch_head(REPO)
    seen = {}

    def rival(repo_type, repo_id, cid):
        # another client's push and tag, through HTTP, while our commit's answer is still pending
        seen["landed"] = cid
        body = _commit_body("rival push", {"rival.txt": b"theirs"}, parent=cid)
        status, _, answer = http(hub, "POST", f"/api/models/{repo_id}/commit/main", body, {"Content-Type": "application/x-ndjson"})
        seen["rival"] = json.loads(answer)["commitOid"] if status == 200 else status
        seen["tag"] = http(hub, "POST", f"/api/models/{repo_id}/tag/{seen['rival']}", {"tag": "v1"})[0]

    hub.after_commit = rival
    status, _, answer = http(hub, "POST", f"/api/models/{REPO}/commit/main", _commit_body("ours", {"a.txt": b"a"}, parent=head), {"Content-Type": "application/x-ndjson"})
    ours = json.loads(answer)["commitOid"]
    assert status == 200 and seen["landed"] == ours and seen["tag"] == 200 and hub.after_commit is None
    assert hub.commit_ids(REPO)[:3] == [seen["rival"], ours, head] and hub.refs(REPO)["tags"] == {"v1": seen["rival"]}
    # our tag now collides, as it would for a real push that lost the race
    assert http(hub, "POST", f"/api/models/{REPO}/tag/{ours}", {"tag": "v1"})[0] == 409

    hub.fail_next("POST", r"/tag/", status=403)
    status, h, _ = http(hub, "POST", f"/api/models/{REPO}/tag/{ours}", {"tag": "v2"})
    assert status == 403 and "fail_next" in h["X-Error-Message"] and "v2" not in hub.refs(REPO)["tags"]
    assert http(hub, "POST", f"/api/models/{REPO}/tag/{ours}", {"tag": "v2"})[0] == 200  # one-shot
    hub.fail_next("DELETE", "/api/repos/delete", times=2)
    for _ in range(2):
        assert http(hub, "DELETE", "/api/repos/delete", {"name": "delta-model", "organization": "alice"})[0] == 403
    assert hub.has_repo(REPO)
    assert http(hub, "DELETE", "/api/repos/delete", {"name": "delta-model", "organization": "alice"})[0] == 200
    assert not hub.has_repo(REPO)
