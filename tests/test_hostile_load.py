"""Hostile deltas and bases on the paths that consume a delta against a base: ``apply``,
``DeltaModel.from_pretrained`` (merged and unmerged) and ``Checkpoint``. Each test builds the
real attack in tmp_path from a real compressed pair; allocation attacks run in a subprocess
under RLIMIT_AS, so that a regression fails instead of eating the machine."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    """Edit the config as an attacker would: the weights digest (format 1.1, optional) that the
    edited records no longer give is dropped, so the checks after it are what is tested."""
    from deltahub.chain import recorded_weights

    cfg = json.loads((repo / "delta_config.json").read_text())
    edit(cfg)
    if isinstance(cfg.get("finetuned"), dict) and isinstance(cfg.get("tensors"), dict):
        try:
            same = cfg["finetuned"].get("weights") == recorded_weights(cfg["tensors"])
        except Exception:  # records too broken to hash: the digest goes too
            same = False
        if not same:
            cfg["finetuned"].pop("weights", None)
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


# ----------------------------------------------- the attacker review of #15's hardening


def _rewrite_record(repo: Path, name: str, record: dict, stored: dict[str, torch.Tensor]) -> Path:
    """Replace tensor ``name``'s record and stored tensors, as an attacker who rewrites the shard
    does: one shard, index and checksums resealed, total size recounted."""
    index = json.loads((repo / "delta.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        state.update(load_file(str(repo / shard)))
        (repo / shard).unlink()
    state = {k: v for k, v in state.items() if not k.startswith(name + "::")}
    state.update({f"{name}::{k}": v for k, v in stored.items()})
    shard = "delta-00001-of-00001.safetensors"
    save_file(state, str(repo / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: shard for k in state}
    index["metadata"]["sha256"] = {shard: hashlib.sha256((repo / shard).read_bytes()).hexdigest()}
    index["metadata"]["total_size"] = (repo / shard).stat().st_size
    (repo / "delta.safetensors.index.json").write_text(json.dumps(index))
    return _edit_config(repo, lambda cfg: cfg["tensors"].__setitem__(name, record))


def _zstd_frame(size: int, declared: int | None) -> bytes:
    """A zstd frame of ``size`` zero bytes as RLE blocks of 128 KiB (4 bytes each), declaring
    ``declared`` bytes of content (``None``: no content size in the header)."""
    head = b"\x28\xb5\x2f\xfd" + (b"\xc0\x58" + struct.pack("<Q", declared) if declared is not None else b"\x00\x58")
    blocks = []
    while size > 0 or not blocks:
        n = min(size, 128 << 10)
        size -= n
        blocks.append(struct.pack("<I", n << 3 | 1 << 1 | (size <= 0))[:3] + b"\x00")
    return head + b"".join(blocks)


def _decode_every_way(bad: Path, base: Path, out: Path, lora: Path, what_it_is: str, load_delta: bool = False) -> subprocess.CompletedProcess:
    """verify, apply, merged and unmerged load (and ``load_delta`` onto ``base``), export-lora of
    ``bad`` under a 4 GiB address space; one line each, and the peak RSS with ``load_delta``."""
    code = f"""
import resource, sys, warnings
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
warnings.simplefilter("ignore")
import deltahub, transformers
from deltahub import DeltaModel
from deltahub.errors import FormatError
report = deltahub.verify({str(bad)!r})
print("verify", "OK" if report.ok else "REFUSED", " ".join(report.problems))
calls = [("apply", lambda: deltahub.apply({str(bad)!r}, {str(out)!r}, progress=False)),
         ("load", lambda: DeltaModel.from_pretrained({str(bad)!r})),
         ("unmerged", lambda: DeltaModel.from_pretrained({str(bad)!r}, merge=False))]
if {load_delta!r}:
    base = transformers.LlamaForCausalLM.from_pretrained({str(base)!r})
    calls.append(("load_delta", lambda: DeltaModel.from_base(base).load_delta({str(bad)!r})))
calls.append(("export-lora", lambda: deltahub.export_lora({str(bad)!r}, {str(lora)!r}, progress=False)))
for what, call in calls:
    try:
        call()
    except FormatError as e:
        print(what, "REFUSED", e)
    else:
        sys.exit(what + " accepted {what_it_is}")
