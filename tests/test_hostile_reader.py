"""A delta repo from the Hub is untrusted: everything checkable from the repo alone (shard
headers, the index, delta_config.json, records) is refused with a typed error naming the file,
the tensor and the field, without reading outside the repo or allocating what a file declares.

Each test builds the real attack in tmp_path. Allocation attacks run in a subprocess under
RLIMIT_AS, so a regression fails instead of eating the machine's memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import model_pair, write_delta
from deltahub import DeltaReader, DeltahubError, FormatError, encode_tensor, info, verify
from deltahub.format import CONFIG_NAME, INDEX_NAME
from deltahub.format.limits import confined_file
from deltahub.format.records import validate_record
from deltahub.format.safetensors_stream import MappedSafetensors

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# Address space for the allocation attacks: torch's import fits, 8 GB of floats does not.
LIMIT_AS = 4 << 30


@pytest.fixture
def repo(tmp_path):
    """A small real delta: low-rank, seeded sparse, sign + low-rank and dense records."""
    encs = {}
    for name, shape, method, params in [
        ("a.weight", (16, 24), "svd", {"rank": 3}),
        ("b.weight", (12, 20), "dare", {"p": 0.5}),
        ("c.weight", (8, 16), "bitdelta", {}),
        ("norm.weight", (24,), "dense", {}),
    ]:
        base, ft = model_pair(shape if len(shape) == 2 else (1, shape[0]), torch.bfloat16, seed=len(encs))
        base, ft = base.reshape(shape), ft.reshape(shape)
        encs[name] = (encode_tensor(name, base, ft, method, None, **params), base)
    path = write_delta(tmp_path / "delta", [e for e, _ in encs.values()])
    assert verify(path).ok
    return path, encs


def _config(path: Path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_NAME).read_text())


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj))


def _reseal(path: Path) -> None:
    """Recompute every shard's SHA-256 and the shards' total size in the index, as an attacker
    editing a shard would."""
    index = _index(path)
    for shard in index["metadata"]["sha256"]:
        index["metadata"]["sha256"][shard] = hashlib.sha256((path / shard).read_bytes()).hexdigest()
    index["metadata"]["total_size"] = sum((path / shard).stat().st_size for shard in index["metadata"]["sha256"])
    _write_json(path / INDEX_NAME, index)


def _shard_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _run_limited(code: str, cwd: Path, limit: int = LIMIT_AS) -> subprocess.CompletedProcess:
    """Run python ``code`` in a subprocess whose address space is capped at ``limit`` bytes."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )


# ------------------------------------------------------------------------------ the index


@pytest.mark.parametrize("entry", ["absolute", "dotdot"])
def test_index_entry_outside_the_repo_is_refused(repo, tmp_path, entry):
    path, _ = repo
    index = _index(path)
    key, shard = next(iter(index["weight_map"].items()))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / shard).write_bytes((path / shard).read_bytes())  # a valid shard, outside the repo
    index["weight_map"] = {k: (str(outside / shard) if entry == "absolute" else f"../outside/{shard}") for k in index["weight_map"]}
    _write_json(path / INDEX_NAME, index)
    with pytest.raises(FormatError) as e:
        DeltaReader(path)
    assert INDEX_NAME in str(e.value) and "not a shard name" in str(e.value)
    report = verify(path)
    assert not report.ok and INDEX_NAME in report.problems[0]


def test_index_shard_names_must_agree_on_the_count(repo):
    path, _ = repo
    index = _index(path)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "delta-00001-of-00002.safetensors"
    _write_json(path / INDEX_NAME, index)
    with pytest.raises(FormatError, match="disagree on the shard count"):
        DeltaReader(path)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda ix: ix.update(weight_map=list(ix["weight_map"])), "weight_map"),
        (lambda ix: ix.update(weight_map={k: 1 for k in ix["weight_map"]}), "not a shard name"),
        (lambda ix: ix.update(metadata=[]), "metadata"),
        (lambda ix: ix["metadata"].update(sha256={s: "XYZ" for s in ix["metadata"]["sha256"]}), "metadata.sha256"),
        (lambda ix: ix["metadata"].update(sha256=["x"]), "metadata.sha256"),
    ],
)
def test_index_structure_is_typed(repo, change, field):
    path, _ = repo
    index = _index(path)
    change(index)
    _write_json(path / INDEX_NAME, index)
    with pytest.raises(FormatError, match=field):
        DeltaReader(path)
    assert not verify(path).ok


