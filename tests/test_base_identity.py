"""Issue #16, base identity and self-contained repos, against the local Hub test double.

A base from the Hugging Face cache is recorded as its repo id and commit; ``base_id`` records a
Hub id for a local base, checked against the Hub's safetensors headers; ``set_base_id`` re-records
it without recompressing; ``push`` refuses a local base; errors about a missing base say what to
do; tokenizer files are always in the delta repo. Real files, a real Hub (HTTP), real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import deltahub
from deltahub.base_id import BaseIdError, BaseIdNotCheckedWarning, set_base_id
from deltahub.checkpoint import Checkpoint, CheckpointError
from deltahub.hub import LocalBaseError

from conftest import HUB_TOKEN
from model_pairs import make_pair

# The base-identity code paths do not depend on the method: the fastest one, at its natural size.
HOW = dict(method="dense", ratio=None)
WORDS = ["[UNK]", "[PAD]", "hello", "world", "delta", "hub", "base"]


def _save_tokenizer(folder: Path) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)


def _upload(folder: Path, name: str) -> tuple[str, str]:
    """Push ``folder`` to a new repo of the test Hub: (repo id, commit)."""
    api = HfApi(token=HUB_TOKEN)
    repo = f"tester/{name}-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder)).oid
    return repo, commit


def _config(delta: Path) -> dict:
    return json.loads((delta / "delta_config.json").read_text())


def _front_matter(card: str) -> str:
    return card.split("---")[1]


@pytest.fixture(scope="module")
def world(hub, tmp_path_factory):
    """A llama pair with the same tokenizer in base and fine-tune, both on the test Hub and
    downloaded into an HF cache; and another model (qwen2) on the Hub."""
    root = tmp_path_factory.mktemp("base-identity")
    base, ft = make_pair("llama", root)
    for folder in (base, ft):
        _save_tokenizer(folder)
    base_repo, base_commit = _upload(base, "base")
    ft_repo, ft_commit = _upload(ft, "ft")
    cache = root / "hf-cache"
    base_snap = Path(snapshot_download(base_repo, cache_dir=cache, token=HUB_TOKEN))
    ft_snap = Path(snapshot_download(ft_repo, cache_dir=cache, token=HUB_TOKEN))
    other_base, _ = make_pair("qwen2", root / "other")
    other_repo, _ = _upload(other_base, "other")
    local = root / "local-delta"  # compressed from local folders: its base is a path
    deltahub.compress(base, ft, local, **HOW, progress=False)
    return dict(root=root, base=base, ft=ft, base_repo=base_repo, base_commit=base_commit, ft_repo=ft_repo, ft_commit=ft_commit,
                cache=cache, base_snap=base_snap, ft_snap=ft_snap, other_repo=other_repo, local=local)


def test_a_base_in_the_hf_cache_is_recorded_as_its_repo_id_and_commit(world, tmp_path):
    snap = world["base_snap"]
    assert snap.parent.name == "snapshots" and snap.name == world["base_commit"]  # what snapshot_download returns
    out = tmp_path / "delta"
    deltahub.compress(snap, world["ft_snap"], out, **HOW, progress=False)
    cfg = _config(out)
    assert (cfg["base"]["name_or_path"], cfg["base"]["revision"]) == (world["base_repo"], world["base_commit"])
    assert (cfg["finetuned"]["name_or_path"], cfg["finetuned"]["revision"]) == (world["ft_repo"], world["ft_commit"])
    text = (out / "delta_config.json").read_text()
    assert str(world["cache"]) not in text and "snapshots" not in text  # no path of this machine
    front = _front_matter((out / "README.md").read_text())
    assert f"base_model: {world['base_repo']}" in front and "base_model_relation: adapter" in front
    # a fine-tune that is an ordinary folder stays an absolute path beside a cached base
    out2 = tmp_path / "delta2"
    deltahub.compress(snap, world["ft"], out2, **HOW, progress=False)
    assert _config(out2)["base"]["name_or_path"] == world["base_repo"] and _config(out2)["finetuned"]["name_or_path"] == str(world["ft"].resolve())


def test_base_id_is_checked_against_the_hub(world, tmp_path):
    copy = tmp_path / "my-base"  # a local copy, anywhere on disk
    shutil.copytree(world["base"], copy)
    out = tmp_path / "delta"
    deltahub.compress(copy, world["ft"], out, **HOW, base_id=world["base_repo"], token=HUB_TOKEN, progress=False)
    base = _config(out)["base"]
    # the revision is pinned to the commit the Hub answered for "main"
    assert (base["name_or_path"], base["revision"], base["id_checked"]) == (world["base_repo"], world["base_commit"], True)
    assert "base_model_relation: adapter" in _front_matter((out / "README.md").read_text())

    # another model on the Hub is refused before any work, naming differences; nothing is written
    refused = tmp_path / "refused"
    with pytest.raises(deltahub.BaseMismatchError, match=rf"is not {world['other_repo']}@.*model\.layers\.0\.") as e:
        deltahub.compress(copy, world["ft"], refused, **HOW, base_id=world["other_repo"] + "@main", token=HUB_TOKEN, progress=False)
    assert str(copy) in str(e.value) and not refused.exists()
    with pytest.raises(BaseIdError, match="no model 'tester/no-such-model' is visible"):
        deltahub.compress(copy, world["ft"], refused, **HOW, base_id="tester/no-such-model", token=HUB_TOKEN, progress=False)
    with pytest.raises(BaseIdError, match="has no revision 'v9'"):
        deltahub.compress(copy, world["ft"], refused, **HOW, base_id=world["base_repo"] + "@v9", token=HUB_TOKEN, progress=False)
    with pytest.raises(BaseIdError, match="is not a Hub model id"):
        deltahub.compress(copy, world["ft"], refused, **HOW, base_id="../etc@x y", progress=False)
    assert not refused.exists()


def test_without_the_hub_the_base_id_is_recorded_unchecked(world, tmp_path):
    out = tmp_path / "delta"
    rev = world["base_commit"]
    with pytest.warns(BaseIdNotCheckedWarning, match="without checking it against the Hub"):
        deltahub.compress(world["base"], world["ft"], out, **HOW, base_id=f"{world['base_repo']}@{rev}", local_files_only=True, progress=False)
    base = _config(out)["base"]
    assert (base["name_or_path"], base["revision"], base["id_checked"]) == (world["base_repo"], rev, False)
    assert "not checked against the Hub" in (out / "README.md").read_text()
    # HF_HUB_OFFLINE (read by huggingface_hub at import: a fresh process) does the same
    out2 = tmp_path / "delta2"
    code = (
        "import deltahub; "
        f"deltahub.compress({str(world['base'])!r}, {str(world['ft'])!r}, {str(out2)!r}, method='dense', ratio=None, base_id={world['base_repo']!r}, progress=False)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert "HF_HUB_OFFLINE is set" in p.stderr and "pin it to a commit" in p.stderr
    base = _config(out2)["base"]
    assert (base["name_or_path"], base["revision"], base["id_checked"]) == (world["base_repo"], None, False)


def test_set_base_id_rewrites_the_config_without_recompressing(world, tmp_path):
    delta = tmp_path / "delta"
    shutil.copytree(world["local"], delta)
    shards = {p.name: (p.stat().st_ino, p.read_bytes()) for p in delta.glob("delta-*.safetensors")}
    before = _config(delta)
    assert before["base"]["name_or_path"] == str(world["base"].resolve()) and before["base"]["revision"] is None

    # another model is refused, and nothing changes
    text_before = (delta / "delta_config.json").read_bytes()
    with pytest.raises(deltahub.BaseMismatchError, match="is not tester/other-"):
        set_base_id(delta, world["other_repo"], token=HUB_TOKEN)
    assert (delta / "delta_config.json").read_bytes() == text_before

    result = set_base_id(delta, world["base_repo"] + "@main", token=HUB_TOKEN)
    after = _config(delta)
    assert (after["base"]["name_or_path"], after["base"]["revision"], after["base"]["id_checked"]) == (world["base_repo"], world["base_commit"], True)
    assert result.base.checked and str(result.base) == f"{world['base_repo']}@{world['base_commit']}"
    # nothing else changed: no recompression, same shards (same files, same bytes), same records
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in delta.glob("delta-*.safetensors")} == shards
    assert after["tensors"] == before["tensors"] and after["base"]["fingerprint"] == before["base"]["fingerprint"]
    assert {k: v for k, v in after.items() if k not in ("base", "totals")} == {k: v for k, v in before.items() if k not in ("base", "totals")}
    # stored_bytes stays honest: shards + index + the config file's own (new) size
    on_disk = sum(p.stat().st_size for p in delta.glob("delta-*.safetensors")) + (delta / "delta.safetensors.index.json").stat().st_size
    on_disk += (delta / "delta_config.json").stat().st_size
    assert after["totals"]["stored_bytes"] == on_disk == result.stored_bytes != before["totals"]["stored_bytes"]
    assert after["totals"]["ratio"] == round(on_disk / after["totals"]["dense_bytes"], 6)
    front = _front_matter((delta / "README.md").read_text())
    assert f"base_model: {world['base_repo']}" in front and "base_model_relation: adapter" in front
    assert not [p.name for p in delta.iterdir() if ".tmp-" in p.name]  # no temporary file left
    # the rewritten delta loads against the recorded Hub base, as before against the local folder
    assert deltahub.verify(delta, token=HUB_TOKEN).ok
    # and it may now be pushed
    repo = f"tester/delta-{uuid.uuid4().hex[:8]}"
    assert deltahub.push(delta, repo, token=HUB_TOKEN).tag == "v1"


def test_set_base_id_refuses_a_delta_in_the_hf_cache(world, tmp_path):
    repo = f"tester/delta-{uuid.uuid4().hex[:8]}"
    deltahub.push(world["local"], repo, token=HUB_TOKEN, allow_local_base=True)
    pulled = deltahub.pull(repo, token=HUB_TOKEN, cache_dir=tmp_path / "cache")
    before = (pulled / "delta_config.json").read_bytes()
    with pytest.raises(BaseIdError, match="lies inside the Hugging Face cache"):
        set_base_id(pulled, world["base_repo"], token=HUB_TOKEN)
    assert (pulled / "delta_config.json").read_bytes() == before


def test_push_refuses_a_local_base_with_the_fix_in_the_message(world, hub, tmp_path):
    delta = world["local"]
    repo = f"tester/delta-{uuid.uuid4().hex[:8]}"
    with pytest.raises(LocalBaseError) as e:
        deltahub.push(delta, repo, token=HUB_TOKEN)
    msg = str(e.value)
    assert f"the local folder {world['base'].resolve()}" in msg and f"deltahub set-base {delta} ORG/NAME@REVISION" in msg and "allow_local_base=True" in msg
    assert not hub.has_repo(repo)  # refused before the Hub was asked anything
    # the same through the CLI, output piped
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN}
    p = subprocess.run([sys.executable, "-m", "deltahub", "push", str(delta), repo], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "set-base" in p.stderr and not hub.has_repo(repo)
    # explicitly allowed: pushed, and the card has no base_model (nothing on the Hub to point at)
    assert deltahub.push(delta, repo, token=HUB_TOKEN, allow_local_base=True).tag == "v1"
    card = Path(hf_hub_download(repo, "README.md", token=HUB_TOKEN)).read_text()
    assert "base_model:" not in _front_matter(card) and "base_model_relation" not in card


def test_a_moved_local_base_suggests_base(world, tmp_path):
    copy = tmp_path / "base-copy"
    shutil.copytree(world["base"], copy)
    delta = tmp_path / "delta"
    deltahub.compress(copy, world["ft"], delta, **HOW, progress=False)
    moved = tmp_path / "moved"
    copy.rename(moved)
    with pytest.raises(CheckpointError, match="--base") as e:
        deltahub.apply(delta, tmp_path / "full")
    assert f"the local folder {copy}" in str(e.value) and "not on this machine" in str(e.value) and not (tmp_path / "full").exists()
    p = subprocess.run([sys.executable, "-m", "deltahub", "apply", str(delta), "-o", str(tmp_path / "full")], capture_output=True, text=True)
    assert p.returncode != 0 and "--base" in p.stderr and "is neither an existing folder" not in p.stderr
    deltahub.apply(delta, tmp_path / "full", base=moved)  # the suggested fix works
    assert (tmp_path / "full" / "config.json").is_file()


def test_offline_a_missing_revision_of_a_cached_repo_is_named(world, tmp_path):
    cache, repo = world["cache"], world["base_repo"]
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(repo, revision="v9", cache_dir=cache, local_files_only=True)
    assert f"the revision v9 of {repo} is not in the local cache" in str(e.value) and "local_files_only=True" in str(e.value)
    assert world["base_commit"][:12] in str(e.value)  # what the cache holds instead
    with pytest.raises(CheckpointError, match="tester/never-cached is not in the local cache"):
        Checkpoint.open("tester/never-cached", cache_dir=cache, local_files_only=True)
    # HF_HUB_OFFLINE in a fresh process, through the load path of a delta whose base is that repo
    code = f"from deltahub.checkpoint import Checkpoint; Checkpoint.open({repo!r}, revision={'0' * 40!r}, cache_dir={str(cache)!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0 and f"the revision {'0' * 40} of {repo} is not in the local cache" in p.stderr and "HF_HUB_OFFLINE is set" in p.stderr


def test_tokenizer_files_are_always_in_the_delta(world, tmp_path):
    base, ft = world["base"], world["ft"]
    assert (base / "tokenizer.json").read_bytes() == (ft / "tokenizer.json").read_bytes()  # equal to the base's
    delta = tmp_path / "delta"
    deltahub.compress(world["base_repo"], ft, delta, **HOW, token=HUB_TOKEN, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (delta / name).read_bytes() == (ft / name).read_bytes(), name
    want = AutoTokenizer.from_pretrained(ft)("hello delta hub")["input_ids"]
    assert AutoTokenizer.from_pretrained(delta)("hello delta hub")["input_ids"] == want == [2, 4, 5]
    # and on a delta id from the Hub (its base is a Hub id: push accepts it)
    repo = f"tester/delta-{uuid.uuid4().hex[:8]}"
    deltahub.push(delta, repo, token=HUB_TOKEN)
    assert AutoTokenizer.from_pretrained(repo, token=HUB_TOKEN)("hello delta hub")["input_ids"] == want


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "deltahub", *args], capture_output=True, text=True, env=env)


def test_the_cli_records_checks_and_pushes_a_hub_base(world, hub, tmp_path):
    """--base-id on compress, set-base on an existing delta, --allow-local-base on push, and the
    unchecked warning, through the real command line with piped output."""
    out = tmp_path / "delta"
    p = _cli("compress", str(world["base"]), str(world["ft"]), str(out), "-m", "dense", "-r", "natural", "--base-id", world["base_repo"], "--json")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["warnings"] == [] and _config(out)["base"]["id_checked"] is True
    # another model's id: refused before any work, one line, exit 1
    p = _cli("compress", str(world["base"]), str(world["ft"]), str(tmp_path / "x"), "-m", "dense", "-r", "none", "--base-id", world["other_repo"])
    assert p.returncode == 1 and p.stderr.startswith("Error:") and len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()

    local = tmp_path / "local"
    shutil.copytree(world["local"], local)
    repo = f"tester/cli-{uuid.uuid4().hex[:8]}"
    p = _cli("push", str(local), repo)
    assert p.returncode == 1 and "deltahub set-base" in p.stderr
    p = _cli("set-base", str(local), world["base_repo"], "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["base"]["name_or_path"] == world["base_repo"] and _config(local)["base"]["id_checked"] is True
    p = _cli("push", str(local), repo, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["tag"] == "v1", p.stderr

    # offline: recorded unchecked, one Warning line on stderr, and the warning in --json
    other = tmp_path / "offline"
    shutil.copytree(world["local"], other)
    p = _cli("set-base", str(other), f"{world['base_repo']}@{world['base_commit']}", "--json", env_extra={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("Warning:")] and json.loads(p.stdout)["warnings"]
    assert _config(other)["base"]["id_checked"] is False

    # a local base pushed on purpose
    p = _cli("push", str(world["local"]), f"tester/local-{uuid.uuid4().hex[:8]}", "--allow-local-base")
    assert p.returncode == 0, p.stderr


def test_eval_tensors_only_needs_the_finetune(world):
    p = _cli("eval", str(world["local"]), "--tensors-only")
    assert p.returncode == 2 and "--finetuned" in p.stderr
