"""``deltahub diff`` and ``deltahub.diff``: two decoded models compared tensor by tensor, the
files B shares with A, and what B costs given A; local folders, the Hub test double, the CLI.

Real tiny llama checkpoints and real deltas (``lossless``, so each delta decodes to its
fine-tune bit for bit and the expected changes are exactly the ones made to the fine-tune)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltahub
from conftest import HUB_TOKEN
from deltahub import DeltahubError, DiffError, FormatError
from model_pairs import make_pair

diff_module = importlib.import_module("deltahub.diff")  # the module; deltahub.diff is the function

ROOT = Path(__file__).resolve().parent.parent
CHANGED = "model.layers.1.self_attn."  # the tensors the second fine-tune changes
LONG_NAME = ("model.layers.0.mlp." + "experts_projection_" * 10)[:113] + ".weight"  # 120 characters


def _checkpoint(root: Path, name: str, state: dict, config_from: Path | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config_from is not None:
        shutil.copyfile(config_from / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base and fine-tune (ft1), ft2 = ft1 with layer 1's attention scaled, ft3 = ft1 with one
    tensor removed and one added; lossless deltas d1 (twice, d1b) and d2; and two plain
    checkpoints with a 120-character tensor name, one changed."""
    root = tmp_path_factory.mktemp("diff")
    base, ft1 = make_pair("llama", root)
    state = load_file(str(ft1 / "model.safetensors"))
    ft2_state = {k: ((v.float() * 1.01).to(v.dtype) if k.startswith(CHANGED) else v) for k, v in state.items()}
    ft2 = _checkpoint(root, "ft2", ft2_state, ft1)
    ft3_state = {k: v for k, v in state.items() if k != "model.layers.0.mlp.up_proj.weight"}
    ft3_state["extra.bias"] = torch.arange(8, dtype=torch.bfloat16)
    ft3 = _checkpoint(root, "ft3", ft3_state, ft1)
    d1, d1b, d2 = root / "d1", root / "d1b", root / "d2"
    for ft, out in ((ft1, d1), (ft1, d1b), (ft2, d2)):
        deltahub.compress(base, ft, out, method="lossless", ratio=None, progress=False)
    g = torch.Generator().manual_seed(3)
    long_a = {LONG_NAME: torch.randn(16, 32, generator=g).bfloat16(), "lm_head.weight": torch.randn(8, 16, generator=g).bfloat16()}
    long_b = {**long_a, LONG_NAME: (long_a[LONG_NAME].float() + 0.01).bfloat16()}
    return SimpleNamespace(
        root=root, base=base, ft1=ft1, ft2=ft2, ft3=ft3, d1=d1, d1b=d1b, d2=d2,
        long_a=_checkpoint(root, "long-a", long_a), long_b=_checkpoint(root, "long-b", long_b),
    )


def _changed_names(ft: Path) -> list[str]:
    return sorted(k for k in load_file(str(ft / "model.safetensors")) if k.startswith(CHANGED))


def _shards(delta: Path) -> list[str]:
    return sorted(p.name for p in delta.glob("delta-*.safetensors"))


# ------------------------------------------------------------------ local folders


def test_deltas_differing_in_some_layers_name_exactly_those_tensors(world):
    r = deltahub.diff(world.d1, world.d2)
    want = _changed_names(world.ft2)
    assert len(want) == 4 and sorted(r.changed) == want
    assert r.only_a == [] and r.only_b == [] and len(r.identical) == len(r.tensors) - 4
    assert (r.a.kind, r.b.kind) == ("delta", "delta")
    a, b = load_file(str(world.ft1 / "model.safetensors")), load_file(str(world.ft2 / "model.safetensors"))
    for t in r.tensors:
        if t.status == "identical":
            assert t.identical_share == 1.0 and t.rel_diff == 0.0 and t.max_abs_diff == 0.0 and t.delta_bytes == 0 and t.delta_how == "unchanged"
            continue
        x, y = a[t.name].double(), b[t.name].double()
        assert t.rel_diff == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-9)
        assert t.max_abs_diff == pytest.approx(float((y - x).abs().max()), rel=1e-12)
        same = (a[t.name].view(torch.int16) == b[t.name].view(torch.int16)).double().mean()
        assert t.identical_share == pytest.approx(float(same)) and t.identical_share < 0.5
        assert t.compared == x.numel() and t.shape_a == t.shape_b == list(x.shape) and t.dtype_a == t.dtype_b == "BF16"
        # what a chained lossless version stores for it: the encoder's own figure
        enc = deltahub.encode_tensor(t.name, a[t.name], b[t.name], method="lossless", ratio=None)
        assert t.delta_how == "lossless" and t.delta_bytes == enc.nbytes > 0
    assert r.lossless_delta_bytes == sum(t.delta_bytes for t in r.tensors if t.status == "changed")
    # the shard of layer 1 is new, every other shard is the same file
    shards = _shards(world.d2)
    new = [f.name for f in r.files if f.weights and not f.shared]
    assert len(new) == 1 and sorted(r.shared_shards + new) == shards
    changed_shard = json.loads((world.d2 / "delta.safetensors.index.json").read_text())["weight_map"][f"{want[0]}::0.data"]
    assert new == [changed_shard]
    assert {f.name: f.same_as for f in r.files}["finetuned_config.json"] == "finetuned_config.json"
    assert r.new_file_bytes == sum((world.d2 / f.name).stat().st_size for f in r.files if not f.shared)