def _link_outside(path: Path, tmp_path: Path, name: str, exists: bool) -> str:
    """Replace ``path/name`` with a link to a file outside the repo; return the reader's error."""
    target = tmp_path / f"outside-{exists}" / name
    target.parent.mkdir()
    if exists:
        target.write_bytes((path / name).read_bytes())
    (path / name).unlink()
    (path / name).symlink_to(target)
    try:
        reader = DeltaReader(path)
        for key in reader.weight_map:
            reader.get(key)
    except FormatError as e:
        return str(e)
    raise AssertionError("a link leading outside the repo was followed")


@pytest.mark.parametrize("which", ["shard", "config"])
def test_link_leading_outside_is_refused_the_same_whether_the_target_exists(repo, tmp_path, which):
    path, _ = repo
    name = CONFIG_NAME if which == "config" else next(iter(_index(path)["metadata"]["sha256"]))
    pristine = tmp_path / "pristine"
    os.system(f"cp -r '{path}' '{pristine}'")
    seen = _link_outside(path, tmp_path, name, exists=True)
    assert "leads outside the delta repo" in seen and name in seen
    os.system(f"rm -rf '{path}' && mv '{pristine}' '{path}'")
    assert _link_outside(path, tmp_path, name, exists=False) == seen
    assert not verify(path).ok


def test_a_link_inside_the_repo_is_followed(repo):
    path, encs = repo
    shard = next(iter(_index(path)["metadata"]["sha256"]))
    (path / "blob").write_bytes((path / shard).read_bytes())
    (path / shard).unlink()
    (path / shard).symlink_to(path / "blob")
    assert verify(path).ok


def test_a_snapshot_whose_blobs_is_a_link_opens_nothing_outside(repo, tmp_path):
    """A folder laid out like a Hugging Face cache snapshot (as a tarball or a git repo can carry
    it) with ``blobs`` a link to ``/``: its files are links like a real snapshot's, but ``blobs``
    is not the cache's folder, so a link through it leads outside."""
    path, _ = repo
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    for cache_repo in ("looks-like-a-cache", "models--org--name"):
        snapshot = tmp_path / cache_repo / "snapshots" / "0123"
        snapshot.parent.mkdir(parents=True)
        os.system(f"cp -r '{path}' '{snapshot}'")
        (tmp_path / cache_repo / "blobs").symlink_to("/")
        (snapshot / "tokenizer.json").symlink_to(secret)
        with pytest.raises(FormatError, match="leads outside the delta repo"):
            confined_file(snapshot, "tokenizer.json", "the delta")
    # A real cache layout (blobs a folder beside snapshots) still reads its blobs.
    real = tmp_path / "models--org--real"
    (real / "blobs").mkdir(parents=True)
    (real / "blobs" / "abc").write_text("{}")
    (real / "snapshots" / "0123").mkdir(parents=True)
    (real / "snapshots" / "0123" / "tokenizer.json").symlink_to("../../blobs/abc")
    assert confined_file(real / "snapshots" / "0123", "tokenizer.json", "the delta").read_text() == "{}"


def test_json_other_than_utf8_is_refused_before_parsing(repo):
    """UTF-16 code units can hold a 0x22 byte that a byte scan would read as a quote, hiding
    brackets from the nesting check; only UTF-8 is read."""
    path, _ = repo
    # The key "\u2200" is the bytes 00 22 in UTF-16-LE: a stray quote for a byte scan, after which
    # the 900 levels look like the inside of a string.
    text = '{"\u2200": 1, "deep": ' + '{"a":' * 900 + "1" + "}" * 900 + "}"
    (path / CONFIG_NAME).write_bytes(text.encode("utf-16-le"))
    with pytest.raises(FormatError) as e:
        DeltaReader(path)
    # Refused as text, before any parse could see the 900 levels (not later, as a config without 'format').
    assert CONFIG_NAME in str(e.value) and any(w in str(e.value) for w in ("nested", "not valid JSON", "not UTF-8"))
    (path / CONFIG_NAME).write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    with pytest.raises(FormatError, match="not UTF-8"):
        DeltaReader(path)