if {load_delta!r}:
    print("peak RSS MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "bomb, declared, holds",
    [("claim", 1 << 40, 0), ("real", 1 << 32, 1 << 32), ("undeclared", None, 1 << 32)],
)
def test_a_lossless_zstd_bomb_is_refused_before_it_is_decompressed(llama, tmp_path, bomb, declared, holds):
    """A lossless record whose frame declares (claim: 17 bytes asking for 1 TiB), holds (131 KB
    of RLE blocks making 4 GiB) or holds without declaring 4 GiB, for a 9 KB tensor. A one-shot
    zstd decompress allocates what the frame declares: under a 4 GiB address space that is a
    MemoryError. Every path that decodes it (apply, both loaders, load_delta, export-lora)
    refuses it with a FormatError naming the tensor and the field, and verify (no base) too."""
    base, delta = llama
    rec = json.loads((delta / "delta_config.json").read_text())["tensors"][LOWRANK]
    frame = _zstd_frame(holds, declared)
    bad = _rewrite_record(
        _copy(delta, tmp_path / "bomb"), LOWRANK,
        {"kind": "compressed", "shape": rec["shape"], "dtype": rec["dtype"], "method": "lossless",
         "components": [{"type": "lossless", "codec": "xor-byteplanes-zstd", "nbytes": len(frame)}]},
        {"0.data": torch.frombuffer(bytearray(frame), dtype=torch.uint8)},
    )
    out = tmp_path / "out"
    run = _decode_every_way(bad, base, out, tmp_path / "lora", "a zstd bomb", load_delta=True)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 7, run.stdout
    for line in lines[:6]:
        assert "REFUSED" in line and LOWRANK in line and "field 'data'" in line and "lossless" in line, line
        assert ("declares 1099511627776 bytes" if bomb == "claim" else "declares 4294967296 bytes" if bomb == "real" else "decompresses to more than 9216 bytes") in line, line
    assert int(lines[-1].split()[-1]) < 2048, lines[-1]  # nothing of the declared size was allocated
    _no_output(out)
    _no_output(tmp_path / "lora")


