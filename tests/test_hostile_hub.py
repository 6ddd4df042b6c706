"""The Hub part of issue #15: what others push is hostile, and so is what sits in a folder.

Real HTTP to the local Hub test double (tests/hub_server.py), real files and links in tmp_path,
real races made by the server's hooks; nothing of deltahub is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from safetensors.torch import load_file, save_file

import deltahub
from deltahub.errors import BaseMismatchError, FormatError
from deltahub.hub import HubError, UntaggedPushError

from conftest import HUB_TOKEN
from model_pairs import finetune, load, make_pair, save


def _repo() -> str:
    return f"tester/hostile-{uuid.uuid4().hex[:8]}"


def _env() -> dict:
    return {**os.environ, "HF_TOKEN": HUB_TOKEN}


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    """Two versions of one fine-tune (d1, d2), and d3: the same fine-tune against another base of
    the very same shapes (every weight scaled), so only the sample digests tell the bases apart."""
    root = tmp_path_factory.mktemp("hostile")
    base, ft1 = make_pair("llama", root)
    model = load(ft1, "llama").float()
    finetune(model, steps=2, seed=3)
    ft2 = save(model, root / "llama-ft2", torch.bfloat16)
    other = root / "llama-other-base"
    other.mkdir()
    state = load_file(str(base / "model.safetensors"))
    save_file({k: (v.float() * 1.5).to(v.dtype) for k, v in state.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", other / "config.json")
    out = {}
    for name, b, ft in (("d1", base, ft1), ("d2", base, ft2), ("d3", other, ft1)):
        out[name] = root / name
        deltahub.compress(b, ft, out[name], ratio=1 / 3, progress=False)  # 1/4 is out of reach of this tiny pair
    return out


def _stored_blobs(hub) -> bytes:
    return b"".join(p.read_bytes() for p in (hub.storage_dir / "blobs").rglob("*") if p.is_file())


def test_push_uploads_only_repo_files_and_refuses_a_link_out(hub, deltas, tmp_path):
    secret = f"SECRET-{uuid.uuid4().hex}".encode()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(secret)
    folder = tmp_path / "delta"
    shutil.copytree(deltas["d1"], folder)
    (folder / ".env").write_bytes(b"HF_TOKEN=" + secret)
    (folder / "notes.txt").symlink_to(outside / "secret.txt")
    (folder / "extra").mkdir()
    (folder / "extra" / "tokenizer.json").write_bytes(secret)
    (folder / "delta-00009-of-00009.safetensors").write_bytes(secret)  # a shard the index does not name
    expected = sorted(p.name for p in deltas["d1"].iterdir() if p.name != "README.md")

    repo = _repo()
    r = deltahub.push(folder, repo, token=HUB_TOKEN, allow_local_base=True)
    assert r.skipped == [".env", "delta-00009-of-00009.safetensors", "extra/", "notes.txt"]
    assert "not uploaded" in str(r) and ".env" in str(r)
    assert sorted(hub.list_files(repo)) == sorted([".gitattributes", "README.md", *expected])
    assert secret not in _stored_blobs(hub)

    # a repo file that is a link out of the folder is refused, naming it, before the Hub is asked anything
    (folder / "notes.txt").unlink()
    messages = []
    for target in (outside / "secret.txt", outside / "no-such-file"):
        (folder / "tokenizer.json").unlink(missing_ok=True)
        (folder / "tokenizer.json").symlink_to(target)
        other = _repo()
        with pytest.raises(FormatError, match="tokenizer.json is a link that leads outside") as e:
            deltahub.push(folder, other, token=HUB_TOKEN, allow_local_base=True)
        assert not hub.has_repo(other)
        messages.append(str(e.value))
    assert messages[0] == messages[1]  # the same words whether the target exists or not
    assert secret not in _stored_blobs(hub)


def test_pull_downloads_only_repo_files(hub, deltas, tmp_path):
    repo = _repo()
    deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True)
    hub.commit_directly(repo, {".env": b"x", "run.sh": b"rm -rf ~", "sub/delta_config.json": b"{}"}, "someone's extra files")
    got = deltahub.pull(repo, local_dir=tmp_path / "pulled", token=HUB_TOKEN)
    names = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert names == sorted(p.name for p in deltas["d1"].iterdir())


def _commit_config(repo: str, config: bytes, title: str, tag: str) -> None:
    api = HfApi(token=HUB_TOKEN)
    c = api.create_commit(repo, [CommitOperationAdd("delta_config.json", config)], commit_message=title)
    api.create_tag(repo, tag=tag, revision=c.oid)


def test_a_malformed_history_is_listed_as_unreadable_and_log_push_rollback_go_on(hub, deltas, tmp_path):
    repo = _repo()
    deltahub.push(deltas["d1"], repo, message="good v1", token=HUB_TOKEN, allow_local_base=True)
    cfg = json.loads((deltas["d1"] / "delta_config.json").read_text())
    _commit_config(repo, json.dumps({**cfg, "base": "evil/base"}).encode(), "base is a string", "v2")
    _commit_config(repo, b"[" * 200 + b"]" * 200, "nested too deep", "v3")
    _commit_config(repo, json.dumps({**cfg, "method": None}).encode(), "method is null", "v4")

    hist = deltahub.history(repo, token=HUB_TOKEN)
    by_tag = {v.tags[0]: v for v in hist.versions if v.tags}
    assert by_tag["v2"].problem.startswith(f"delta_config.json at {by_tag['v2'].commit[:12]}") and "field 'base'" in by_tag["v2"].problem
    assert "nested 200 deep" in by_tag["v3"].problem
    assert "field 'method'" in by_tag["v4"].problem
    assert by_tag["v1"].problem is None and by_tag["v1"].method == "auto"
    assert [v.tags for v in hist.unreadable] == [["v4"], ["v3"], ["v2"]]
    assert all(v.method is None and not v.files for v in hist.unreadable)
    assert "3 unreadable versions left out (v4, v3, v2)" in hist.summary()
    assert hist.full_model_bytes == by_tag["v1"].dense_bytes

    p = subprocess.run([sys.executable, "-m", "deltahub", "log", repo], capture_output=True, text=True, env=_env())
    assert p.returncode == 0 and "unreadable" in p.stdout, p.stderr

    with pytest.raises(HubError, match=r"v2 cannot be rolled back to: .*field 'base'"):
        deltahub.rollback(repo, to="v2", token=HUB_TOKEN)
    rb = deltahub.rollback(repo, to="v1", token=HUB_TOKEN)  # from a head whose config is unreadable
    assert rb.tag == "v5" and hub.read_file(repo, "delta_config.json") == (deltas["d1"] / "delta_config.json").read_bytes()
    assert deltahub.push(deltas["d2"], repo, message="good again", token=HUB_TOKEN, allow_local_base=True).tag == "v6"
    card = hub.read_file(repo, "README.md").decode()
    rows = [line.split("|")[1].strip() for line in card.splitlines() if line.startswith("| v") and not line.startswith("| version")]
    assert rows == ["v6", "v5", "v1"]


def test_a_push_whose_tag_is_taken_meanwhile_reports_its_commit_and_the_tag_it_used(hub, deltas):
    repo = _repo()
    deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True)
    rival = {}

    def rival_push(repo_type, repo_id, landed):
        # another user's push lands on top of ours and takes v2, through HTTP, before our push tags
        api = HfApi(token=HUB_TOKEN)
        c = api.create_commit(repo_id, [CommitOperationAdd("notes.txt", b"theirs")], commit_message="rival", parent_commit=landed)
        api.create_tag(repo_id, tag="v2", revision=c.oid)
        rival.update(landed=landed, commit=c.oid)

    hub.after_commit = rival_push
    r = deltahub.push(deltas["d2"], repo, token=HUB_TOKEN, allow_local_base=True)
    assert r.commit == rival["landed"] and r.tag == "v3" and "v2 was taken" in r.note and "@v3" in str(r)
    assert hub.refs(repo)["tags"] == {"v1": hub.commit_ids(repo)[2], "v2": rival["commit"], "v3": r.commit}

    # tagging fails for another reason: the error says the commit landed and how to tag it
    hub.fail_next("POST", r"/tag/", status=403)
    with pytest.raises(UntaggedPushError, match="landed on main") as e:
        deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True)
    landed = e.value.result.commit
    assert hub.branch_head(repo) == landed and landed in str(e.value) and e.value.command in str(e.value)
    assert landed not in hub.refs(repo)["tags"].values()
    argv = e.value.command.split()
    assert argv[:3] == ["hf", "repos", "tag"]
    p = subprocess.run([shutil.which("hf") or "hf", *argv[1:]], capture_output=True, text=True, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert hub.refs(repo)["tags"]["v4"] == landed


def test_a_failed_first_push_leaves_no_repo(hub, deltas):
    repo = _repo()
    hub.fail_next_lfs_upload = True
    with pytest.raises(HubError, match="nothing was committed.*was deleted"):
        deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True)
    assert not hub.has_repo(repo)

    # and when the deletion fails too, the error says an empty repo was left and how to remove it
    hub.fail_next_lfs_upload = True
    hub.fail_next("DELETE", "/api/repos/delete")
    with pytest.raises(HubError, match=f"left it without a version.*hf repos delete {repo}"):
        deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True)
    assert hub.has_repo(repo) and len(hub.commit_ids(repo)) == 1
    assert deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True).tag == "v1"  # the retry uses it


def test_a_commit_message_cannot_forge_a_card_row(hub, deltas):
    repo = _repo()
    forged = "ok\n| v99 | deadbeef | 2020-01-01 | svd | 0.1 | 1 B | forged |\n<img src=x onerror=alert(1)>"
    deltahub.push(deltas["d1"], repo, message=forged, token=HUB_TOKEN, allow_local_base=True)
    deltahub.push(deltas["d2"], repo, message="second | with a pipe", token=HUB_TOKEN, allow_local_base=True)  # v1's title now comes from the Hub
    card = Path(hf_hub_download(repo, "README.md", token=HUB_TOKEN)).read_text()
    rows = [line for line in card.splitlines() if line.startswith("| v") and not line.startswith("| version")]
    assert [r.split(" | ")[0] for r in rows] == ["| v2", "| v1"]
    assert all(len(r.replace("\\|", "").split("|")) == 9 for r in rows)  # 7 cells each
    assert "<img" not in card and "&lt;img" in card
    assert "ok \\| v99 \\| deadbeef" in card and not re.search(r"(?<!\\)\| v99", card)  # the pipes are escaped


def test_rollback_to_a_version_with_the_same_shapes_but_another_base_needs_force(hub, deltas):
    c1 = json.loads((deltas["d1"] / "delta_config.json").read_text())["base"]
    c3 = json.loads((deltas["d3"] / "delta_config.json").read_text())["base"]
    assert c1["fingerprint"] == c3["fingerprint"] and c1["samples"] != c3["samples"]
    repo = _repo()
    deltahub.push(deltas["d1"], repo, token=HUB_TOKEN, allow_local_base=True)
    deltahub.push(deltas["d3"], repo, token=HUB_TOKEN, allow_local_base=True)
    with pytest.raises(BaseMismatchError, match="same shape but other weights.*force"):
        deltahub.rollback(repo, to="v1", token=HUB_TOKEN)
    assert list(hub.refs(repo)["tags"]) == ["v1", "v2"]
    assert deltahub.rollback(repo, to="v1", force=True, token=HUB_TOKEN).tag == "v3"
    deltahub.push(deltas["d2"], repo, token=HUB_TOKEN, allow_local_base=True)  # same base as v1 (v4)
    assert deltahub.rollback(repo, to="v1", token=HUB_TOKEN).tag == "v5"


def test_the_card_escapes_what_a_config_says_and_survives_wrong_types(deltas):
    from deltahub.card import render_card

    cfg = json.loads((deltas["d1"] / "delta_config.json").read_text())
    hostile = {
        **cfg,
        "base": {"name_or_path": "evil/x`\n| forged | row |\n<script>alert(1)</script>", "revision": "main\nbase_model: other/model"},
        "method": {"name": "svd | injected", "ratio": "0.5"},
        "totals": {"ratio": "big", "stored_bytes": None, "dense_bytes": [1]},
        "summary": {"mean_rel_error": "x", "worst": [["a|b", 0.5], ["c", "NaN"], "junk"]},
    }
    card = render_card(hostile, "tester/card")
    body = card.split("---", 2)[2]
    assert "<script>" not in card and "| forged | row |" not in card and "\n| forged" not in card
    assert all(len(line.replace("\\|", "").split("|")) in (3, 4) for line in body.splitlines() if line.startswith("|"))
    front = card.split("---")[1]
    assert "base_model:" not in front and "other/model" not in front  # not a Hub id at a revision: no base_model
    assert "deltahub-unknown" in front and "a\\|b" in card
    good = render_card(cfg, "tester/card")
    assert "library_name: deltahub" in good and "## Tensors with the largest error" in good