# ------------------------------------------------------------------------------ shard headers


def test_deeply_nested_header_is_a_format_error(repo):
    path, encs = repo
    shard = next(iter(_index(path)["metadata"]["sha256"]))
    deep = b"[" * 200_000 + b"]" * 200_000
    (path / shard).write_bytes(struct.pack("<Q", len(deep)) + deep)
    _reseal(path)
    with pytest.raises(FormatError, match="nested 200000 deep"):
        MappedSafetensors(path / shard)
    report = verify(path)
    assert not report.ok and any("nested" in p for p in report.problems)
    enc, base = encs["a.weight"]
    with pytest.raises(FormatError, match="nested"):
        DeltaReader(path).decode("a.weight", base)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}, "'dtype'"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "'shape'"),
        ({"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}, "'shape'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "'data_offsets'"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "'shape'"),
        ([1, 2], "not an object"),
    ],
)
def test_header_entries_are_typed(tmp_path, entry, message):
    (tmp_path / "x.safetensors").write_bytes(_shard_bytes({"t": entry}, bytes(8)))
    with pytest.raises(FormatError, match=message):
        MappedSafetensors(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "header,message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "after the last tensor"),
        ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
        ({"__metadata__": [], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
    ],
)
def test_tensors_tile_the_data_without_aliasing(tmp_path, header, message):
    (tmp_path / "x.safetensors").write_bytes(_shard_bytes(header, bytes(8)))
    with pytest.raises(FormatError, match=message):
        MappedSafetensors(tmp_path / "x.safetensors")


def test_a_tensor_named_twice_in_a_header_is_refused(tmp_path):
    """Python's json keeps the last of two equal keys; another library reading the same shard may
    keep the first, and would load another tensor than the one deltahub checked."""
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    header = ('{"a": %s, "a": %s}' % (entry, entry.replace("[2]", "[1]").replace("8]", "4]"))).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(FormatError, match="the key 'a' appears twice"):
        MappedSafetensors(tmp_path / "x.safetensors")


def test_a_config_with_a_key_given_twice_is_refused(repo):
    cfg = repo[0] / CONFIG_NAME
    cfg.write_text(cfg.read_text().replace("{", '{"format_version": "9.9", ', 1))
    with pytest.raises(FormatError, match="delta_config.json: the key 'format_version' appears twice"):
        DeltaReader(repo[0])


def test_what_safetensors_writes_is_read(tmp_path):
    save_file({"a": torch.ones(3), "z": torch.zeros(0), "b": torch.ones(2, 2, dtype=torch.float16)}, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = MappedSafetensors(tmp_path / "x.safetensors")
    assert sorted(f.keys()) == ["a", "b", "z"] and f.metadata == {"format": "pt"}


# ------------------------------------------------------------------------------ delta_config.json


@pytest.mark.parametrize(
    "field,value",
    [("base", "x"), ("method", None), ("totals", 3), ("finetuned", []), ("rules", {}), ("seed", -1), ("seed", True)],
)
def test_provenance_fields_are_typed(repo, field, value):
    path, _ = repo
    cfg = _config(path)
    cfg[field] = value
    _write_json(path / CONFIG_NAME, cfg)
    for read in (DeltaReader, info):
        with pytest.raises(FormatError) as e:
            read(path)
        assert CONFIG_NAME in str(e.value) and field in str(e.value)
    assert not verify(path).ok


def test_config_needs_only_format_version_and_tensors(repo):
    path, _ = repo
    cfg = _config(path)
    _write_json(path / CONFIG_NAME, {k: cfg[k] for k in ("format", "format_version", "tensors")})
    assert verify(path).ok and len(info(path).tensors) == 4


def test_deeply_nested_config_is_a_format_error(repo):
    path, _ = repo
    (path / CONFIG_NAME).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(FormatError, match="nested"):
        DeltaReader(path)
    with pytest.raises(FormatError, match="nested"):
        info(path)


def test_empty_tensors_map_fails_verify(repo):
    path, _ = repo
    cfg = _config(path)
    cfg["tensors"] = {}
    _write_json(path / CONFIG_NAME, cfg)
    index = _index(path)
    index["weight_map"] = {}
    _write_json(path / INDEX_NAME, index)
    report = verify(path)
    assert not report.ok and "lists no tensor" in str(report)


def test_only_removed_records_fail_verify(repo):
    path, _ = repo
    cfg = _config(path)
    cfg["tensors"] = {"gone.weight": {"kind": "removed", "shape": [2], "dtype": "BF16"}}
    _write_json(path / CONFIG_NAME, cfg)
    _write_json(path / INDEX_NAME, {**_index(path), "weight_map": {}})
    assert not verify(path).ok


# ------------------------------------------------------------------------------ records


def _record(path: Path, name: str) -> dict:
    return _config(path)["tensors"][name]


@pytest.mark.parametrize(
    "name,edit,field",
    [
        ("a.weight", lambda r: r.update(shape=[16.0, 24]), "'shape'"),
        ("a.weight", lambda r: r.update(shape=[True, 24]), "'shape'"),
        ("a.weight", lambda r: r.update(shape=[1] * 9), "'shape'"),
        ("a.weight", lambda r: r.update(shape=[10**9, 10**9]), "elements"),
        ("a.weight", lambda r: r.update(dtype=["BF16"]), "'dtype'"),
        ("a.weight", lambda r: r.update(kind={"a": 1}), "kind"),
        ("a.weight", lambda r: r.update(components={"0": 1}), "'components'"),
        ("a.weight", lambda r: r.update(components=[1]), "component 0"),
        ("a.weight", lambda r: r.update(method=3), "'method'"),
        ("a.weight", lambda r: r["components"][0].update(type=["lowrank"]), "unknown component type"),
        ("a.weight", lambda r: r["components"][0].update(rank=3.0), "'rank'"),
        ("a.weight", lambda r: r["components"][0].update(rank=True), "'rank'"),
        ("a.weight", lambda r: r["components"][0]["u"][0].update(start=0.0), "start"),
        ("a.weight", lambda r: r["components"][0].update(u=[7]), "segment u.0"),
        ("a.weight", lambda r: r["components"][0].update(rows=5), "'rows'"),
        ("a.weight", lambda r: r["components"][0].update(rows=[0.0, 3]), "'rows'"),
        ("a.weight", lambda r: r["components"][0].update(view=[True, 384]), "'view'"),
        ("b.weight", lambda r: r["components"][0].update(nnz=1.5), "'nnz'"),
        ("b.weight", lambda r: r["components"][0].update(nnz=10**12), "'nnz'"),
        ("b.weight", lambda r: r["components"][0].update(mask=[]), "mask"),
        ("b.weight", lambda r: r["components"][0].update(values={"bits": [4]}), "values.bits"),
        ("b.weight", lambda r: r["components"][0].update(values=3), "'values'"),
        ("c.weight", lambda r: r["components"][0].update(scale={"x": 1}), "sign scale"),
        ("norm.weight", lambda r: r["components"][0].update(dtype={"x": 1}), "dense dtype"),
    ],
)
def test_malformed_record_names_file_tensor_and_field(repo, name, edit, field):
    path, encs = repo
    record = _record(path, name)
    edit(record)
    with pytest.raises(FormatError) as e:
        validate_record(name, record)
    msg = str(e.value)
    assert CONFIG_NAME in msg and repr(name) in msg and field in msg, msg
    cfg = _config(path)
    cfg["tensors"][name] = record
    _write_json(path / CONFIG_NAME, cfg)
    assert not verify(path).ok
    with pytest.raises(FormatError):
        info(path)
    with pytest.raises(FormatError):
        DeltaReader(path).decode(name, encs[name][1])


def test_quantized_segment_group_size_is_typed(repo):
    path, _ = repo
    record = {"kind": "compressed", "shape": [4, 6], "dtype": "F32", "components": [
        {"type": "lowrank", "rank": 1, "u": [{"start": 0, "end": 1, "bits": 4, "group_size": 2.5}], "v": [{"start": 0, "end": 1, "dtype": "F32"}]}]}
    with pytest.raises(FormatError, match="group_size"):
        validate_record("w", record)


def test_huge_record_verifies_without_allocating_it(repo):
    """A few KB of config declaring 10^9 rows x 24 (96 GB of float32) under a 4 GiB address space."""
    path, _ = repo
    cfg = _config(path)
    cfg["tensors"]["huge.weight"] = {"kind": "compressed", "shape": [10**9, 24], "dtype": "BF16", "components": [
        {"type": "sparse", "index": "seeded", "seed": "00000000000000ff", "mask": {"kind": "group", "group_size": 8, "keep": 0}, "nnz": 0, "values": {"dtype": "F16"}}]}
    _write_json(path / CONFIG_NAME, cfg)
    # The stored field is an empty F16 tensor: add it to a shard of its own.
    save_file({"huge.weight::0.values": torch.zeros(0, dtype=torch.float16)}, path / "delta-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = _index(path)
    (path / "delta-00001-of-00002.safetensors").write_bytes((path / "delta-00001-of-00001.safetensors").read_bytes())
    (path / "delta-00001-of-00001.safetensors").unlink()
    index["weight_map"] = {k: "delta-00001-of-00002.safetensors" for k in index["weight_map"]}
    index["weight_map"]["huge.weight::0.values"] = "delta-00002-of-00002.safetensors"
    index["metadata"]["sha256"] = {"delta-00001-of-00002.safetensors": "0" * 64, "delta-00002-of-00002.safetensors": "0" * 64}
    _write_json(path / INDEX_NAME, index)
    _reseal(path)
    done = _run_limited(f"import deltahub; r = deltahub.verify({str(path)!r}); print(r.ok, r.checked_tensors)", path.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "5"]


def test_group_size_2_31_does_not_allocate_by_group_size(repo):
    """A quantized low-rank segment claiming groups of 2^31 decodes as one group over the vector:
    the same bits as the writer's group size, under a 4 GiB address space."""
    path, _ = repo
    name = "q.weight"
    base, ft = model_pair((16, 24), torch.bfloat16, seed=7)
    enc = encode_tensor(name, base, ft, "deltacome", None, rank=4)
    want = enc.decode(base.clone())
    path = write_delta(path.parent / "q", [enc])
    cfg = _config(path)
    for comp in cfg["tensors"][name]["components"]:
        for seg in comp.get("u", []) + comp.get("v", []):
            if "bits" in seg:
                assert seg["group_size"] >= 24  # one group per vector already
                seg["group_size"] = 1 << 31
    _write_json(path / CONFIG_NAME, cfg)
    torch.save({"base": base, "want": want}, path.parent / "q.pt")
    code = f"""
        import torch, deltahub
        from deltahub import DeltaReader
        d = torch.load({str(path.parent / "q.pt")!r})
        r = deltahub.verify({str(path)!r})
        assert r.ok, r
        assert torch.equal(DeltaReader({str(path)!r}).decode({name!r}, d["base"]), d["want"])
        print("same bits")
    """
    done = _run_limited(code, path.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "same bits"


def test_infinite_scale_with_resealed_checksums_is_reported(repo):
    path, _ = repo
    key = "c.weight::0.scale"
    reader = DeltaReader(path)
    shard = reader.weight_map[key]
    f = MappedSafetensors(path / shard)
    _, _, start, nbytes = f._entries[key]
    del f, reader
    data = bytearray((path / shard).read_bytes())
    data[start : start + 4] = struct.pack("<f", float("inf"))
    (path / shard).write_bytes(bytes(data))
    _reseal(path)
    report = verify(path)
    assert not report.ok
    assert any("c.weight" in p and "component 0 (sign)" in p and "NaN or Inf" in p for p in report.problems), report


def test_edited_tensors_map_fails_the_fingerprint(tmp_path):
    """compress records finetuned.fingerprint; dropping a record from the config is caught."""
    import deltahub

    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    base_dir.mkdir(), ft_dir.mkdir()
    tensors = {}
    for i, shape in enumerate([(16, 24), (24,)]):
        b, f = model_pair(shape if len(shape) == 2 else (1, shape[0]), torch.bfloat16, seed=i)
        tensors[f"w{i}"] = (b.reshape(shape), f.reshape(shape))
    save_file({k: b for k, (b, _) in tensors.items()}, base_dir / "model.safetensors")
    save_file({k: f for k, (_, f) in tensors.items()}, ft_dir / "model.safetensors")
    out = tmp_path / "delta"
    deltahub.compress(base_dir, ft_dir, out, method="dense")
    assert _config(out)["finetuned"]["fingerprint"].startswith("sha256:")
    assert verify(out).ok
    assert verify(out, base=base_dir).ok
    cfg = _config(out)
    del cfg["tensors"]["w1"]
    _write_json(out / CONFIG_NAME, cfg)
    index = _index(out)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("w1::")}
    _write_json(out / INDEX_NAME, index)
    report = verify(out)
    assert not report.ok and "finetuned.fingerprint" in str(report)
    # Without the fingerprint, the weights digest (format 1.1) still catches it.
    del cfg["finetuned"]["fingerprint"]
    _write_json(out / CONFIG_NAME, cfg)
    report = verify(out)
    assert not report.ok and "finetuned.weights" in str(report)
    # Without either, the base still shows the missing record.
    del cfg["finetuned"]["weights"]
    _write_json(out / CONFIG_NAME, cfg)
    assert verify(out).ok
    report = verify(out, base=base_dir)
    assert not report.ok and "'w1'" in str(report) and "no record" in str(report)


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("attack", ["weight_map_list", "deep_header", "base_string"])
def test_cli_verify_on_a_hostile_repo_prints_one_line(repo, attack):
    path, _ = repo
    if attack == "weight_map_list":
        index = _index(path)
        index["weight_map"] = list(index["weight_map"])
        _write_json(path / INDEX_NAME, index)
    elif attack == "deep_header":
        shard = next(iter(_index(path)["metadata"]["sha256"]))
        deep = b"{\"a\":" * 100_000 + b"1" + b"}" * 100_000
        deep += b" " * (-len(deep) % 8)
        (path / shard).write_bytes(struct.pack("<Q", len(deep)) + deep)
        _reseal(path)
    else:
        cfg = _config(path)
        cfg["base"] = "x"
        _write_json(path / CONFIG_NAME, cfg)
    # info reads delta_config.json only: it sees the config attack alone.
    for command in ("verify", "info") if attack == "base_string" else ("verify",):
        env = {**os.environ, "COLUMNS": "1000"}  # rich wraps long lines at the terminal's width
        done = subprocess.run([sys.executable, "-m", "deltahub", command, str(path)], capture_output=True, text=True, timeout=120, env=env)
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert "Traceback" not in out and "RecursionError" not in out
        lines = [line for line in out.splitlines() if line.strip()]
        if command == "verify":  # its report: a head line, then one line per problem
            assert lines[0].startswith("FAILED") and all(line.startswith("- ") for line in lines[1:]), out
        else:  # one error line
            assert len(lines) == 1, out
        assert (INDEX_NAME if attack == "weight_map_list" else "nested" if attack == "deep_header" else "'base'") in out


# ------------------------------------------------------------ cheap checks before hashing


def test_a_shard_extended_to_100_gb_fails_verify_without_hashing_it(repo):
    """A sparse 100 GB shard (its tensors no longer tile the file): verify answers from the header
    at once instead of hashing 100 GB for minutes (the subprocess's timeout fails a regression)."""
    path, _ = repo
    shard = next(iter(_index(path)["metadata"]["sha256"]))
    os.truncate(path / shard, 100 << 30)
    done = subprocess.run(
        [sys.executable, "-c", f"import deltahub; r = deltahub.verify({str(path)!r}); print(r.ok); print(r)"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("False") and shard in done.stdout and "SHA-256" not in done.stdout, done.stdout
    # The header's tiling check refuses it before the file is mapped (the kernel may refuse to map 100 GB).
    assert "bytes after the last tensor's data" in done.stdout and "Cannot allocate memory" not in done.stdout, done.stdout


def test_shards_must_add_up_to_the_index_total_size(repo):
    path, _ = repo
    index = _index(path)
    index["metadata"]["total_size"] += 1
    _write_json(path / INDEX_NAME, index)
    report = verify(path)
    assert not report.ok and "metadata.total_size" in str(report), str(report)


def test_a_folder_named_like_a_repo_file_fails_verify(repo):
    path, _ = repo
    (path / "tokenizer_config.json").mkdir()
    report = verify(path)
    assert not report.ok and "tokenizer_config.json is a folder, not a regular file" in str(report), str(report)
