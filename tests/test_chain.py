"""Versions stored against their parent (spec §4.4): chains of lossless deltas with keyframes,
loaded, applied and verified bit for bit, and refused when a parent is missing, another
version, corrupted, or the chain is malformed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltahub
from deltahub import DeltaModel, DeltaReader
from deltahub.chain import ChainError, MissingParentError, tensor_sha256
from deltahub.errors import FormatError, UnsupportedFormatVersionError

from model_pairs import build, finetune, save


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base and four checkpoints of one run (bf16), a learning rate low enough that most bf16
    values stay bit-identical between checkpoints, as in the updates of an RL run."""
    root = tmp_path_factory.mktemp("chain")
    model = build("llama")
    base = save(model, root / "base", torch.bfloat16)
    finetune(model, steps=3, lr=3e-3)  # the first checkpoint: an ordinary fine-tune
    ckpts = [save(model, root / "ckpt0", torch.bfloat16)]
    for k in range(1, 4):
        finetune(model, steps=1, lr=2e-5, seed=10 + k)
        ckpts.append(save(model, root / f"ckpt{k}", torch.bfloat16))
    return root, base, ckpts


@pytest.fixture(scope="module")
def chain(run):
    """v0 a lossless keyframe; v1..v3 each against the one before."""
    root, base, ckpts = run
    deltas = [root / "v0"]
    deltahub.compress(base, ckpts[0], deltas[0], method="lossless", ratio=None, progress=False)
    for k in range(1, 4):
        deltas.append(root / f"v{k}")
        deltahub.compress(base, ckpts[k], deltas[k], method="lossless", ratio=None, parent=deltas[k - 1], progress=False)
    return deltas


def test_every_position_of_a_chain_applies_and_loads_bit_exactly(run, chain, tmp_path):
    root, base, ckpts = run
    for k, delta in enumerate(chain):
        expected = _weights(ckpts[k])
        applied = _weights(deltahub.apply(delta, tmp_path / f"a{k}", progress=False))
        assert applied.keys() == expected.keys()
        assert all(torch.equal(applied[n], expected[n]) for n in expected), k
        loaded = DeltaModel.from_pretrained(delta).state_dict()
        assert all(torch.equal(loaded[n], expected[n]) for n in expected), k


def test_a_chain_member_names_its_parent_and_is_smaller_than_a_delta_against_the_base(run, chain, tmp_path):
    root, base, ckpts = run
    cfg = DeltaReader(chain[2]).config
    assert cfg["requires"] == ["parent"] and cfg["format_version"] == deltahub.FORMAT_VERSION
    assert cfg["parent"]["name_or_path"] == "../v1" and cfg["parent"]["depth"] == 2  # a sibling: relative, the run folder can move
    assert cfg["parent"]["weights"] == DeltaReader(chain[1]).config["finetuned"]["weights"]
    assert cfg["base"]["name_or_path"] == str(base.resolve())  # the chain's keyframe's base
    # Every record holds the digest of the tensor it decodes to.
    expected = _weights(ckpts[2])
    assert all(r["sha256"] == tensor_sha256(expected[n]) for n, r in cfg["tensors"].items())
    against_base = deltahub.compress(base, ckpts[2], tmp_path / "kf", method="lossless", ratio=None, progress=False)
    assert cfg["totals"]["stored_bytes"] < 0.75 * against_base.stored_bytes
    unchanged = sum((expected[n] == _weights(ckpts[1])[n]).sum().item() for n in expected) / sum(t.numel() for t in expected.values())
    assert unchanged > 0.3, unchanged  # the premise: many bf16 values did not move


def test_verify_decode_checks_every_tensor_of_a_chain(chain):
    report = deltahub.verify(chain[3], decode=True)
    assert report.ok and report.base_checked, report
    assert deltahub.verify(chain[3]).ok


