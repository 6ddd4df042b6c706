"""Bad checkpoints and deltas get clear errors and leave nothing half-written behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltahub
from deltahub import DeltaModel
from deltahub.errors import BaseMismatchError, FormatError, ShapeMismatchError, UnsupportedFormatVersionError

from model_pairs import make_pair


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base, ft = make_pair("llama", root)
    deltahub.compress(base, ft, root / "delta", ratio=1 / 2, progress=False)  # 1/4 is out of reach of the tiny pair
    return base, ft, root / "delta", root


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_pair("qwen2", tmp_path_factory.mktemp("qwen2"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_wrong_base_with_other_shapes_is_refused(llama, qwen2):
    _, _, delta, _ = llama
    with pytest.raises(BaseMismatchError, match="not the base") as e:
        DeltaModel.from_pretrained(delta, base=qwen2[0])
    assert "lm_head.weight" in str(e.value) or "shape" in str(e.value)


def test_wrong_base_with_same_shapes_other_weights_is_refused(llama):
    _, ft, delta, _ = llama
    with pytest.raises(BaseMismatchError, match="same shape but other weights"):
        DeltaModel.from_pretrained(delta, base=ft)
    with pytest.raises(BaseMismatchError):
        deltahub.apply(delta, ft.parent / "never", base=ft, progress=False)
    assert not (ft.parent / "never").exists()
    model = DeltaModel.from_pretrained(delta, base=ft, verify_base=False)  # the override works
    assert model is not None


def test_missing_and_truncated_shards(llama, tmp_path):
    _, _, delta, _ = llama
    shard = next(p.name for p in delta.iterdir() if p.name.startswith("delta-"))
    missing = _copy(delta, tmp_path / "missing")
    (missing / shard).unlink()
    with pytest.raises(FormatError, match="missing"):
        DeltaModel.from_pretrained(missing)
    report = deltahub.verify(missing)
    assert not report.ok and any("missing" in p for p in report.problems)
    truncated = _copy(delta, tmp_path / "truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        DeltaModel.from_pretrained(truncated)
    report = deltahub.verify(truncated)
    assert not report.ok and any("SHA-256" in p or "truncated" in p for p in report.problems)
    flipped = _copy(delta, tmp_path / "flipped")
    raw = bytearray((flipped / shard).read_bytes())
    raw[-3] ^= 0xFF
    (flipped / shard).write_bytes(bytes(raw))
    assert not deltahub.verify(flipped).ok


def test_newer_format_major_is_refused(llama, tmp_path):
    _, _, delta, _ = llama
    newer = _copy(delta, tmp_path / "newer")
    cfg = json.loads((newer / "delta_config.json").read_text())
    cfg["format_version"] = "2.0"
    (newer / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFormatVersionError, match=r"reads format 1\.x"):
        DeltaModel.from_pretrained(newer)
    with pytest.raises(UnsupportedFormatVersionError):
        deltahub.info(newer)


def test_pickle_checkpoint_is_refused_with_a_conversion_hint(llama, tmp_path):
    base, ft, _, _ = llama
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(ft / "config.json", pickled / "config.json")
    torch.save(load_file(str(ft / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(deltahub.CheckpointError, match="pickle") as e:
        deltahub.compress(base, pickled, tmp_path / "out", progress=False)
    assert "save_pretrained" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_architecture_mismatch_is_refused(llama, qwen2, tmp_path):
    base, _, _, _ = llama
    with pytest.raises(ShapeMismatchError, match="architecture mismatch"):
        deltahub.compress(base, qwen2[1], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_finetune_with_extra_and_missing_tensors(llama, tmp_path):
    base, ft, _, _ = llama
    odd = _copy(ft, tmp_path / "odd")
    state = load_file(str(odd / "model.safetensors"))
    state["extra.scale"] = torch.ones(3, dtype=torch.bfloat16)
    dropped = state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(odd / "model.safetensors"), metadata={"format": "pt"})
    result = deltahub.compress(base, odd, tmp_path / "delta", ratio=1 / 2, progress=False)  # 1/4 is out of reach of the tiny pair
    kinds = {t.name: t.kind for t in result.tensors}
    assert kinds["extra.scale"] == "added" and kinds["model.layers.1.mlp.down_proj.weight"] == "removed"
    applied = load_file(str(deltahub.apply(tmp_path / "delta", tmp_path / "full", progress=False) / "model.safetensors"))
    assert torch.equal(applied["extra.scale"], state["extra.scale"])
    assert "model.layers.1.mlp.down_proj.weight" not in applied and dropped.shape == (48, 96)


def test_nan_in_a_finetune_names_the_tensor_and_writes_nothing(llama, tmp_path):
    base, ft, _, _ = llama
    bad = _copy(ft, tmp_path / "nan")
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(deltahub.InvalidTensorError, match="q_proj"):
        deltahub.compress(base, bad, tmp_path / "out", ratio=1 / 2, progress=False)  # a target the tiny pair can reach
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_existing_output_is_refused_before_any_work(llama, tmp_path):
    base, ft, _, _ = llama
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        deltahub.compress(base, ft, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("offline", [False, True])
def test_an_uncached_hub_id_says_whether_downloads_are_off_or_the_hub_is_unreachable(tmp_path, offline):
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import: a fresh interpreter, with a
    # port nothing listens on and an empty cache.
    import subprocess
    import sys

    env = {"PATH": "", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = "import deltahub\ntry:\n    deltahub.Checkpoint.open('someone/some-model')\nexcept deltahub.DeltahubError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    if offline:
        assert "downloads are off (HF_HUB_OFFLINE is set)" in out
    else:
        assert "http://127.0.0.1:9 cannot be reached" in out and "downloads are off" not in out