@pytest.mark.parametrize("bomb", ["claim", "undeclared", "long", "coding", "amplify", "float"])
def test_coded_codes_that_lie_are_refused_before_they_are_decompressed(llama, tmp_path, bomb):
    """Format 1.2's coded codes (spec §6.3) from an attacker: a 17-byte frame declaring 1 TiB, a
    frame without a content size that holds more than the packed codes, a frame longer than any
    coded plane needs (``nbytes`` over its bound), an unknown coding. Every path that decodes
    the record, and verify, refuses it with a FormatError naming the tensor and the field, under
    a 4 GiB address space."""
    base, delta = llama
    rec = json.loads((delta / "delta_config.json").read_text())["tensors"][LOWRANK]
    p, q = rec["shape"]
    r = 64 if bomb == "amplify" else 1  # amplify: a 21-byte frame standing for 64 vectors' codes (65x)
    packed = (r * p * 2 + 7) // 8  # r 2-bit vectors of length p
    frame = {"claim": _zstd_frame(0, 1 << 40), "undeclared": _zstd_frame(4 * packed, None), "long": _zstd_frame(1 << 32, None),
             "coding": _zstd_frame(packed, packed), "amplify": _zstd_frame(packed, packed), "float": _zstd_frame(packed, packed)}[bomb]
    seg = {"start": 0, "end": r, "bits": 2, "group_size": 128, "scale_dtype": "F16", "coding": "brotli" if bomb == "coding" else "zstd", "nbytes": len(frame)}
    v_seg = {"start": 0, "end": r, "dtype": "F16", **({"coding": "zstd", "nbytes": 5} if bomb == "float" else {})}
    g = -(-p // 128)
    bad = _rewrite_record(
        _copy(delta, tmp_path / "bomb"), LOWRANK,
        {"kind": "compressed", "shape": rec["shape"], "dtype": rec["dtype"], "method": "auto",
         "components": [{"type": "lowrank", "rank": r, "u": [seg], "v": [v_seg]}]},
        {"0.s": torch.ones(r), "0.u.0.codes": torch.frombuffer(bytearray(frame), dtype=torch.uint8),
         "0.u.0.scale": torch.full((r, g), 0.01, dtype=torch.float16), "0.u.0.zero": torch.ones((r, g), dtype=torch.uint8),
         "0.v.0.values": torch.full((r, q), 0.01, dtype=torch.float16)},
    )
    out = tmp_path / "out"
    run = _decode_every_way(bad, base, out, tmp_path / "lora", "lying coded codes")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 5, run.stdout
    want = {"claim": "declares 1099511627776 bytes", "undeclared": f"decompresses to more than {packed} bytes",
            "long": "u.0.nbytes", "coding": "'brotli', which this deltahub does not read", "amplify": "at most 64x its stored bytes",
            "float": "'v.0.coding': only a quantized segment"}[bomb]
    for line in lines:
        assert "REFUSED" in line and LOWRANK in line and want in line, line
        assert bomb not in ("claim", "undeclared") or "field 'u.0.codes'" in line, line
    _no_output(out)
    _no_output(tmp_path / "lora")


_EVIL_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("remote code from attacker/evil ran")
from transformers import LlamaForCausalLM
class EvilForCausalLM(LlamaForCausalLM):
    pass
'''


def _set_finetuned_config(repo: Path, replace: bool = False, **fields) -> Path:
    path = repo / "finetuned_config.json"
    cfg = {} if replace else json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))
    return repo


def test_a_finetuned_config_cannot_run_code_from_another_hub_repo(llama, hub, tmp_path):
    """A real remote-code repo on the test Hub whose module writes a marker file when imported;
    the delta's config points at it through ``auto_map``. Users pass trust_remote_code=True for
    their base: the delta must not turn that into running a stranger's code."""
    from huggingface_hub import HfApi

    from conftest import HUB_TOKEN

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "modeling_evil.py").write_text(_EVIL_MODULE.format(marker=str(marker)))
    api = HfApi(token=HUB_TOKEN)
    api.create_repo("attacker/evil")
    api.upload_folder(folder_path=str(evil), repo_id="attacker/evil")
    _, delta = llama
    auto_map = {"AutoModelForCausalLM": "attacker/evil--modeling_evil.EvilForCausalLM", "AutoConfig": "attacker/evil--modeling_evil.EvilConfig"}
    bad = _set_finetuned_config(_copy(delta, tmp_path / "auto"), architectures=["AutoModelForCausalLM"], auto_map=auto_map)
    for kwargs in ({}, {"trust_remote_code": True}):
        for merge in (True, False):
            if merge:
                with pytest.raises(FormatError, match="finetuned_config.json: field 'architectures' names 'AutoModelForCausalLM', which is not one of transformers' model classes"):
                    DeltaModel.from_pretrained(bad, merge=merge, **kwargs)
            else:  # unmerged, the base's config.json (the user's choice) picks the class
                assert type(DeltaModel.from_pretrained(bad, merge=merge, **kwargs).get_base_model()).__name__ == "LlamaForCausalLM"
            assert not marker.exists(), kwargs
    # An honest class name beside the auto_map: transformers' own class, the auto_map dropped.
    own = _set_finetuned_config(_copy(delta, tmp_path / "own"), architectures=["LlamaForCausalLM"], auto_map=auto_map, custom_pipelines={"x": {"impl": "attacker/evil--p.P"}})
    with pytest.warns(UserWarning, match="trust_remote_code is ignored"):
        model = DeltaModel.from_pretrained(own, trust_remote_code=True)
    assert type(model).__name__ == "LlamaForCausalLM" and type(model).__module__.startswith("transformers.")
    assert "auto_map" not in model.config.to_dict() and "custom_pipelines" not in model.config.to_dict()
    # A base without config.json: unmerged builds from the delta's config, untrusted there too.
    base, _ = llama
    bare = _copy(base, tmp_path / "bare-base")
    (bare / "config.json").unlink()
    with pytest.raises(FormatError, match="field 'architectures' names 'AutoModelForCausalLM'"):
        DeltaModel.from_pretrained(bad, base=bare, merge=False, trust_remote_code=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"architectures": ["pipeline"]}, "field 'architectures' names 'pipeline'"),
        ({"architectures": ["BertModel"]}, "field 'architectures' names 'BertModel', which is not one of transformers' model classes for LlamaConfig"),
        ({"architectures": ["AutoTokenizer"]}, "field 'architectures' names 'AutoTokenizer'"),
        ({"architectures": "LlamaForCausalLM"}, "architectures"),
        ({"hidden_size": "48"}, "StrictDataclassFieldValidationError: Validation error for field 'hidden_size'"),
        ({"num_attention_heads": -4}, "cannot build the model it describes \\(RuntimeError: .*negative dimension"),
        ({"model_type": "llama\u0000\u001b[2J"}, "'model_type' = 'llama\\?\\?\\[2J'"),
    ],
)
def test_hostile_finetuned_config_fields_are_format_errors(llama, tmp_path, fields, message):
    """Fields transformers chokes on, or that name no model class of the config: one-line
    FormatErrors naming finetuned_config.json, transformers' error type kept in the message."""
    _, delta = llama
    bad = _set_finetuned_config(_copy(delta, tmp_path / "cfg"), **fields)
    with pytest.raises(FormatError, match="finetuned_config.json") as e:
        DeltaModel.from_pretrained(bad)
    assert re.search(message, str(e.value)), str(e.value)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and len(str(e.value)) < 1000


def test_a_finetuned_config_describing_a_larger_model_is_refused_before_allocating(llama, tmp_path):
    """Fields that size memory no record holds: a 300M-token vocabulary (29 GB in bf16), a 3e7-wide MLP,
    and a GPT-Neo config (over a llama delta) whose max_position_embeddings makes a 60000^2
    causal mask per layer (7.2 GB). Refused on the meta device, under a 6 GiB address space,
    naming the largest parameters or buffers; another model_type than the base's is refused
    first unless verify_base=False."""
    _, delta = llama
    neo = {"model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"], "num_layers": 2, "attention_types": [[["global"], 2]],
           "max_position_embeddings": 60000, "hidden_size": 48, "num_heads": 4, "vocab_size": 256}
    cases = {
        "vocab": _set_finetuned_config(_copy(delta, tmp_path / "vocab"), vocab_size=300_000_000),
        "mlp": _set_finetuned_config(_copy(delta, tmp_path / "mlp"), intermediate_size=30_000_000),
        "neo": _set_finetuned_config(_copy(delta, tmp_path / "neo"), replace=True, **neo),
    }
    code = f"""
import resource, sys, warnings
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
warnings.simplefilter("ignore")
from deltahub import DeltaModel, export_lora
from deltahub.errors import FormatError
cases = {{k: str(v) for k, v in {cases!r}.items()}}
for what, call in (("vocab", lambda: DeltaModel.from_pretrained(cases["vocab"])),
                   ("mlp", lambda: DeltaModel.from_pretrained(cases["mlp"])),
                   ("neo", lambda: DeltaModel.from_pretrained(cases["neo"])),
                   ("neo unverified", lambda: DeltaModel.from_pretrained(cases["neo"], verify_base=False)),
                   ("neo unmerged", lambda: DeltaModel.from_pretrained(cases["neo"], merge=False)),
                   ("vocab export", lambda: export_lora(cases["vocab"], cases["vocab"] + "-lora")),
                   ("neo export", lambda: export_lora(cases["neo"], cases["neo"] + "-lora"))):
    try:
        call()
    except FormatError as e:
        print(what, "|REFUSED", e)
    else:
        print(what, "|LOADED")
print("peak RSS MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""".replace("PosixPath", "str")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    got = dict(line.split(" |", 1) for line in run.stdout.strip().splitlines() if not line.startswith("peak"))
    bound = "more than the .* deltahub accepts for the delta's weights"
    assert re.search(f"finetuned_config.json: the model it describes holds .*model.embed_tokens.weight 28800000000.*{bound}", got["vocab"]), got["vocab"]
    assert re.search(f"holds .*mlp.* 2880000000.*{bound}", got["mlp"]), got["mlp"]
    assert re.search("field 'model_type' is 'gpt_neo', but the base .* is a 'llama'.*verify_base=False", got["neo"]), got["neo"]
    assert re.search(f"transformer.h.0.attn.attention.bias 3600000000.*{bound}", got["neo unverified"]), got["neo unverified"]
    # export-lora builds the fine-tune's architecture too (on the meta device, after the same bound)
    assert re.search(f"model.embed_tokens.weight 28800000000.*{bound}", got["vocab export"]), got["vocab export"]
    assert re.search(f"transformer.h.0.attn.attention.bias 3600000000.*{bound}", got["neo export"]), got["neo export"]
    # Unmerged, the model is the base's (its config.json, trusted): the delta's config sizes nothing.
    assert got["neo unmerged"] == "LOADED", got["neo unmerged"]
    assert int(run.stdout.strip().splitlines()[-1].split()[-1]) < 2048


def _all_removed(cfg):
    for name, rec in cfg["tensors"].items():
        cfg["tensors"][name] = {"kind": "removed", "shape": rec["shape"], "dtype": rec["dtype"]}
    cfg["finetuned"].pop("fingerprint", None)


def test_a_delta_whose_records_decode_to_no_tensor_is_refused(llama, tmp_path):
    """Every record ``removed``: each base tensor "has a record", and apply wrote a checkpoint of
    no tensor. Then one record removed but the fine-tune's fingerprint kept: the map was edited."""
    _, delta = llama
    empty = _copy(delta, tmp_path / "removed")
    for shard in empty.glob("delta-*.safetensors"):
        shard.unlink()
    (empty / "delta.safetensors.index.json").write_text(json.dumps({"metadata": {"format_version": "1.0", "sha256": {}, "total_size": 0}, "weight_map": {}}))
    _edit_config(empty, _all_removed)
    (empty / "finetuned_config.json").unlink()
    with pytest.raises(FormatError, match="none decodes to a tensor"):
        deltahub.apply(empty, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match="none decodes to a tensor"):
        DeltaModel.from_pretrained(empty, verify_base=False)
    edited = _edit_config(_copy(delta, tmp_path / "edited"), lambda cfg: cfg["tensors"].__setitem__(SAME, {**{k: v for k, v in cfg["tensors"][SAME].items() if k != "sha256"}, "kind": "removed"}))
    with pytest.raises(FormatError, match="do not match finetuned.fingerprint"):
        deltahub.apply(edited, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match="do not match finetuned.fingerprint"):
        DeltaModel.from_pretrained(edited, merge=False)


@pytest.mark.parametrize("name", ["tokenizer.json", "finetuned_config.json", "chat_template.jinja"])
def test_a_repo_file_that_is_a_fifo_is_refused_not_skipped(llama, tmp_path, name):
    """A FIFO named like a repo file: reading it would block, skipping it put the base's file in
    its place. apply (through the CLI) and verify name it; nothing is written."""
    _, delta = llama
    bad = _copy(delta, tmp_path / "fifo")
    if (bad / name).exists():
        (bad / name).unlink()
    os.mkfifo(bad / name)
    env = {**os.environ, "COLUMNS": "1000"}
    done = subprocess.run([sys.executable, "-m", "deltahub", "-q", "apply", str(bad), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    assert f"{name} is a FIFO, not a regular file" in out and len(out.strip().splitlines()) == 1, out
    _no_output(tmp_path / "out")
    report = deltahub.verify(bad)
    assert not report.ok and any(f"{name} is a FIFO" in p for p in report.problems), str(report)


def test_a_fifo_generation_config_is_refused_by_the_loaders(llama, tmp_path):
    """The loaders read generation_config.json after the weights, and a serving model copies the
    repo's files when it saves: a FIFO there blocked or was skipped; now it is named."""
    _, delta = llama
    bad = _copy(delta, tmp_path / "fifo")
    (bad / "generation_config.json").unlink(missing_ok=True)
    os.mkfifo(bad / "generation_config.json")
    with pytest.raises(FormatError, match="generation_config.json is a FIFO, not a regular file"):
        DeltaModel.from_pretrained(bad)
    served = _copy(delta, tmp_path / "served")
    model = DeltaModel.from_pretrained(served, merge=False)
    (served / "generation_config.json").unlink(missing_ok=True)  # replaced after loading, before saving
    os.mkfifo(served / "generation_config.json")
    with pytest.raises(FormatError, match="generation_config.json is a FIFO, not a regular file"):
        model.save_pretrained(tmp_path / "saved")
    _no_output(tmp_path / "saved")


def test_a_flipped_byte_in_a_shard_is_refused_by_every_loader(llama, tmp_path):
    """Bytes of stored data changed, headers intact, the index's SHA-256 not resealed: before,
    apply and the loaders decoded it as another model; every path that decodes now hashes each
    shard once, when it first opens it."""
    _, delta = llama
    bad = _copy(delta, tmp_path / "flipped")
    shard = next(p for p in sorted(bad.glob("delta-*.safetensors")) if p.stat().st_size > 400)
    data = bytearray(shard.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # in the last tensor's data, past the header
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    message = f"shard {shard.name} of .* does not match its SHA-256"
    with pytest.raises(FormatError, match=message):
        deltahub.apply(bad, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
    with pytest.raises(FormatError, match=message):
        DeltaModel.from_pretrained(bad)
    with pytest.raises(FormatError, match=message):
        DeltaModel.from_pretrained(bad, merge=False)
    with pytest.raises(FormatError, match=message):
        deltahub.export_lora(bad, tmp_path / "lora", progress=False)
    assert any("does not match its SHA-256" in p for p in deltahub.verify(bad).problems)  # verify reports it, as before
