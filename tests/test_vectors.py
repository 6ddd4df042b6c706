"""The golden vectors of spec/vectors decode to their expected tensors.

These files are frozen: a change to the reader that breaks them breaks every delta already
published. ``components`` must decode bit for bit; in ``methods`` the low-rank products may
differ by one unit in the last place of the bfloat16 result (spec/FORMAT.md, "Exactness").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltahub.format import DeltaReader, fingerprint
from deltahub.format.dtypes import to_name

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
MATMUL_METHODS = {"svd", "deltacome", "dqrelo"}


def _decode_all(folder: str) -> tuple[DeltaReader, dict, dict]:
    path = VECTORS / folder
    reader = DeltaReader(path)
    base = load_file(str(path / "base.safetensors"))
    expected = load_file(str(path / "expected.safetensors"))
    return reader, base, expected


def test_components_vector_decodes_bit_for_bit() -> None:
    reader, base, expected = _decode_all("components")
    kinds = set()
    types = set()
    for name in reader.names():
        record = reader.record(name)
        kinds.add(record["kind"])
        types.update(c["type"] for c in record.get("components", []))
        got = reader.decode(name, base.get(name))
        if record["kind"] == "removed":
            assert got is None and name not in expected
            continue
        assert got.dtype == expected[name].dtype, name
        assert torch.equal(got.view(torch.uint8), expected[name].view(torch.uint8)), f"{name} differs from its golden value"
    assert kinds == {"unchanged", "dense", "compressed", "added", "removed"}
    assert types == {"sign", "lowrank", "sparse", "dense", "lossless"}


def test_methods_vector_decodes() -> None:
    reader, base, expected = _decode_all("methods")
    methods = set()
    for name in reader.names():
        record = reader.record(name)
        method = name.split(".")[0]
        methods.add(method)
        got = reader.decode(name, base[name])
        want = expected[name]
        if method in MATMUL_METHODS:
            ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
            assert bool(((got.float() - want.float()).abs() <= ulp).all()), f"{name}: more than one ulp from its golden value"
        else:
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{name} ({record['kind']}) differs from its golden value"
    assert methods == {"bitdelta", "svd", "deltacome", "dqrelo", "deltadq", "dare", "magnitude", "lossless", "dense"}


@pytest.mark.parametrize("folder", ["components", "methods"])
def test_vector_config_and_index_are_consistent(folder: str) -> None:
    path = VECTORS / folder
    reader = DeltaReader(path)
    base = load_file(str(path / "base.safetensors"))
    assert reader.config["format_version"] == "1.0"
    assert reader.config["base"]["fingerprint"] == fingerprint((n, to_name(t.dtype), tuple(t.shape)) for n, t in base.items())
    index = json.loads((path / "delta.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards == set(index["metadata"]["sha256"])
    assert index["metadata"]["total_size"] == sum((path / s).stat().st_size for s in shards)


def test_chain_vector_decodes_bit_for_bit_and_its_digests_hold() -> None:
    """Format 1.1's vector (spec §4.4): the member decodes against the keyframe's decoded weights,
    every record's sha256 is its decoded tensor's, and the weights digests link the two."""
    import hashlib

    path = VECTORS / "chain"
    reference = load_file(str(path / "base.safetensors"))
    digests = {}
    for folder in ("keyframe", "member"):
        reader = DeltaReader(path / folder)
        expected = load_file(str(path / folder / "expected.safetensors"))
        assert reader.config["format_version"] == "1.1"
        lines = []
        for name in reader.names():
            got = reader.decode(name, reference[name])
            assert torch.equal(got.view(torch.uint8), expected[name].view(torch.uint8)), f"{folder}/{name}"
            sha = hashlib.sha256(got.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            assert reader.record(name)["sha256"] == sha
            lines.append(f"{name}\t{reader.record(name)['dtype']}\t[{','.join(map(str, got.shape))}]\t{sha}\n")
        digests[folder] = "sha256:" + hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
        assert reader.config["finetuned"]["weights"] == digests[folder]
        reference = expected
    member = DeltaReader(path / "member").config
    assert member["requires"] == ["parent"] and member["parent"]["weights"] == digests["keyframe"] and member["parent"]["depth"] == 1


def test_coded_vector_decodes_bit_for_bit() -> None:
    """Format 1.2's vector (spec §6.3): lowrank segments whose codes are zstd frames, next to
    uncoded ones; the repo lists `zstd-codes` in `requires`."""
    reader, base, expected = _decode_all("coded")
    assert reader.config["format_version"] == "1.2" and reader.config["requires"] == ["zstd-codes"]
    coded = set()
    for name in reader.names():
        for comp in reader.record(name)["components"]:
            coded.update(seg["bits"] for seg in comp["u"] + comp["v"] if "coding" in seg)
        got = reader.decode(name, base[name])
        assert torch.equal(got.view(torch.uint8), expected[name].view(torch.uint8)), f"{name} differs from its golden value"
    assert coded == {2, 3}
