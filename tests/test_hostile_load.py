"""Hostile deltas and bases on the paths that consume a delta against a base: ``apply``,
``DeltaModel.from_pretrained`` (merged and unmerged) and ``Checkpoint``. Each test builds the
real attack in tmp_path from a real compressed pair; allocation attacks run in a subprocess
under RLIMIT_AS, so that a regression fails instead of eating the machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltahub
from deltahub import DeltaModel
from deltahub.checkpoint import Checkpoint, CheckpointError
from deltahub.errors import BaseMismatchError, FormatError, InvalidTensorError, ShapeMismatchError

from model_pairs import make_pair

# Tensors the attacks use: a compressed 2-D weight, and the norm kept equal to the base so that
# the delta records it as unchanged (nothing stored: dropping its record leaves a consistent repo).
LOWRANK = "model.layers.0.mlp.up_proj.weight"
SAME = "model.norm.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base, ft = make_pair("llama", root)
    state = load_file(str(ft / "model.safetensors"))
    state[SAME] = load_file(str(base / "model.safetensors"))[SAME]
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    deltahub.compress(base, ft, root / "delta", method="dqrelo", ratio=1 / 4, progress=False)
    cfg = json.loads((root / "delta" / "delta_config.json").read_text())
    assert cfg["tensors"][SAME]["kind"] == "unchanged" and cfg["tensors"][LOWRANK]["kind"] == "compressed"
    return base, root / "delta"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_config(repo: Path, edit) -> Path:
    cfg = json.loads((repo / "delta_config.json").read_text())
    edit(cfg)
    (repo / "delta_config.json").write_text(json.dumps(cfg, indent=2))
    return repo


def _reseal(repo: Path) -> None:
    """Recompute every shard's SHA-256 in the index, as an attacker who rewrites a shard does."""
    index = json.loads((repo / "delta.safetensors.index.json").read_text())
    index["metadata"]["sha256"] = {s: hashlib.sha256((repo / s).read_bytes()).hexdigest() for s in index["metadata"]["sha256"]}
    (repo / "delta.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _poke(repo: Path, key: str, value: float) -> None:
    """Overwrite the first element of a stored tensor in its shard, in place, and reseal."""
    shard = repo / json.loads((repo / "delta.safetensors.index.json").read_text())["weight_map"][key]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    entry = json.loads(raw[8 : 8 + n])[key]
    start = 8 + n + entry["data_offsets"][0]
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[entry["dtype"]]
    bits = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    raw[start : start + len(bits)] = bits
    shard.write_bytes(bytes(raw))
    _reseal(repo)


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def _grow_rows(rows: int):
    """Declare ``rows`` rows for LOWRANK; its components keep the base's rows (``rows`` field),
    so the stored tensors still match the layout and the repo is otherwise consistent."""

    def edit(cfg):
        rec = cfg["tensors"][LOWRANK]
        base_rows = rec["shape"][0]
        rec["base_shape"] = list(rec["shape"])
        rec["shape"] = [rows, *rec["shape"][1:]]
        for c in rec["components"]:
            c["rows"] = [0, base_rows]

    return edit


def test_a_billion_rows_are_refused_before_allocating(llama, tmp_path):
    _, delta = llama
    bad = _edit_config(_copy(delta, tmp_path / "rows"), _grow_rows(10**9))
    # 10^9 x 48 bf16 = 96 GB: under a 6 GiB address-space limit an attempt fails with MemoryError
    # or RuntimeError, not with deltahub's FormatError.
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import deltahub
from deltahub import DeltaModel
from deltahub.errors import FormatError
for what, call in (("apply", lambda: deltahub.apply({str(bad)!r}, {str(tmp_path / "out")!r}, progress=False)),
                   ("load", lambda: DeltaModel.from_pretrained({str(bad)!r})),
                   ("apply unverified", lambda: deltahub.apply({str(bad)!r}, {str(tmp_path / "out")!r}, progress=False, verify_base=False))):
    try:
        call()
    except FormatError as e:
        print(what, "REFUSED", e)
    else:
        sys.exit(what + " accepted a 10^9-row record")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and all("REFUSED" in line and LOWRANK in line and "1000000000" in line for line in lines), run.stdout
    _no_output(tmp_path / "out")


def test_five_million_rows_on_a_tiny_model_are_refused(llama, tmp_path):
    _, delta = llama
    bad = _edit_config(_copy(delta, tmp_path / "rows"), _grow_rows(5 * 10**6))
    with pytest.raises(FormatError, match=LOWRANK.replace(".", r"\.")):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match="rows"):
        DeltaModel.from_pretrained(bad)