def test_compress_against_a_parent_from_memory_equals_decoding_it(run, chain, tmp_path):
    root, base, ckpts = run
    out = tmp_path / "v2-mem"
    deltahub.compress(None, ckpts[2], out, method="lossless", ratio=None, parent=chain[1], parent_weights=_weights(ckpts[1]), progress=False)
    assert (out / "delta.safetensors.index.json").read_bytes() == (chain[2] / "delta.safetensors.index.json").read_bytes()
    wrong = _weights(ckpts[1])
    name = next(iter(wrong))
    wrong[name] = wrong[name].clone()
    wrong[name].view(-1)[0] += 1
    with pytest.raises(ChainError, match="parent_weights"):
        deltahub.compress(None, ckpts[2], tmp_path / "bad", method="lossless", ratio=None, parent=chain[1], parent_weights=wrong, progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_parent_version_is_lossless_only_and_needs_the_same_tensors(run, chain, tmp_path):
    root, base, ckpts = run
    with pytest.raises(ValueError, match="stored lossless, not 'auto'"):
        deltahub.compress(base, ckpts[1], tmp_path / "x", method="auto", parent=chain[0], progress=False)
    with pytest.raises(ValueError, match="not 'svd' \\(from a --rule\\)"):  # a rule cannot make a tensor lossy either
        deltahub.compress(base, ckpts[1], tmp_path / "x", rules=["*.mlp.*=svd:rank=4"], parent=chain[0], progress=False)
    assert not (tmp_path / "x").exists()
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    w = _weights(ckpts[1])
    w.pop("model.norm.weight")
    save_file(w, fewer / "model.safetensors")
    with pytest.raises(ChainError, match="keyframe"):
        deltahub.compress(None, fewer, tmp_path / "y", method="lossless", ratio=None, parent=chain[0], progress=False)


def test_a_run_folder_moves_as_a_whole_and_a_moved_parent_is_named_then_set(run, chain, tmp_path):
    root, base, ckpts = run
    moved = tmp_path / "moved"
    for k in (0, 1, 2):
        shutil.copytree(chain[k], moved / f"v{k}")  # siblings: parents recorded as ../v0, ../v1
    expected = _weights(ckpts[2])
    loaded = DeltaModel.from_pretrained(moved / "v2").state_dict()
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)
    # v2 alone elsewhere: its parent is named, with the command that fixes it.
    shutil.copytree(chain[2], tmp_path / "alone" / "v2")
    with pytest.raises(MissingParentError, match="not there \\(moved or deleted\\).*deltahub set-parent"):
        deltahub.apply(tmp_path / "alone" / "v2", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    from deltahub.chain import set_parent

    with pytest.raises(ChainError, match="other weights"):  # v0 is not v2's parent: nothing changes
        set_parent(tmp_path / "alone" / "v2", moved / "v0")
    new = set_parent(tmp_path / "alone" / "v2", moved / "v1")
    assert new["name_or_path"] == str((moved / "v1").resolve())  # not a sibling: absolute
    assert deltahub.verify(tmp_path / "alone" / "v2", decode=True).ok


def test_a_hub_version_never_follows_a_local_parent(chain, tmp_path):
    """A delta read from the Hub cache that names a local folder as its parent is refused: a
    repo must not make deltahub read this machine's folders."""
    snap = tmp_path / "hub" / "models--evil--repo" / "snapshots" / ("a" * 40)
    shutil.copytree(chain[2], snap)
    cfg = json.loads((snap / "delta_config.json").read_text())
    cfg["parent"]["name_or_path"] = str(chain[1].resolve())
    (snap / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MissingParentError, match="downloaded from the Hub names a local folder"):
        deltahub.apply(snap, tmp_path / "out", progress=False)


def test_another_version_in_the_parents_place_is_refused(run, chain, tmp_path):
    # v3 made against v2; put v1 where v2 was.
    work = tmp_path / "w"
    shutil.copytree(chain[3], work / "v3")
    cfg = json.loads((work / "v3" / "delta_config.json").read_text())
    cfg["parent"]["name_or_path"] = str(chain[1].resolve())
    cfg["parent"]["depth"] = 2
    (work / "v3" / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChainError, match="another version"):
        DeltaModel.from_pretrained(work / "v3")


def test_a_corrupted_parent_is_caught_by_its_digests(run, chain, tmp_path):
    """A parent whose shard was changed and resealed (checksums recomputed) still decodes to
    other bits than its records' sha256: refused as the child decodes."""
    import hashlib

    work = tmp_path / "w"
    for k in (0, 1):
        shutil.copytree(chain[k], work / f"v{k}")
    cfg = json.loads((work / "v1" / "delta_config.json").read_text())
    cfg["parent"]["name_or_path"] = str(work / "v0")
    (work / "v1" / "delta_config.json").write_text(json.dumps(cfg))
    # Flip one stored byte of v0 far from the header and reseal the index's checksum.
    shard = next((work / "v0").glob("delta-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    index = json.loads((work / "v0" / "delta.safetensors.index.json").read_text())
    index["metadata"]["sha256"][shard.name] = hashlib.sha256(bytes(data)).hexdigest()
    (work / "v0" / "delta.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ChainError, FormatError)):
        deltahub.apply(work / "v1", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c["parent"].__setitem__("depth", 65), FormatError, "parent.depth"),
    (lambda c: c["parent"].__setitem__("weights", "sha256:xyz"), FormatError, "parent.weights"),
    (lambda c: c.__setitem__("requires", []), FormatError, "requires"),
    (lambda c: c.__setitem__("requires", ["parent", "teleport"]), UnsupportedFormatVersionError, "teleport"),
    (lambda c: c.pop("parent"), FormatError, "requires 'parent'"),
    (lambda c: c["tensors"]["model.norm.weight"].__setitem__("sha256", "00" * 32), FormatError, "sha256"),
    (lambda c: c["parent"].update(name_or_path="user/run", revision="main"), FormatError, "at a commit"),
    (lambda c: c["parent"].update(name_or_path="user/re po", revision="a" * 40), FormatError, "Hub repo id"),
    (lambda c: c["parent"].update(name_or_path="~/x"), FormatError, "Hub repo id"),
    (lambda c: c["parent"].update(revision="a" * 40), FormatError, "must be null for a local parent"),
    (lambda c: c.__setitem__("requires", ["parent", "parent"]), FormatError, "twice"),
    (lambda c: c["tensors"]["model.norm.weight"].pop("kind"), FormatError, "unknown record kind"),
    (lambda c: c["tensors"]["model.norm.weight"].__setitem__("shape", [49]), ChainError, "keeps every tensor's"),
    (lambda c: c["tensors"].__setitem__("extra.weight", {"kind": "removed", "shape": [2], "dtype": "BF16"}), ChainError, "removed record"),
])
def test_malformed_chain_fields_are_refused(chain, tmp_path, edit, error, match):
    bad = tmp_path / "bad"
    shutil.copytree(chain[2], bad)
    cfg = json.loads((bad / "delta_config.json").read_text())
    cfg["parent"]["name_or_path"] = str(chain[1].resolve())
    edit(cfg)
    (bad / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_cli_compresses_against_a_parent_and_shows_it(run, chain, tmp_path):
    from cli.main import app

    root, base, ckpts = run
    runner = CliRunner()
    r = runner.invoke(app, ["compress", str(base), str(ckpts[1]), str(tmp_path / "v1"), "--parent", str(chain[0])])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v1" / "delta.safetensors.index.json").read_bytes() == (chain[1] / "delta.safetensors.index.json").read_bytes()
    r = runner.invoke(app, ["info", str(tmp_path / "v1")])
    assert r.exit_code == 0 and f"parent:  {chain[0].resolve()}" in r.output and "1 version(s) down to its keyframe" in r.output, r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "v1"), "--decode"])
    assert r.exit_code == 0 and r.output.startswith("OK: 21 tensors checked, base matches"), r.output
    r = runner.invoke(app, ["compress", str(base), str(ckpts[1]), str(tmp_path / "v1b"), "--parent", str(chain[0]), "-m", "auto"])
    assert r.exit_code == 1 and "stored lossless, not 'auto'" in r.output


