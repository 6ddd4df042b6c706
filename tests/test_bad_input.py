"""Bad input is refused with deltahub's typed errors, naming the tensor or file and saying what to do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import model_pair, write_delta
from deltahub import (
    DeltaReader,
    DeltahubError,
    DeltaWriter,
    FormatError,
    InfeasibleRatioError,
    InvalidTensorError,
    ShapeMismatchError,
    UnknownComponentError,
    UnknownMethodError,
    UnsupportedFormatVersionError,
    encode_tensor,
    get_method,
    list_methods,
)
from deltahub.format import CONFIG_NAME, INDEX_NAME

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

METHODS = ["auto", "svd", "dqrelo", "bitdelta", "deltacome", "deltadq", "dare", "magnitude", "lossless", "dense"]


# ------------------------------------------------------------------------------ tensors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["base", "finetuned"])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_weights_are_refused(method, where, bad):
    base, ft = model_pair((16, 24), torch.bfloat16)
    target = base if where == "base" else ft
    target[3, 5] = bad
    with pytest.raises(InvalidTensorError) as info:
        encode_tensor("model.layers.3.mlp.up_proj.weight", base, ft, method, None if method in ("lossless", "dense") else 1 / 4)
    msg = str(info.value)
    assert "model.layers.3.mlp.up_proj.weight" in msg
    assert ("base" if where == "base" else "fine-tuned") in msg
    assert isinstance(info.value, DeltahubError) and isinstance(info.value, ValueError)


def test_non_finite_added_and_one_dimensional_tensors_are_refused():
    ft = torch.ones(4)
    ft[1] = float("nan")
    with pytest.raises(InvalidTensorError, match="'new.bias'"):
        encode_tensor("new.bias", None, ft)
    with pytest.raises(InvalidTensorError, match="'norm.weight'"):
        encode_tensor("norm.weight", torch.ones(4), ft, "dense", None)


def test_delta_overflowing_float32_is_refused():
    base = torch.full((4, 4), -3e38)
    ft = torch.full((4, 4), 3e38)
    with pytest.raises(InvalidTensorError, match="'w'"):
        encode_tensor("w", base, ft, "svd", None, rank=1)


def test_integer_tensors_are_refused():
    with pytest.raises(InvalidTensorError, match="'ids'"):
        encode_tensor("ids", torch.zeros(4, 4, dtype=torch.int64), torch.ones(4, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    "bshape,fshape",
    [((4, 5), (4, 6)), ((4, 5), (5, 6)), ((4, 5), (4, 5, 1)), ((4, 5), (20,)), ((2, 3, 4), (2, 3, 5)), ((2, 3, 4), (2, 4, 3)), ((), (1,))],
)
@pytest.mark.parametrize("method", ["svd", "dare", "lossless"])
def test_shapes_differing_beyond_dim_0_are_refused(method, bshape, fshape):
    base, ft = torch.zeros(bshape), torch.ones(fshape)
    with pytest.raises(ShapeMismatchError) as info:
        encode_tensor("blk.w", base, ft, method, None, **({"rank": 1} if method == "svd" else {"p": 0.5} if method == "dare" else {}))
    assert "'blk.w'" in str(info.value)
    assert isinstance(info.value, InvalidTensorError)


def test_lossless_needs_one_shape():
    with pytest.raises(ShapeMismatchError, match="'emb'"):
        encode_tensor("emb", torch.zeros(4, 3), torch.ones(5, 3), "lossless", None)


# ------------------------------------------------------------------------------ methods


def test_unknown_method_lists_the_available_ones():
    base, ft = model_pair((8, 8))
    with pytest.raises(UnknownMethodError) as info:
        encode_tensor("w", base, ft, "svd2")
    msg = str(info.value)
    assert "'svd2'" in msg
    assert list_methods() == sorted(METHODS)
    for m in list_methods():
        assert m in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, DeltahubError)
    with pytest.raises(UnknownMethodError):
        get_method("SVD")


@pytest.mark.parametrize("method,param", [("svd", "rnak"), ("dare", "keep"), ("bitdelta", "rank"), ("lossless", "ratio"), ("deltadq", "density")])
def test_unknown_method_parameter_is_a_type_error(method, param):
    base, ft = model_pair((8, 8))
    with pytest.raises(TypeError) as info:
        encode_tensor("w", base, ft, method, None, **{param: 1})
    assert param in str(info.value)
    with pytest.raises(TypeError):
        get_method(method, **{param: 1})


@pytest.mark.parametrize("method,param,value", [
    ("auto", "noise_weight", 2.0), ("auto", "value_bits", "4"), ("auto", "sign_part", "sometimes"), ("auto", "max_rank", 0),
    ("dare", "p", 1.5), ("deltadq", "bits", 9), ("magnitude", "density", 0), ("deltacome", "bits", (9,)),
])
def test_bad_method_parameter_value_is_a_typed_error_naming_the_method(method, param, value):
    from deltahub import DeltahubError, InvalidParameterError

    with pytest.raises(InvalidParameterError) as info:
        get_method(method, **{param: value})
    assert isinstance(info.value, DeltahubError) and isinstance(info.value, ValueError)
    assert f"method {method!r}" in str(info.value) and param.split("_")[0] in str(info.value)


@pytest.mark.parametrize("method", ["auto", "svd", "dqrelo", "bitdelta", "deltacome", "deltadq", "dare", "magnitude"])
def test_infeasible_ratio_names_the_tensor(method):
    base, ft = model_pair((32, 48), torch.bfloat16)
    with pytest.raises(InfeasibleRatioError) as info:
        encode_tensor("model.layers.7.self_attn.o_proj.weight", base, ft, method, 1 / 1000)
    msg = str(info.value)
    assert "model.layers.7.self_attn.o_proj.weight" in msg
    assert method in msg


@pytest.mark.parametrize("method,params", [("svd", {"rank": 30}), ("deltacome", {"rank": 30}), ("magnitude", {"density": 0.9})])
def test_explicit_parameters_over_the_ratio_are_refused(method, params):
    base, ft = model_pair((32, 48), torch.bfloat16)
    with pytest.raises(InfeasibleRatioError, match="'w'"):
        encode_tensor("w", base, ft, method, 1 / 8, **params)


@pytest.mark.parametrize(
    "method,params",
    [("svd", {"rank": 0}), ("svd", {"rank": 33}), ("deltadq", {"keep": 0}), ("deltadq", {"keep": 129}), ("dare", {"p": 1.0}), ("dare", {"p": -0.1}), ("magnitude", {"density": 0.0}), ("magnitude", {"density": 1.5})],
)
def test_out_of_range_parameters_are_refused(method, params):
    base, ft = model_pair((32, 48), torch.bfloat16)
    with pytest.raises(ValueError):
        encode_tensor("w", base, ft, method, None, **params)


@pytest.mark.parametrize("method", ["svd", "deltacome", "deltadq", "dare", "magnitude"])
def test_methods_without_ratio_or_parameter_say_so(method):
    base, ft = model_pair((32, 48), torch.bfloat16)
    with pytest.raises(ValueError, match="'w'"):
        encode_tensor("w", base, ft, method, None)


# ------------------------------------------------------------------------------ files


@pytest.fixture
def repo(tmp_path):
    """A small delta repo on disk: two compressed tensors in two shards, a dense one and an unchanged one."""
    encs = []
    for name, shape, method, params in [
        ("a.weight", (32, 48), "svd", {"rank": 3}),
        ("b.weight", (24, 40), "dare", {"p": 0.5}),
        ("norm.weight", (40,), "dense", {}),
    ]:
        base, ft = model_pair(shape if len(shape) == 2 else (1, shape[0]), torch.bfloat16, seed=len(encs))
        base, ft = base.reshape(shape), ft.reshape(shape)
        encs.append((encode_tensor(name, base, ft, method, None, **params), base, ft))
    same = torch.ones(3, 3, dtype=torch.bfloat16)
    encs.append((encode_tensor("same.weight", same, same.clone()), same, same))
    path = write_delta(tmp_path / "delta", [e for e, _, _ in encs], max_shard_size=600)
    return path, {e.name: (e, b, f) for e, b, f in encs}


def _shard_of(path, key):
    index = json.loads((path / INDEX_NAME).read_text())
    return path / index["weight_map"][key]


def test_the_fixture_repo_decodes(repo):
    path, encs = repo
    reader = DeltaReader(path)
    assert len(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())) >= 2
    for name, (enc, base, _) in encs.items():
        assert torch.equal(reader.decode(name, base.clone()), enc.decode(base.clone()))


@pytest.mark.parametrize("version,error", [("2.0", UnsupportedFormatVersionError), ("0.9", UnsupportedFormatVersionError), ("1", FormatError), ("one", FormatError), (1.0, FormatError)])
def test_unsupported_format_version(repo, version, error):
    path, _ = repo
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["format_version"] = version
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(error) as info:
        DeltaReader(path)
    if error is UnsupportedFormatVersionError:
        assert "1.x" in str(info.value) and str(version) in str(info.value)


def test_a_newer_minor_version_is_read(repo):
    path, encs = repo
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["format_version"] = "1.7"
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    enc, base, _ = encs["a.weight"]
    assert torch.equal(DeltaReader(path).decode("a.weight", base.clone()), enc.decode(base.clone()))


@pytest.mark.parametrize("text", ["", "{", "[]", '{"format": "other", "format_version": "1.0", "tensors": {}}', '{"format": "deltahub", "format_version": "1.0"}'])
def test_malformed_config(repo, text):
    path, _ = repo
    (path / CONFIG_NAME).write_text(text)
    with pytest.raises(FormatError):
        DeltaReader(path)


def test_not_a_delta_folder(tmp_path):
    with pytest.raises(FormatError):
        DeltaReader(tmp_path)


def test_unknown_component_type(repo):
    path, encs = repo
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["tensors"]["a.weight"]["components"][0]["type"] = "hyperbolic"
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    reader = DeltaReader(path)
    _, base, _ = encs["a.weight"]
    with pytest.raises(UnknownComponentError) as info:
        reader.decode("a.weight", base.clone())
    assert "hyperbolic" in str(info.value)
    assert isinstance(info.value, FormatError)
    # the other tensors still decode
    enc, base, _ = encs["b.weight"]
    assert torch.equal(reader.decode("b.weight", base.clone()), enc.decode(base.clone()))


def test_unknown_record_kind(repo):
    path, encs = repo
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["tensors"]["a.weight"]["kind"] = "patched"
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="a.weight"):
        DeltaReader(path).decode("a.weight", encs["a.weight"][1].clone())


@pytest.mark.parametrize("keep_bytes", ["half", "minus_one", "header_only", "four"])
def test_truncated_shard_is_a_format_error(repo, keep_bytes):
    path, encs = repo
    shard = _shard_of(path, "a.weight::0.s")
    data = shard.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cut = {"half": len(data) // 2, "minus_one": len(data) - 1, "header_only": header, "four": 4}[keep_bytes]
    shard.write_bytes(data[:cut])
    reader = DeltaReader(path)
    index = json.loads((path / INDEX_NAME).read_text())
    names = {k.split("::")[0] for k, v in index["weight_map"].items() if v == shard.name}
    assert names
    for name in names:
        _, base, _ = encs[name]
        with pytest.raises(FormatError):
            reader.decode(name, base.clone())


def test_missing_shard_is_a_format_error(repo):
    path, encs = repo
    shard = _shard_of(path, "b.weight::0.values")
    shard.unlink()
    with pytest.raises(FormatError, match=shard.name):
        DeltaReader(path).decode("b.weight", encs["b.weight"][1].clone())


def test_missing_index_entry_is_a_format_error(repo):
    path, encs = repo
    index = json.loads((path / INDEX_NAME).read_text())
    del index["weight_map"]["a.weight::0.s"]
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FormatError, match="a.weight::0.s"):
        DeltaReader(path).decode("a.weight", encs["a.weight"][1].clone())


def test_missing_index_is_a_format_error(repo):
    path, _ = repo
    (path / INDEX_NAME).unlink()
    with pytest.raises(FormatError):
        DeltaReader(path)


def _rewrite_shard(shard, change):
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    change(tensors)
    save_file(tensors, str(shard), metadata=meta)


@pytest.mark.parametrize("change", ["shape", "dtype", "extra_elements"])
def test_stored_tensor_with_wrong_layout_is_a_format_error(repo, change):
    path, encs = repo
    key = "a.weight::0.u.0.values"  # F16 [3, 32]
    shard = _shard_of(path, key)

    def edit(tensors):
        t = tensors[key]
        assert t.dtype == torch.float16 and tuple(t.shape) == (3, 32)
        tensors[key] = {"shape": t.reshape(32, 3), "dtype": t.to(torch.float32), "extra_elements": torch.cat([t, t[:1]])}[change].contiguous()

    _rewrite_shard(shard, edit)
    with pytest.raises(FormatError) as info:
        DeltaReader(path).decode("a.weight", encs["a.weight"][1].clone())
    assert "u.0.values" in str(info.value)


def test_wrong_base_shape_is_refused(repo):
    path, encs = repo
    reader = DeltaReader(path)
    with pytest.raises(FormatError, match="a.weight"):
        reader.decode("a.weight", torch.zeros(31, 48, dtype=torch.bfloat16))
    with pytest.raises(InvalidTensorError, match="a.weight"):
        reader.decode("a.weight", None)


# ------------------------------------------------------------------------------ writer


def test_writer_failing_inside_with_leaves_nothing(tmp_path):
    base, ft = model_pair((32, 48), torch.bfloat16)
    enc = encode_tensor("a.weight", base, ft, "svd", None, rank=2)
    out = tmp_path / "out" / "delta"
    with pytest.raises(RuntimeError, match="boom"):
        with DeltaWriter(out, max_shard_size=200) as w:
            w.add("a.weight", enc.record, enc.tensors)
            w.add("b.weight", enc.record, {k: v.clone() for k, v in enc.tensors.items()})
            raise RuntimeError("boom")
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial temp folder, no spool files


def test_writer_failing_leaves_an_existing_delta_intact(tmp_path):
    base, ft = model_pair((32, 48), torch.bfloat16)
    enc = encode_tensor("a.weight", base, ft, "svd", None, rank=2)
    path = write_delta(tmp_path / "delta", [enc])
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(RuntimeError):
        with DeltaWriter(path, overwrite=True) as w:
            w.add("a.weight", enc.record, enc.tensors)
            raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def test_writer_refuses_bad_records(tmp_path):
    base, ft = model_pair((16, 24), torch.bfloat16)
    enc = encode_tensor("a.weight", base, ft, "svd", None, rank=2)
    with DeltaWriter(tmp_path / "d") as w:
        w.add("a.weight", enc.record, enc.tensors)
        with pytest.raises(ValueError, match="twice"):
            w.add("a.weight", enc.record, enc.tensors)
        with pytest.raises(ValueError):
            w.add("bad::name", enc.record, enc.tensors)
        missing = dict(enc.tensors)
        missing.pop("0.s")
        with pytest.raises(ValueError, match="0.s"):
            w.add("c.weight", enc.record, missing)
        with pytest.raises(UnknownComponentError):
            w.add("d.weight", {**enc.record, "components": [{"type": "nope"}]}, {})
        w.abort()
    assert not (tmp_path / "d").exists()
    assert list(tmp_path.iterdir()) == []
