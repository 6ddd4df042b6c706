"""The Python objects behave as their PEFT and transformers counterparts do (issue #16):
save_pretrained/push_to_hub of a serving model write and push its delta (never base_layer
weights), PEFT's method names are aliases or clear errors, torch_dtype is dtype's deprecated
alias, set_delta takes a list of one, reprs are short, and compress takes an in-memory model
or state dict with the output its saved folder gives."""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from huggingface_hub import HfApi
from safetensors.torch import save_file

import deltahub
from deltahub import DeltaModel, FormatError, ServingError
from deltahub.checkpoint import Checkpoint, CheckpointError
from deltahub.memory import MemoryCheckpoint
from deltahub.serving import REFUSED, UnsupportedMethodError

from conftest import HUB_TOKEN
from model_pairs import build, finetune, load, make_pair, tokens

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A llama base, two fine-tunes of it, and their deltas (auto and dense)."""
    root = tmp_path_factory.mktemp("objects")
    base, ft = make_pair("llama", root)
    model = load(ft, "llama").float()
    finetune(model, steps=2, seed=9)
    ft2 = root / "llama-ft2"
    model.to(torch.bfloat16).save_pretrained(ft2)
    d_auto = deltahub.compress(base, ft, root / "d-auto", ratio=1 / 2, progress=False).path
    d_dense = deltahub.compress(base, ft2, root / "d-dense", method="dense", ratio=None, progress=False).path
    return base, ft, ft2, d_auto, d_dense


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal_states(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _safetensors_keys(path: Path) -> list[str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]


def _repo_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------ save_pretrained / push_to_hub


def test_save_pretrained_writes_the_loaded_delta(setup, tmp_path):
    base, _, _, d_auto, d_dense = setup
    model = DeltaModel.from_pretrained(d_auto, merge=False, delta_name="a")
    model.load_delta(d_dense, "b")
    out = model.save_pretrained(tmp_path / "saved-a")
    # The delta's own files, byte for byte, not re-encoded; no weight of the wrapped model.
    assert _repo_bytes(out) == _repo_bytes(d_auto)
    for shard in out.glob("*.safetensors"):
        assert not any("base_layer" in k for k in _safetensors_keys(shard))
    assert deltahub.verify(out, base).ok
    assert _equal_states(DeltaModel.from_pretrained(out), DeltaModel.from_pretrained(d_auto))
    # A named delta that is not the active one; PEFT's selected_adapters names one too.
    assert _repo_bytes(model.save_pretrained(tmp_path / "saved-b", delta_name="b")) == _repo_bytes(d_dense)
    assert _repo_bytes(model.save_pretrained(tmp_path / "saved-b2", selected_adapters=["b"])) == _repo_bytes(d_dense)
    with pytest.raises(ServingError, match="one delta"):
        model.save_pretrained(tmp_path / "both", selected_adapters=["a", "b"])
    with model.disable_delta(), pytest.raises(ServingError, match="delta_name=NAME"):
        model.save_pretrained(tmp_path / "none")
    assert not (tmp_path / "none").exists() and not (tmp_path / "both").exists()
    with pytest.raises(deltahub.DeltahubError, match="input|inside"):
        model.save_pretrained(d_auto, overwrite=True)  # onto its own source: refused, source intact
    assert deltahub.verify(d_auto).ok


def test_save_pretrained_refuses_files_changed_since_loading(setup, tmp_path):
    import shutil

    _, _, _, d_auto, _ = setup
    src = tmp_path / "src"
    shutil.copytree(d_auto, src)
    model = DeltaModel.from_pretrained(src, merge=False)
    shard = sorted(src.glob("delta-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"{shard.name} changed since the delta was loaded"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.copy(d_auto / shard.name, shard)
    cfg = json.loads((src / "delta_config.json").read_text())
    cfg["tensors"].popitem()
    (src / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="delta_config.json changed since the delta was loaded"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.copy(d_auto / "delta_config.json", src / "delta_config.json")
    # A bounded read: a config far above what deltahub reads is refused, not read whole.
    (src / "generation_config.json").write_bytes(b" " * ((16 << 20) + 1))
    with pytest.raises(FormatError, match="generation_config.json holds more than the 16777216 bytes"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "generation_config.json").unlink()
    # A repo file that links out of the delta's folder is not followed (nor its target named).
    (tmp_path / "secret.txt").write_text("token")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FormatError, match="tokenizer.json is a link that leads outside"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "tokenizer.json").unlink()
    # A large tokenizer (33 MB for a 262k vocabulary) is within the bound of copied files.
    (src / "tokenizer.json").write_bytes(b" " * (17 << 20))
    out = model.save_pretrained(tmp_path / "out")  # the records as loaded again: saved
    assert (out / "tokenizer.json").stat().st_size == 17 << 20


def test_push_to_hub_round_trips_through_from_pretrained(hub, setup, tmp_path):
    _, _, _, d_auto, d_dense = setup
    repo = f"tester/objects-{uuid.uuid4().hex[:8]}"
    model = DeltaModel.from_pretrained(d_auto, merge=False, delta_name="a")
    model.load_delta(d_dense, "b")
    # The test bases are local folders: pushing them needs the explicit allowance of deltahub.push.
    r1 = model.push_to_hub(repo, commit_message="auto delta", token=HUB_TOKEN, allow_local_base=True)
    assert r1.tag == "v1"
    files = HfApi().list_repo_files(repo, token=HUB_TOKEN)
    assert "delta_config.json" in files and "README.md" in files and not any("model" in f and f.endswith(".safetensors") for f in files)
    for f in files:
        if f.endswith(".safetensors"):
            local = HfApi().hf_hub_download(repo, f, token=HUB_TOKEN)
            assert not any("base_layer" in k for k in _safetensors_keys(Path(local)))
    r2 = model.push_to_hub(repo, delta_name="b", token=HUB_TOKEN, allow_local_base=True)
    assert r2.tag == "v2"
    assert [v.message for v in deltahub.history(repo, token=HUB_TOKEN).versions if v.method] == ["deltahub push v2", "auto delta"]
    assert _equal_states(DeltaModel.from_pretrained(repo, revision="v1", token=HUB_TOKEN), DeltaModel.from_pretrained(d_auto))
    assert _equal_states(DeltaModel.from_pretrained(repo, token=HUB_TOKEN), DeltaModel.from_pretrained(d_dense))
    back = DeltaModel.from_pretrained(repo, revision="v1", token=HUB_TOKEN, merge=False)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, DeltaModel.from_pretrained(d_auto, merge=False)(input_ids=x).logits)
    # Loaded from a Hub snapshot (files are links into the cache's blobs), saved again: the same
    # repo files (the card is the one push wrote).
    again = _repo_bytes(back.save_pretrained(tmp_path / "again"))
    assert {k: v for k, v in again.items() if k != "README.md"} == {k: v for k, v in _repo_bytes(d_auto).items() if k != "README.md"}


# ------------------------------------------------------------------ PEFT's names


def test_peft_names_are_aliases_or_clear_errors(setup, tmp_path):
    base, _, _, d_auto, d_dense = setup
    model = DeltaModel.from_base(load(base, "llama"))
    model.load_adapter(d_auto, adapter_name="a")
    model.load_adapter(d_dense, "b")
    assert model.active_adapter == model.active_delta == "a"
    assert model.active_adapters == ["a"] and model.active_adapters() == ["a"]  # PEFT's property, transformers' method
    model.set_adapter("b")
    assert model.active_delta == "b"
    x = tokens()
    with torch.no_grad():
        with_b = model(input_ids=x).logits
        with model.disable_adapter():
            assert model.active_adapters == [] and model.active_adapter is None
            plain = model(input_ids=x).logits
        assert model.active_delta == "b"
        assert torch.equal(model(input_ids=x).logits, with_b) and not torch.equal(plain, with_b)
    with pytest.raises(ServingError, match="is_trainable"):
        model.load_adapter(d_auto, "c", is_trainable=True)
    with pytest.raises(ServingError, match="torch_device"):
        model.load_adapter(d_auto, "c", torch_device="cpu")
    # Every refused name: a typed error that says what to use, never handed to the wrapped model.
    for name in REFUSED:
        with pytest.raises(UnsupportedMethodError, match=rf"DeltaModel\.{name} is not supported: "):
            getattr(model, name)
        assert not hasattr(model, name)  # an AttributeError too: hasattr-based checks see no such API
    with pytest.raises(UnsupportedMethodError, match="delta_names"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab")
    with pytest.raises(UnsupportedMethodError, match="merge_and_unload"):
        model.merge_adapter()
    # The ordinary transformers API is still the wrapped model's.
    assert model.config is model.base_model.config and model.device == model.base_model.device and model.can_generate()
    model.delete_adapter(["a", "b"])
    assert model.loaded_deltas == {} and model.active_delta is None
    # A PEFT adapter folder given as a delta: named as what it is.
    peft_dir = tmp_path / "lora"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(peft_dir / "adapter_model.safetensors"))
    with pytest.raises(ServingError, match="is a PEFT adapter"):
        model.load_adapter(peft_dir, "lora")


def test_set_delta_takes_a_list_of_one(setup):
    base, _, _, d_auto, d_dense = setup
    model = DeltaModel.from_pretrained(d_auto, merge=False, delta_name="a")
    model.load_delta(d_dense, "b")
    model.set_delta(["b"])
    assert model.active_delta == "b"
    model.set_adapter(["a"])
    assert model.active_delta == "a"
    with pytest.raises(ServingError, match=r"one delta is active at a time.*delta_names="):
        model.set_delta(["a", "b"])
    with pytest.raises(ServingError, match="one name"):
        model.set_delta([])
    with pytest.raises(deltahub.serving.UnknownDeltaError, match="'c'"):
        model.set_delta(["c"])
    assert model.active_delta == "a"


def test_short_reprs(setup):
    _, _, _, d_auto, d_dense = setup
    model = DeltaModel.from_pretrained(d_auto, merge=False, delta_name="a")
    loaded = model.load_delta(d_dense, "b")
    text = repr(loaded)
    assert text.startswith("LoadedDelta(name='b', method='dense', tensors=") and f"nbytes={loaded.nbytes}" in text
    assert "\n" not in text and len(text) < 200
    text = repr(model)
    assert text.startswith("DeltaModel(base=LlamaForCausalLM, deltas={'a': auto, ")
    assert "'b': dense, " in text and "active='a'" in text and "\n" not in text and len(text) < 300
    for i in range(12):
        model.load_delta(d_dense, f"n{i}")
    assert "... 6 more" in repr(model) and len(repr(model)) < 800


# ------------------------------------------------------------------ torch_dtype


@pytest.mark.parametrize("merge", [True, False])
def test_torch_dtype_is_the_deprecated_name_of_dtype(setup, merge):
    _, _, _, d_auto, _ = setup
    with pytest.warns(FutureWarning, match="`torch_dtype` is deprecated! Use `dtype` instead!"):
        model = DeltaModel.from_pretrained(d_auto, torch_dtype=torch.float16, merge=merge)
    weights = model.base_model if not merge else model
    assert {p.dtype for p in weights.parameters()} == {torch.float16}
    same = DeltaModel.from_pretrained(d_auto, dtype=torch.float16, merge=merge)
    assert _equal_states(model, same)
    with pytest.warns(FutureWarning):  # both given: dtype wins, as in transformers
        both = DeltaModel.from_pretrained(d_auto, dtype=torch.float32, torch_dtype=torch.float16, merge=merge)
    assert {p.dtype for p in (both.base_model if not merge else both).parameters()} == {torch.float32}
    default = DeltaModel.from_pretrained(d_auto, merge=merge)  # "auto": the fine-tune's bfloat16
    assert {p.dtype for p in (default.base_model if not merge else default).parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------ compress from memory


def _records_and_shards(folder: Path) -> tuple[dict, dict[str, bytes]]:
    cfg = json.loads((folder / "delta_config.json").read_text())
    return cfg["tensors"], {p.name: p.read_bytes() for p in folder.glob("delta-*.safetensors")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compress_from_memory_equals_compress_from_its_saved_folder(arch, tmp_path):
    base, ft = make_pair(arch, tmp_path)
    model = load(ft, arch)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    from_disk = deltahub.compress(base, saved, tmp_path / "from-disk", ratio=1 / 2, progress=False).path
    from_memory = deltahub.compress(base, model, tmp_path / "from-memory", ratio=1 / 2, progress=False).path
    assert _records_and_shards(from_memory) == _records_and_shards(from_disk)
    for name in ("delta.safetensors.index.json", "finetuned_config.json", "generation_config.json"):
        assert (from_memory / name).read_bytes() == (from_disk / name).read_bytes(), name
    disk_cfg, mem_cfg = (json.loads((p / "delta_config.json").read_text()) for p in (from_disk, from_memory))
    assert mem_cfg["finetuned"] == {**disk_cfg["finetuned"], "name_or_path": None}
    # stored_bytes and ratio count delta_config.json, whose recorded names differ in length
    assert mem_cfg["base"] == disk_cfg["base"] and mem_cfg["totals"]["dense_bytes"] == disk_cfg["totals"]["dense_bytes"]
    assert deltahub.verify(from_memory, base).ok
    assert _equal_states(DeltaModel.from_pretrained(from_memory), DeltaModel.from_pretrained(from_disk))
    assert not any(p.name.startswith("config") for p in from_memory.iterdir())  # the model's config only as finetuned_config.json


def test_memory_checkpoint_lists_what_save_pretrained_writes(tmp_path):
    """Names (tied duplicates left out), order (shard files, then safetensors' dtype-then-name
    order inside each) and fingerprint equal the saved folder's, for a sharded mixed-dtype save."""
    model = build("qwen2")  # tied embeddings
    model.to(torch.bfloat16)
    for layer in model.model.layers:
        layer.input_layernorm.weight.data = layer.input_layernorm.weight.data.float()  # mixed dtypes in one file
    model.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    disk = Checkpoint.open(tmp_path / "saved")
    memory = MemoryCheckpoint.from_model(model, max_shard_size="20KB")
    assert len(list((tmp_path / "saved").glob("model-*.safetensors"))) > 1
    assert memory.names() == disk.names() and "lm_head.weight" not in memory
    assert memory.fingerprint() == disk.fingerprint()
    assert all(memory.info(n) == disk.info(n) for n in disk.names())
    name = disk.names()[3]
    with memory.borrow(name) as a, disk.borrow(name) as b:
        assert torch.equal(a, b)
    assert memory.sample_digest(name) == disk.sample_digest(name)
    assert memory.config() == disk.config()


