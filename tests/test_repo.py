"""DeltaWriter / DeltaReader: sharding, index, checksums, reproducible bytes, overwrite."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from conftest import model_pair, write_delta
from deltahub import DeltaReader, DeltaWriter, encode_tensor
from deltahub.format import CONFIG_NAME, FORMAT_VERSION, INDEX_NAME
from deltahub.format.records import record_layout

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def _encodings():
    """One record of each kind and several methods, small enough to shard finely."""
    out = []
    specs = [
        ("model.embed_tokens.weight", (40, 32), "dqrelo", 1 / 4, {}),
        ("model.layers.0.mlp.up_proj.weight", (48, 64), "svd", None, {"rank": 4}),
        ("model.layers.0.mlp.down_proj.weight", (64, 48), "deltacome", None, {"rank": 6}),
        ("model.layers.0.self_attn.q_proj.weight", (32, 64), "deltadq", None, {"keep": 32, "group_size": 64}),
        ("model.layers.0.self_attn.k_proj.weight", (32, 64), "dare", None, {"p": 0.75}),
        ("model.layers.0.self_attn.v_proj.weight", (32, 64), "magnitude", None, {"density": 0.1}),
        ("model.layers.0.self_attn.o_proj.weight", (32, 32), "bitdelta", None, {"per_row": True}),
        ("model.layers.0.experts.gate_up", (3, 16, 24), "svd", None, {"rank": 2}),
        ("lm_head.weight", (40, 32), "lossless", None, {}),
    ]
    bases = {}
    for i, (name, shape, method, ratio, params) in enumerate(specs):
        base, ft = model_pair(shape, torch.bfloat16, seed=i)
        out.append((encode_tensor(name, base, ft, method, ratio, **params), ft))
        bases[name] = base
    g = torch.Generator().manual_seed(99)
    norm = (torch.randn(32, generator=g) * 0.1).to(torch.bfloat16)
    norm_ft = (norm.float() + 1e-3).to(torch.bfloat16)
    out.append((encode_tensor("model.norm.weight", norm, norm_ft, "dense", None), norm_ft))
    bases["model.norm.weight"] = norm
    same = torch.ones(8, 8, dtype=torch.bfloat16)
    out.append((encode_tensor("model.rotary.inv_freq", same, same.clone()), same))
    bases["model.rotary.inv_freq"] = same
    added = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    out.append((encode_tensor("model.new_head.weight", None, added), added))
    bases["model.new_head.weight"] = None
    return out, bases


@pytest.fixture(scope="module")
def encodings():
    return _encodings()


CONFIG = {"base": {"repo_id": "org/base", "revision": "abc"}, "policy": {"method": "dqrelo", "ratio": 0.125}}


def test_round_trip_across_shards(tmp_path, encodings):
    encs, bases = encodings
    path = write_delta(tmp_path / "d", [e for e, _ in encs], CONFIG, max_shard_size=2000)
    assert path == tmp_path / "d"
    reader = DeltaReader(path)
    assert reader.names() == [e.name for e, _ in encs]
    assert reader.config["format"] == "deltahub" and reader.config["format_version"] == FORMAT_VERSION
    assert reader.config["base"] == CONFIG["base"] and reader.config["policy"] == CONFIG["policy"]
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"delta-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for enc, ft in encs:
        assert reader.record(enc.name) == enc.record
        base = bases[enc.name]
        got = reader.decode(enc.name, None if base is None else base.clone())
        want = enc.decode(None if base is None else base.clone())
        assert got.dtype == want.dtype and torch.equal(got, want), enc.name
        if enc.record["kind"] in ("unchanged", "added") or enc.record.get("method") == "lossless":
            assert torch.equal(got, ft)
        for k, t in enc.tensors.items():
            stored = reader.get(f"{enc.name}::{k}")
            assert stored.dtype == t.dtype and torch.equal(stored, t)
    decoded = dict(reader.iter_decoded({n: (b.clone() if b is not None else None) for n, b in bases.items() if b is not None}))
    assert set(decoded) == {e.name for e, _ in encs}


def test_index_lists_every_key_and_checksums_match(tmp_path, encodings):
    encs, _ = encodings
    path = write_delta(tmp_path / "d", [e for e, _ in encs], CONFIG, max_shard_size=2000)
    index = json.loads((path / INDEX_NAME).read_text())
    expected_keys = set()
    for enc, _ in encs:
        expected_keys |= set(record_layout(enc.name, enc.record))
    assert set(index["weight_map"]) == expected_keys
    shards = set(index["weight_map"].values())
    assert shards == {p.name for p in path.glob("*.safetensors")}
    meta = index["metadata"]
    assert meta["format_version"] == FORMAT_VERSION
    assert set(meta["sha256"]) == shards
    for shard, digest in meta["sha256"].items():
        assert hashlib.sha256((path / shard).read_bytes()).hexdigest() == digest
    assert meta["total_size"] == sum((path / s).stat().st_size for s in shards)
    # every key lives in the shard the index names, with the record's layout
    for enc, _ in encs:
        for key, (dt, shape) in record_layout(enc.name, enc.record).items():
            with safe_open(str(path / index["weight_map"][key]), framework="pt") as f:
                assert key in f.keys()
                t = f.get_tensor(key)
                assert tuple(t.shape) == tuple(shape)
    # shards respect the size limit unless a single tensor's record is bigger
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            names = {k.split("::")[0] for k in f.keys()}
            assert f.metadata()["deltahub_format_version"] == FORMAT_VERSION
        data = sum(t.numel() * t.element_size() for enc, _ in encs if enc.name in names for t in enc.tensors.values())
        assert data <= 2000 or len(names) == 1


def test_writing_twice_gives_identical_bytes(tmp_path):
    a_encs, _ = _encodings()
    b_encs, _ = _encodings()  # encoded again from scratch
    a = write_delta(tmp_path / "a", [e for e, _ in a_encs], CONFIG, max_shard_size=3000)
    b = write_delta(tmp_path / "b", [e for e, _ in b_encs], CONFIG, max_shard_size=3000)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_shards_follow_transformer_blocks_and_empty_delta(tmp_path, encodings):
    encs, _ = encodings
    path = write_delta(tmp_path / "one", [e for e, _ in encs], shard_by_layer=False)
    assert [p.name for p in path.glob("*.safetensors")] == ["delta-00001-of-00001.safetensors"]
    # by default a new shard starts where the transformer block changes, so no shard mixes blocks
    path = write_delta(tmp_path / "blocks", [e for e, _ in encs])
    index = json.loads((path / INDEX_NAME).read_text())
    blocks: dict[str, set[str]] = {}
    for key, shard in index["weight_map"].items():
        name = key.split("::")[0]
        blocks.setdefault(shard, set()).add(name.split(".layers.")[1].split(".")[0] if ".layers." in name else "-")
    assert all(len(b) == 1 for b in blocks.values())
    assert len(blocks) >= 3  # before, inside and after model.layers.0
    empty = write_delta(tmp_path / "empty", [])
    reader = DeltaReader(empty)
    assert reader.names() == []
    assert json.loads((empty / INDEX_NAME).read_text())["weight_map"] == {}


def test_only_unchanged_tensors_write_no_shard(tmp_path):
    same = torch.ones(4, 4)
    path = write_delta(tmp_path / "d", [encode_tensor("w", same, same.clone())])
    assert list(path.glob("*.safetensors")) == []
    assert torch.equal(DeltaReader(path).decode("w", same), same)


def test_config_file_is_readable_json(tmp_path, encodings):
    encs, _ = encodings
    path = write_delta(tmp_path / "d", [e for e, _ in encs], CONFIG)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    assert list(cfg["tensors"]) == [e.name for e, _ in encs]
    assert cfg["tensors"]["lm_head.weight"] == encs[-4][0].record


def test_overwrite(tmp_path, encodings):
    encs, bases = encodings
    out = tmp_path / "d"
    first = write_delta(out, [e for e, _ in encs[:2]], max_shard_size=500)
    n_first = len(list(first.glob("*.safetensors")))
    assert n_first >= 2
    (first / "stale.txt").write_text("from the first run")
    with pytest.raises(FileExistsError):
        DeltaWriter(out)
    assert DeltaReader(out).names() == [e.name for e, _ in encs[:2]]  # untouched
    second = write_delta(out, [encs[5][0]], overwrite=True)
    assert second == out
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, INDEX_NAME, "delta-00001-of-00001.safetensors"])
    reader = DeltaReader(out)
    name = encs[5][0].name
    assert reader.names() == [name]
    assert torch.equal(reader.decode(name, bases[name].clone()), encs[5][0].decode(bases[name].clone()))
    # nothing left beside the repo: no backup, no partial folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_empty_existing_folder_needs_no_overwrite(tmp_path, encodings):
    encs, _ = encodings
    (tmp_path / "d").mkdir()
    path = write_delta(tmp_path / "d", [encs[0][0]])
    assert DeltaReader(path).names() == [encs[0][0].name]


def test_extra_files_are_copied(tmp_path, encodings):
    encs, _ = encodings
    src = tmp_path / "tokenizer.json"
    src.write_text('{"model": "bpe"}')
    with DeltaWriter(tmp_path / "d") as w:
        w.add(encs[0][0].name, encs[0][0].record, encs[0][0].tensors)
        w.add_file("finetuned_config.json", b'{"hidden_size": 32}')
        w.add_file("tokenizer/tokenizer.json", src)
        path = w.finish({})
    assert (path / "finetuned_config.json").read_bytes() == b'{"hidden_size": 32}'
    assert (path / "tokenizer" / "tokenizer.json").read_text() == '{"model": "bpe"}'


def test_max_shard_size_strings(tmp_path, encodings):
    from deltahub.format.repo import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("2 KB") == 2000
    assert parse_size(123) == 123
    encs, _ = encodings
    path = write_delta(tmp_path / "d", [e for e, _ in encs], max_shard_size="2KB")
    small = write_delta(tmp_path / "e", [e for e, _ in encs], max_shard_size=2000)
    names = lambda p: sorted(x.name for x in p.glob("*.safetensors"))  # noqa: E731
    assert names(path) == names(small)


def _check_honest(path, encs):
    shards = list(path.glob("*.safetensors"))
    framing = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
        # 8-byte length, padding to 8, and the __metadata__ entry
        framing += 8 + 7 + len(json.dumps({"__metadata__": meta}, separators=(",", ":")))
    on_disk = sum(s.stat().st_size for s in shards)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    records = sum(len(json.dumps({n: r}, separators=(",", ":"), ensure_ascii=False).encode()) for n, r in cfg["tensors"].items())
    assert on_disk + records <= sum(e.nbytes for e in encs) + framing


@pytest.mark.parametrize("max_shard_size", [10**9, 2000])
def test_encoded_sizes_are_honest(tmp_path, encodings, max_shard_size):
    """What EncodedTensor.nbytes promises (and budgets are checked against) covers what lands on disk:
    shard data and header entries plus the JSON records, up to each shard file's fixed framing."""
    encs = [e for e, _ in encodings[0]]
    _check_honest(write_delta(tmp_path / "all", encs, max_shard_size=max_shard_size), encs)
    for i, enc in enumerate(encs):
        _check_honest(write_delta(tmp_path / f"one{i}", [enc]), [enc])


def test_a_bernoulli_mask_adds_stretch_by_stretch_exactly_as_it_decodes():
    """Sparse.add_into applies a seeded Bernoulli mask 1M elements at a time; the sum must be the
    spec's (the whole decoded component added once) over several stretches."""
    from deltahub.format import prng
    from deltahub.format.components.sparse import Sparse, encode_sparse

    p, q, seed = 1100, 1000, 12345  # 1.1M elements: two stretches
    threshold = prng.bernoulli_threshold(seed, p * q, 300_000)
    mask = prng.bernoulli_mask(seed, p, q, threshold)
    codes = torch.randint(0, 16, (int(mask.sum()),), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    comp = encode_sparse(mask, None, index="seeded", seed=seed, mask_meta={"kind": "bernoulli", "threshold": threshold}, codes=codes, bits=4, scale=1e-3, zero=8)
    acc = torch.randn(p, q, generator=torch.Generator().manual_seed(1))
    want = acc + Sparse.decode(comp.meta, comp.tensors, (p, q))
    Sparse.add_into(acc, comp.meta, comp.tensors, (p, q))
    assert torch.equal(acc, want)