def test_a_keyframe_decoded_on_another_base_fails_its_digests(run, chain, tmp_path):
    """With the base check turned off, a chain decoded on the wrong base is still refused: the
    parent's tensors do not hash to their records' digests."""
    root, base, ckpts = run
    with pytest.raises(ChainError, match="other bits than its record's sha256"):
        deltahub.apply(chain[1], tmp_path / "out", base=ckpts[3], verify_base=False, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_chain_member_is_not_served_unmerged_nor_exported_as_lora(chain, run, tmp_path):
    from deltahub import ServingError

    root, base, ckpts = run
    with pytest.raises(ServingError, match="stored against its parent"):
        DeltaModel.from_pretrained(chain[1], merge=False)
    model = DeltaModel.from_base(DeltaModel.from_pretrained(chain[0]))
    with pytest.raises(ServingError, match="served unmerged"):
        model.load_delta(chain[1], "v1")
    with pytest.raises(ServingError, match="LoRA"):
        deltahub.export_lora(chain[1], tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_overwrite_never_lands_on_any_folder_of_the_chain(run, chain, tmp_path):
    """The chain's keyframe base and every parent are inputs: --overwrite onto one is refused."""
    from deltahub import OutputError

    root, base, ckpts = run
    for target in (base, chain[0], chain[1]):
        with pytest.raises(OutputError):
            deltahub.apply(chain[2], target, overwrite=True, progress=False)
    with pytest.raises(OutputError):
        deltahub.compress(None, ckpts[3], chain[0], parent=chain[2], ratio=None, overwrite=True, progress=False)
    with pytest.raises(OutputError):
        deltahub.compress(None, ckpts[3], base, parent=chain[2], ratio=None, overwrite=True, progress=False)
    assert (base / "model.safetensors").is_file() and deltahub.verify(chain[2], decode=True).ok


def test_verify_of_a_chain_checks_the_keyframes_base_and_finds_its_parent(run, chain, tmp_path):
    root, base, ckpts = run
    report = deltahub.verify(chain[2], base=ckpts[3])  # same shapes, other weights
    assert not report.ok and "same shape but other weights" in str(report), report
    shutil.copytree(chain[2], tmp_path / "alone")
    report = deltahub.verify(tmp_path / "alone")  # without its parent it is no model: not OK
    assert not report.ok and "chain:" in str(report) and "set-parent" in str(report), report
    report = deltahub.verify(chain[2], decode=True)
    assert str(report).startswith("OK: 21 tensors checked, base matches, every tensor decoded to its recorded digest"), report


def test_with_parent_weights_the_whole_local_chain_is_still_an_input(run, chain, tmp_path):
    """compress(parent_weights=...) decodes nothing, yet no output may land on a grandparent,
    the keyframe or its base (the path DeltaCallback takes)."""
    from deltahub import OutputError

    root, base, ckpts = run
    for target in (chain[0], chain[1], base):
        with pytest.raises(OutputError):
            deltahub.compress(None, ckpts[3], target, parent=chain[2], parent_weights=_weights(ckpts[2]), ratio=None, overwrite=True, progress=False)
    assert (base / "model.safetensors").is_file() and deltahub.verify(chain[2], decode=True).ok


def test_a_version_pulled_into_a_local_dir_never_follows_a_local_parent(chain, tmp_path):
    pulled = tmp_path / "pulled"
    shutil.copytree(chain[2], pulled)
    (pulled / ".cache" / "huggingface").mkdir(parents=True)  # what snapshot_download(local_dir=...) leaves
    cfg = json.loads((pulled / "delta_config.json").read_text())
    cfg["parent"]["name_or_path"] = str(chain[1].resolve())
    (pulled / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MissingParentError, match="downloaded from the Hub"):
        deltahub.apply(pulled, tmp_path / "out", progress=False)


def test_a_parent_whose_config_is_a_fifo_is_refused_not_read(run, chain, tmp_path):
    import os

    root, base, ckpts = run
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "delta_config.json")
    with pytest.raises(FormatError, match="FIFO"):
        deltahub.compress(None, ckpts[1], tmp_path / "x", parent=fifo_dir, ratio=None, progress=False)


@pytest.mark.parametrize("name", ["user/name.", "user/-x", "datasets/foo", "user/run\n"])
def test_parent_ids_huggingface_hub_would_refuse_are_refused_first(chain, tmp_path, name):
    bad = tmp_path / "bad"
    shutil.copytree(chain[2], bad)
    cfg = json.loads((bad / "delta_config.json").read_text())
    cfg["parent"].update(name_or_path=name, revision="a" * 40)
    (bad / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="Hub repo id|control characters"):
        deltahub.apply(bad, tmp_path / "out", progress=False)