def test_compress_from_a_state_dict(tmp_path):
    base, ft = make_pair("llama", tmp_path)
    state = load(ft, "llama").state_dict()
    folder = tmp_path / "sd"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    from_disk = deltahub.compress(base, folder, tmp_path / "from-disk", ratio=1 / 2, progress=False).path
    from_memory = deltahub.compress(base, state, tmp_path / "from-memory", ratio=1 / 2, progress=False).path
    assert _records_and_shards(from_memory) == _records_and_shards(from_disk)
    assert not (from_memory / "finetuned_config.json").exists()  # a state dict has no config
    assert deltahub.verify(from_memory, base).ok


def test_in_memory_sources_that_are_not_fine_tunes_are_refused(setup, tmp_path):
    base, _, _, d_auto, _ = setup
    serving = DeltaModel.from_pretrained(d_auto, merge=False)
    with pytest.raises(CheckpointError, match="merge_and_unload"):
        deltahub.compress(base, serving, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="not a tensor"):
        deltahub.compress(base, {"w": [1, 2]}, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="meta device"):
        deltahub.compress(base, {"w": torch.empty(2, 2, device="meta")}, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="drop revision"):
        deltahub.compress(base, load(base, "llama"), tmp_path / "out", revision="v1", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_serving_model_runs_without_no_grad(setup, tmp_path):
    """Called as one calls any transformers model (autograd on, base weights requiring grad),
    the serving model answers instead of failing inside a delta operator's in-place product
    (the sign planes' ``torch.mm(..., out=...)``)."""
    base, ft, _, _, _ = setup
    signs = deltahub.compress(base, ft, tmp_path / "signs", method="bitdelta", ratio=None, progress=False).path
    model = DeltaModel.from_base(AutoModelForCausalLM.from_pretrained(base))
    model.load_adapter(signs, "b")
    model.set_adapter("b")
    assert torch.is_grad_enabled() and any(p.requires_grad for p in model.base_model.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(ids).logits
    with torch.no_grad():
        want = model(ids).logits
    assert not out.requires_grad and torch.equal(out, want)
    assert torch.equal(model(ids, delta_names=["b"]).logits, want)