def test_identical_deltas_have_no_changes_and_share_every_shard(world):
    r = deltahub.diff(world.d1, world.d1b)
    assert r.changed == [] and r.only_a == [] and r.only_b == [] and len(r.identical) == len(r.tensors) > 0
    assert r.lossless_delta_bytes == 0
    assert sorted(r.shared_shards) == _shards(world.d1b) and all(f.same_as == f.name for f in r.files if f.weights)
    assert "0 changed" in r.summary()[0]


def test_a_delta_against_model_checkpoints(world):
    # the lossless delta decodes to its fine-tune bit for bit
    same = deltahub.diff(world.d1, world.ft1)
    assert (same.a.kind, same.b.kind) == ("delta", "model") and same.changed == [] and same.lossless_delta_bytes == 0
    assert [f.name for f in same.files if f.weights] == ["model.safetensors"] and not same.shared_shards
    # config.json of the fine-tune is the delta's finetuned_config.json, byte for byte
    assert {f.name: f.same_as for f in same.files}["config.json"] == "finetuned_config.json"
    assert deltahub.diff(world.ft2, world.d1).changed == _changed_names(world.ft2)
    # a tensor removed and one added: only in A, only in B, priced as stored whole
    r = deltahub.diff(world.d1, world.ft3)
    assert r.only_a == ["model.layers.0.mlp.up_proj.weight"] and r.only_b == ["extra.bias"] and r.changed == []
    gone, new = (next(t for t in r.tensors if t.name == n) for n in (r.only_a[0], r.only_b[0]))
    assert (gone.delta_how, gone.delta_bytes, gone.shape_b) == ("removed", 0, None)
    added = deltahub.encode_tensor("extra.bias", None, torch.arange(8, dtype=torch.bfloat16), method="dense", ratio=None)
    assert (new.delta_how, new.delta_bytes, new.shape_b, new.dtype_b) == ("whole", added.nbytes, [8], "BF16")
    assert r.lossless_delta_bytes == added.nbytes


def test_a_dtype_change_is_a_change_with_every_value_kept(world, tmp_path):
    state = load_file(str(world.ft1 / "model.safetensors"))
    wide = _checkpoint(tmp_path, "ft1-f32", {k: v.float() for k, v in state.items()})
    r = deltahub.diff(world.ft1, wide)
    assert sorted(r.changed) == sorted(state) and r.identical == []
    for t in r.tensors:
        assert (t.dtype_a, t.dtype_b, t.identical_share, t.rel_diff, t.max_abs_diff) == ("BF16", "F32", 1.0, 0.0, 0.0)
        assert t.delta_how == "lossless"


def test_streaming_stretches_give_the_same_figures(world, monkeypatch):
    """Every figure is accumulated a stretch at a time; stretches of 7 elements change nothing."""
    whole = deltahub.diff(world.d1, world.d2)
    monkeypatch.setattr(diff_module, "_CHUNK", 7)
    small = deltahub.diff(world.d1, world.d2)
    for x, y in zip(whole.tensors, small.tensors):
        assert (x.name, x.status, x.identical_share, x.max_abs_diff, x.delta_bytes) == (y.name, y.status, y.identical_share, y.max_abs_diff, y.delta_bytes)
        assert x.rel_diff == pytest.approx(y.rel_diff, rel=1e-12, abs=0)


def test_bad_inputs_are_typed_errors(world, tmp_path):
    with pytest.raises(DiffError, match="is not a folder"):
        deltahub.diff(tmp_path / "missing", world.d1)
    with pytest.raises(DiffError, match="local folder; a revision"):
        deltahub.diff(world.d1, world.d2, revision_b="v1")
    with pytest.raises(DiffError, match="not a delta"):
        deltahub.diff(world.ft1, world.d1, base_a=world.base)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(deltahub.CheckpointError, match="no \\*.safetensors"):
        deltahub.diff(world.d1, empty)
    # a delta repo file that is a FIFO is refused, not read (reading it would block)
    fifo = tmp_path / "d1-fifo"
    shutil.copytree(world.d1, fifo)
    os.mkfifo(fifo / "tokenizer.json")
    with pytest.raises(FormatError, match="FIFO"):
        deltahub.diff(world.d1, fifo)
    # a corrupted shard fails with the reader's own typed error
    broken = tmp_path / "d2-broken"
    shutil.copytree(world.d2, broken)
    shard = broken / _shards(broken)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DeltahubError):
        deltahub.diff(world.d1, broken)