def test_decoded_bytes_beyond_the_bound_are_refused(llama, tmp_path):
    """Within the row-growth bound (2x the rows + 2^16) but far more bytes than the model has."""
    _, delta = llama
    bad = _edit_config(_copy(delta, tmp_path / "rows"), _grow_rows(60_000))
    with pytest.raises(FormatError, match="decode to .* bytes, more than"):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match="decode to .* bytes, more than"):
        DeltaModel.from_pretrained(bad)


def test_a_base_with_another_second_dimension_is_a_shape_mismatch(llama, tmp_path):
    base, delta = llama
    other = _copy(base, tmp_path / "base")
    state = load_file(str(other / "model.safetensors"))
    state[LOWRANK] = torch.zeros(state[LOWRANK].shape[0], state[LOWRANK].shape[1] + 1, dtype=state[LOWRANK].dtype)
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ShapeMismatchError, match=r"up_proj.*\[96, 49\].*\[96, 48\]"):
        deltahub.apply(delta, tmp_path / "out", base=other, verify_base=False, progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(ShapeMismatchError, match=r"\[96, 49\]"):
        DeltaModel.from_pretrained(delta, base=other, verify_base=False)
    with pytest.raises(BaseMismatchError):  # with the identity check on, the base is simply not the delta's
        DeltaModel.from_pretrained(delta, base=other)


def test_an_empty_tensors_map_is_refused(llama, tmp_path):
    _, delta = llama
    empty = _copy(delta, tmp_path / "empty")
    for shard in empty.glob("delta-*.safetensors"):
        shard.unlink()
    (empty / "delta.safetensors.index.json").write_text(json.dumps({"metadata": {"format_version": "1.0", "sha256": {}, "total_size": 0}, "weight_map": {}}))

    def no_tensors(cfg):
        cfg["tensors"] = {}
        cfg["base"].pop("samples", None)

    _edit_config(empty, no_tensors)
    with pytest.raises(FormatError, match="the delta is incomplete.*model.embed_tokens.weight"):
        deltahub.apply(empty, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match="the delta is incomplete"):
        DeltaModel.from_pretrained(empty)
    with pytest.raises(FormatError, match="the delta is incomplete"):
        DeltaModel.from_pretrained(empty, verify_base=False, merge=False)


def test_a_missing_base_tensor_record_is_refused(llama, tmp_path):
    _, delta = llama
    bad = _edit_config(_copy(delta, tmp_path / "missing"), lambda cfg: cfg["tensors"].pop(SAME))
    with pytest.raises(FormatError, match=f"incomplete.*1 of the .*{SAME}"):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match=SAME):
        DeltaModel.from_pretrained(bad, verify_base=False)