# ------------------------------------------------------------------ the Hub


def test_two_versions_of_a_hub_repo(hub, world):
    repo = f"tester/diff-{uuid.uuid4().hex[:8]}"
    v1 = deltahub.push(world.d1, repo, message="first", token=HUB_TOKEN, allow_local_base=True)
    v2 = deltahub.push(world.d2, repo, message="layer 1 changed", token=HUB_TOKEN, allow_local_base=True)
    assert (v1.tag, v2.tag) == ("v1", "v2")
    local = deltahub.diff(world.d1, world.d2)
    r = deltahub.diff(f"{repo}@v1", f"{repo}@v2", token=HUB_TOKEN)
    assert (r.a.source, r.a.revision, r.a.commit, r.a.kind) == (repo, "v1", v1.commit, "delta")
    assert (r.b.revision, r.b.commit) == ("v2", v2.commit)
    assert sorted(r.changed) == _changed_names(world.ft2) and [t.delta_bytes for t in r.tensors] == [t.delta_bytes for t in local.tensors]
    # shards compared by the LFS SHA-256 of the Hub's listing: the same as hashing the local files
    assert sorted(r.shared_shards) == sorted(local.shared_shards) and len(r.shared_shards) == len(_shards(world.d2)) - 1
    hub_files = {f.name: f for f in r.files}
    assert all(hub_files[f.name].size == f.size for f in local.files if f.weights)
    assert hub_files["README.md"].same_as is None  # each version's card lists its versions
    # the same, with the revisions as options
    again = deltahub.diff(repo, repo, revision_a="v1", revision_b=v2.commit, token=HUB_TOKEN)
    assert again.changed == r.changed and again.shared_shards == r.shared_shards and again.b.commit == v2.commit
    # a local folder against a Hub version: LFS SHA-256 against the file's, git blob ids for small files
    mixed = deltahub.diff(world.d1, f"{repo}@v2", token=HUB_TOKEN)
    assert sorted(mixed.shared_shards) == sorted(local.shared_shards)
    assert {f.name: f.same_as for f in mixed.files}["finetuned_config.json"] == "finetuned_config.json"
    # offline, from the cache: the same figures, the cached files hashed here (links into blobs/)
    cached = deltahub.diff(f"{repo}@v1", f"{repo}@v2", local_files_only=True)
    assert cached.changed == r.changed and cached.b.commit == v2.commit
    assert [(f.name, f.size, f.same_as) for f in cached.files] == [(f.name, f.size, f.same_as) for f in r.files]
    with pytest.raises(deltahub.CheckpointError, match="no revision 'v9'"):
        deltahub.diff(f"{repo}@v9", world.d1, token=HUB_TOKEN)
    with pytest.raises(DiffError, match="given twice"):
        deltahub.diff(f"{repo}@v1", world.d1, revision_a="v2", token=HUB_TOKEN)


# ------------------------------------------------------------------ the command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m deltahub ARGS`` from the repository root, stdout and stderr as pipes."""
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "deltahub", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_cli_json_piped_text_and_errors(world, tmp_path):
    p = _cli("diff", str(world.d1), str(world.d2), "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert sorted(data["changed"]) == _changed_names(world.ft2) and data["summary"]["changed"] == 4
    assert data["summary"]["shards_shared"] == len(_shards(world.d2)) - 1 and data["a"]["kind"] == "delta"
    assert data["summary"]["lossless_delta_bytes"] == sum(t["delta_bytes"] for t in data["tensors"]) > 0
    assert {"name", "status", "identical_share", "rel_diff", "max_abs_diff", "delta_bytes", "delta_how"} <= set(data["tensors"][0])

    # piped: plain, whole lines; a 120-character name on one line; only the changed tensor listed
    p = _cli("diff", str(world.long_a), str(world.long_b))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = next(line for line in lines if line.startswith("tensor "))
    assert header.split("  ")[0] == "tensor" and "lossless delta" in header
    row = next(line for line in lines if line.startswith(LONG_NAME + " "))
    assert row.split()[1] == "changed" and "lm_head.weight" not in p.stdout.split("file of B")[0]
    assert "…" not in p.stdout and "\x1b" not in p.stdout
    assert any(line.startswith("tensors: 1 changed, 1 identical") for line in lines)
    assert any(line.startswith("model.safetensors ") for line in lines)  # the files table

    # a missing path: one Error line on stderr, nothing on stdout, exit 1 (with --json too)
    for extra in ((), ("--json",)):
        p = _cli("diff", str(tmp_path / "missing"), str(world.d1), *extra)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.startswith("Error: ") and len(p.stderr.splitlines()) == 1 and str(tmp_path / "missing") in p.stderr
    assert _cli("diff", str(world.d1)).returncode == 2  # B missing: a usage error