def test_a_million_layers_in_the_finetuned_config_are_refused_fast(llama, tmp_path):
    _, delta = llama
    bad = _copy(delta, tmp_path / "layers")
    cfg = json.loads((bad / "finetuned_config.json").read_text())
    cfg["num_hidden_layers"] = 10**6
    (bad / "finetuned_config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    with pytest.raises(FormatError, match="finetuned_config.json: 'num_hidden_layers' is 1000000.* 2 transformer block"):
        DeltaModel.from_pretrained(bad)
    with pytest.raises(FormatError, match="num_hidden_layers"):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    assert time.perf_counter() - start < 10
    _no_output(tmp_path / "out")
    # A nested sub-config (multimodal configs keep the text model's in text_config) counts too.
    cfg["num_hidden_layers"] = 2
    cfg["text_config"] = {"num_hidden_layers": 10**6}
    (bad / "finetuned_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="'text_config.num_hidden_layers' is 1000000"):
        DeltaModel.from_pretrained(bad)


@pytest.mark.parametrize("content, field", [("[1, 2]", "not a JSON object"), ('{"hidden_size": 48}', "model_type"), ('{"model_type": "no-such-arch"}', "model_type")])
def test_a_malformed_finetuned_config_names_the_file_and_field(llama, tmp_path, content, field):
    _, delta = llama
    bad = _copy(delta, tmp_path / "cfg")
    (bad / "finetuned_config.json").write_text(content)
    with pytest.raises(FormatError, match=f"finetuned_config.json.*{field}"):
        DeltaModel.from_pretrained(bad)


def test_a_model_left_with_uninitialized_weights_is_refused(llama, tmp_path):
    """The config describes a model with weights the delta does not have (here: biases)."""
    _, delta = llama
    bad = _copy(delta, tmp_path / "bias")
    cfg = json.loads((bad / "finetuned_config.json").read_text())
    cfg["attention_bias"] = True
    (bad / "finetuned_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"random initialization: \d+ weight\(s\) have no tensor \(model.layers.0.self_attn.k_proj.bias"):
        DeltaModel.from_pretrained(bad)


def test_an_inf_scale_with_resealed_checksums_is_refused(llama, tmp_path):
    _, delta = llama
    bad = _copy(delta, tmp_path / "inf")
    _poke(bad, f"{LOWRANK}::0.scale", float("inf"))  # the sign component's scale
    assert not any("SHA-256" in problem for problem in deltahub.verify(bad).problems)  # resealed: only the values tell
    with pytest.raises(InvalidTensorError, match=f"{LOWRANK}.* NaN and .* Inf weight"):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(InvalidTensorError, match=f"{LOWRANK}.* where the base's are finite"):
        DeltaModel.from_pretrained(bad)
    with pytest.raises(InvalidTensorError, match=f"{LOWRANK}.*scale.* NaN or Inf"):
        DeltaModel.from_pretrained(bad, merge=False)


def test_a_base_with_an_inf_weight_still_loads(llama, tmp_path):
    """The finite check compares with the base: a weight the base has non-finite may stay so."""
    base, delta = llama
    odd = _copy(base, tmp_path / "base")
    state = load_file(str(odd / "model.safetensors"))
    state[LOWRANK][5, 7] = float("inf")  # row 5: not one of the rows the sample digest hashes
    save_file(state, str(odd / "model.safetensors"), metadata={"format": "pt"})
    model = DeltaModel.from_pretrained(delta, base=odd)
    w = model.state_dict()[LOWRANK]
    assert torch.isinf(w[5, 7]) and int((~torch.isfinite(w)).sum()) == 1
    out = deltahub.apply(delta, tmp_path / "out", base=odd, progress=False)
    assert int((~torch.isfinite(load_file(str(out / "model.safetensors"))[LOWRANK])).sum()) == 1


def test_a_delta_without_fingerprint_needs_verify_base_false(llama, tmp_path):
    base, delta = llama
    bare = _edit_config(_copy(delta, tmp_path / "bare"), lambda cfg: cfg.__setitem__("base", {"name_or_path": str(base)}))
    with pytest.raises(BaseMismatchError, match="no base.fingerprint.*verify_base=False"):
        deltahub.apply(bare, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(BaseMismatchError, match="no base.fingerprint"):
        DeltaModel.from_pretrained(bare)
    with pytest.raises(BaseMismatchError, match="no base.fingerprint"):
        DeltaModel.from_base(_load(base)).load_delta(bare)
    assert DeltaModel.from_pretrained(bare, verify_base=False) is not None
    assert (deltahub.apply(bare, tmp_path / "out", verify_base=False, progress=False) / "model.safetensors").is_file()


def _load(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_chat_template_linking_out_of_the_delta_is_refused(llama, tmp_path, target_exists):
    _, delta = llama
    secret = tmp_path / "outside" / "secret.jinja"
    secret.parent.mkdir()
    if target_exists:
        secret.write_text("{{ 'private' }}")
    bad = _copy(delta, tmp_path / "link")
    os.symlink(secret, bad / "chat_template.jinja")
    with pytest.raises(FormatError) as e:
        deltahub.apply(bad, tmp_path / "out", progress=False)
    assert "chat_template.jinja" in str(e.value) and "outside" in str(e.value) and str(secret) not in str(e.value)
    # The message is the same whether or not the target exists.
    assert str(e.value).replace(str(tmp_path), "TMP") == "the delta repo: chat_template.jinja is a link that leads outside the delta repo, which deltahub does not follow; the repo is corrupted or hostile"
    _no_output(tmp_path / "out")


def test_a_finetuned_config_linking_out_of_the_delta_is_refused(llama, tmp_path):
    base, delta = llama
    bad = _copy(delta, tmp_path / "link")
    (bad / "finetuned_config.json").unlink()
    os.symlink(base / "config.json", bad / "finetuned_config.json")
    with pytest.raises(FormatError, match="finetuned_config.json is a link that leads outside"):
        DeltaModel.from_pretrained(bad)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_base_index_naming_files_outside_is_refused(llama, tmp_path, entry):
    base, delta = llama
    odd = _copy(base, tmp_path / "base")
    (tmp_path / "outside.safetensors").write_bytes((odd / "model.safetensors").read_bytes())
    names = list(load_file(str(odd / "model.safetensors")))
    index = {"metadata": {}, "weight_map": {n: entry if n == LOWRANK else "model.safetensors" for n in names}}
    (odd / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file inside the checkpoint folder") as e:
        Checkpoint.open(odd)
    assert "outside.safetensors" not in str(e.value).replace(entry, "")
    with pytest.raises(CheckpointError):
        deltahub.apply(delta, tmp_path / "out", base=odd, progress=False)
    _no_output(tmp_path / "out")


def test_a_base_config_that_is_not_json_names_the_file(llama, tmp_path):
    base, delta = llama
    odd = _copy(base, tmp_path / "base")
    (odd / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"base/config.json is not valid JSON"):
        Checkpoint.open(odd).config()
    with pytest.raises(FormatError, match=r"config.json is not valid JSON"):
        DeltaModel.from_pretrained(delta, base=odd, merge=False)
