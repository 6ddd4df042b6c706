"""encode_tensor / decode_tensor: the rules shared by every method, and the policy that picks methods."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import best_rank, model_pair, structured_delta
from deltahub import EncodedTensor, Policy, Rule, UnknownMethodError, decode_tensor, encode_tensor, list_methods
from deltahub.format import record_nbytes

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ------------------------------------------------------------------------------------ unchanged


@pytest.mark.parametrize("method", ["dqrelo", "svd", "dare", "lossless", "dense"])
@pytest.mark.parametrize("shape", [(16, 24), (64,), (2, 8, 8)])
def test_unchanged_tensor_stores_nothing(method, shape):
    base, _ = model_pair(shape if len(shape) > 1 else (1, shape[0]), torch.bfloat16)
    base = base.reshape(shape)
    enc = encode_tensor("model.w", base, base.clone(), method, 1 / 8)
    assert enc.record == {"kind": "unchanged", "shape": list(shape), "dtype": "BF16"}
    assert enc.tensors == {}
    # only its JSON record costs anything: about one line of delta_config.json
    record_json = '{"dtype":"BF16","kind":"unchanged","shape":[' + ",".join(map(str, shape)) + "]}"
    assert enc.nbytes == record_nbytes("model.w", enc.record)
    assert len(record_json) < enc.nbytes <= len(record_json) + len('    "model.w": ,\n')
    got = enc.decode(base)
    assert got.dtype == base.dtype and torch.equal(got, base)


def test_a_changed_dtype_is_not_unchanged():
    base = torch.randn(8, 8)
    ft = base.to(torch.bfloat16)
    enc = encode_tensor("w", base, ft, "lossless", None)
    assert enc.record["kind"] == "compressed"
    assert torch.equal(enc.decode(base).view(torch.int16), ft.view(torch.int16))


# ----------------------------------------------------------------------------- 1-D and policy


def test_one_dimensional_tensors_go_dense_by_policy():
    policy = Policy("dqrelo", 1 / 8)
    assert policy.resolve("model.norm.weight", (576,)) == ("dense", {}, None)
    assert policy.resolve("scalar", ()) == ("dense", {}, None)
    assert policy.resolve("model.layers.0.mlp.up_proj.weight", (64, 32)) == ("dqrelo", {}, 1 / 8)
    base = (torch.randn(576) * 0.1).to(torch.bfloat16)
    ft = (base.float() + torch.randn(576) * 1e-3).to(torch.bfloat16)
    method, params, ratio = policy.resolve("model.norm.weight", tuple(ft.shape))
    enc = encode_tensor("model.norm.weight", base, ft, method, ratio, **params)
    assert enc.record["kind"] == "dense" and enc.record["components"] == [{"type": "dense", "dtype": "BF16"}]
    got = enc.decode(base)
    assert got.dtype == torch.bfloat16
    # the delta is rounded to bf16, added back in float32 and the sum rounded once
    delta = ft.float() - base.float()
    tol = torch.finfo(torch.bfloat16).eps * (ft.float().abs() + delta.abs())
    assert bool(((got.float() - ft.float()).abs() <= tol).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_float32_is_exact_for_float32(dtype):
    base = torch.randn(33) * 0.1
    ft = base + torch.randn(33) * 1e-3
    enc = encode_tensor("b", base.to(dtype), ft.to(dtype), "dense", None)
    assert enc.record["components"][0]["dtype"] == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    got = enc.decode(base.to(dtype))
    assert got.dtype == dtype
    if dtype == torch.float32:
        delta = ft - base
        assert torch.equal(got, base + delta)


def test_policy_dense_max_ndim():
    policy = Policy("svd", 1 / 4, dense_max_ndim=2)
    assert policy.resolve("w", (8, 8)) == ("dense", {}, None)
    assert policy.resolve("w", (2, 8, 8)) == ("svd", {}, 1 / 4)


# ----------------------------------------------------------------------------------- added


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (9,), (2, 3, 4)])
def test_added_tensor_decodes_exactly(dtype, shape):
    ft = torch.randn(*shape).to(dtype)
    enc = encode_tensor("lora.extra", None, ft, "dqrelo", 1 / 8)
    assert enc.record["kind"] == "added"
    assert enc.record["shape"] == list(shape)
    assert [c["type"] for c in enc.record["components"]] == ["dense"]
    got = enc.decode(None)
    assert got.dtype == dtype and torch.equal(got, ft)
    assert decode_tensor(enc, None).tolist() == ft.tolist()


# ------------------------------------------------------------------------------------- vocab


@pytest.mark.parametrize("method,ratio,params", [("svd", None, {"rank": 4}), ("dqrelo", 1 / 4, {}), ("dare", None, {"p": 0.5}), ("bitdelta", None, {})])
def test_grown_vocabulary(method, ratio, params):
    v, h, k = 96, 64, 7
    base, ft = model_pair((v, h), torch.bfloat16, seed=3)
    new_rows = (torch.randn(k, h) * 0.05).to(torch.bfloat16)
    grown = torch.cat([ft, new_rows])
    enc = encode_tensor("model.embed_tokens.weight", base, grown, method, ratio, **params)
    rec = enc.record
    assert rec["kind"] == "compressed" and rec["shape"] == [v + k, h] and rec["base_shape"] == [v, h]
    comps = rec["components"]
    *overlap, last = comps
    assert last == {"type": "dense", "dtype": "BF16", "rows": [v, v + k]}
    assert all(c["type"] != "dense" and c["rows"] == [0, v] for c in overlap)
    got = enc.decode(base.clone())
    assert got.shape == grown.shape and got.dtype == torch.bfloat16
    assert torch.equal(got[v:], new_rows)  # new rows exact
    # the overlap is the compressed delta: same as compressing the same-shape pair
    same = encode_tensor("model.embed_tokens.weight", base, ft, method, ratio, **params)
    assert same.record["components"] == [{k_: v_ for k_, v_ in c.items() if k_ != "rows"} for c in overlap]
    assert torch.equal(got[:v], same.decode(base.clone()))


def test_grown_vocabulary_overlap_is_the_method_applied_to_the_overlap():
    v, h = 40, 24
    delta = structured_delta(v, h, seed=4)
    base = torch.zeros(v, h)
    grown = torch.cat([delta, torch.randn(3, h)])
    enc = encode_tensor("emb", base, grown, "svd", None, rank=2, factor_dtype="F32")
    got = enc.decode(base.clone())
    assert torch.equal(got[v:], grown[v:])
    assert float((got[:v] - best_rank(delta, 2)).abs().max()) <= 1e-6 * float(delta.abs().max())


def test_shrunk_vocabulary():
    v, h, k = 80, 32, 5
    base, ft = model_pair((v, h), torch.bfloat16, seed=5)
    shrunk = ft[: v - k].clone()
    enc = encode_tensor("lm_head.weight", base, shrunk, "svd", None, rank=3)
    assert enc.record["shape"] == [v - k, h] and enc.record["base_shape"] == [v, h]
    assert all(c["type"] == "lowrank" for c in enc.record["components"])
    got = enc.decode(base.clone())
    assert got.shape == shrunk.shape and got.dtype == torch.bfloat16
    same = encode_tensor("lm_head.weight", base[: v - k].clone(), shrunk, "svd", None, rank=3)
    assert torch.equal(got, same.decode(base[: v - k].clone()))


def test_resized_vocabulary_needs_the_base_it_was_made_against():
    from deltahub import FormatError

    base, ft = model_pair((20, 8), torch.bfloat16)
    enc = encode_tensor("emb", base, torch.cat([ft, ft[:2]]), "svd", None, rank=1)
    with pytest.raises(FormatError, match="emb"):
        enc.decode(base[:19].clone())


# ------------------------------------------------------------------------------ dtype preserved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,params", [("auto", {}), ("dqrelo", {}), ("svd", {}), ("deltacome", {}), ("deltadq", {}), ("dare", {}), ("magnitude", {}), ("bitdelta", {})])
def test_dtype_preserved(dtype, method, params):
    base, ft = model_pair((96, 160), dtype, seed=6)
    enc = encode_tensor("w", base, ft, method, 1 / 4, **params)
    assert enc.record["dtype"] == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    assert enc.dense_nbytes == 96 * 160 * dtype.itemsize
    got = enc.decode(base.clone())
    assert got.dtype == dtype and got.shape == ft.shape
    if method not in ("dare", "deltadq"):  # random drop and rescale is unbiased, not small in norm
        # a useful reconstruction: closer to the fine-tune than the base is
        delta = ft.float() - base.float()
        err = float(torch.linalg.norm(got.float() - ft.float()))
        assert err < float(torch.linalg.norm(delta))


def test_decode_leaves_the_callers_base_alone():
    base = torch.randn(16, 24)
    ft = base + structured_delta(16, 24)
    keep = base.clone()
    enc = encode_tensor("w", base, ft, "svd", None, rank=2)
    enc.decode(base)
    assert torch.equal(base, keep), "decoding modified the base tensor in place"


def test_encode_leaves_its_inputs_alone():
    base, ft = model_pair((96, 160), torch.bfloat16)
    b0, f0 = base.clone(), ft.clone()
    for m in ("dqrelo", "dare", "magnitude", "deltadq", "lossless"):
        encode_tensor("w", base, ft, m, 1 / 4 if m != "lossless" else None)
    assert torch.equal(base, b0) and torch.equal(ft, f0)


def test_encoded_tensor_sizes():
    base, ft = model_pair((64, 96), torch.float16)
    enc = encode_tensor("w", base, ft, "svd", 1 / 4)
    assert isinstance(enc, EncodedTensor)
    assert enc.dense_nbytes == 64 * 96 * 2
    assert enc.ratio == enc.nbytes / enc.dense_nbytes
    data = sum(t.numel() * t.element_size() for t in enc.tensors.values())
    assert data < enc.nbytes <= math.floor(enc.dense_nbytes / 4)


def test_ratio_must_be_positive():
    base, ft = model_pair((16, 16))
    with pytest.raises(ValueError):
        encode_tensor("w", base, ft, "svd", 0.0)
    with pytest.raises(ValueError):
        encode_tensor("w", base, ft, "svd", -0.5)


# ----------------------------------------------------------------------------------- rules


def test_rule_parse():
    r = Rule.parse("*.mlp.*=svd:rank=64")
    assert (r.pattern, r.method, r.params) == ("*.mlp.*", "svd", {"rank": 64})
    r = Rule.parse("*embed_tokens*=dqrelo:ratio=1/4,per_row=True")
    assert r.params == {"ratio": 0.25, "per_row": True}
    r = Rule.parse("model.norm.weight=dense")
    assert (r.pattern, r.method, r.params) == ("model.norm.weight", "dense", {})
    r = Rule.parse("*=svd:factor_dtype=F32")
    assert r.params == {"factor_dtype": "F32"}
    # the pattern may itself contain '=' : the method is after the last one before ':'
    r = Rule.parse("a=b*=magnitude:density=0.1")
    assert (r.pattern, r.method, r.params) == ("a=b*", "magnitude", {"density": 0.1})
    assert r.to_dict() == {"pattern": "a=b*", "method": "magnitude", "params": {"density": 0.1}}


@pytest.mark.parametrize("text,error", [
    ("*.mlp.*", ValueError),
    ("=svd", ValueError),
    ("*.mlp.*=", ValueError),
    ("*.mlp.*=svd:rank", ValueError),
    ("*.mlp.*=nosuch", UnknownMethodError),
    ("*.mlp.*=svd:rnak=4", TypeError),
])
def test_bad_rules_are_refused(text, error):
    with pytest.raises(error):
        Rule.parse(text)


def test_unknown_method_in_a_rule_lists_the_methods():
    with pytest.raises(UnknownMethodError) as info:
        Rule.parse("*=svdd")
    for m in list_methods():
        assert m in str(info.value)


def test_first_matching_rule_wins_and_ratio_overrides():
    policy = Policy(
        "dqrelo",
        1 / 8,
        params={"per_row": True},
        rules=[
            Rule.parse("lm_head.weight=svd:ratio=0.25"),
            Rule.parse("*.mlp.*=deltacome:rank=16"),
            Rule.parse("*.mlp.down_proj.weight=dense"),
            Rule.parse("*.norm.weight=bitdelta"),
        ],
    )
    assert policy.resolve("lm_head.weight", (100, 64)) == ("svd", {}, 0.25)
    assert policy.resolve("model.layers.0.mlp.down_proj.weight", (64, 128)) == ("deltacome", {"rank": 16}, 1 / 8)
    assert policy.resolve("model.layers.0.self_attn.q_proj.weight", (64, 64)) == ("dqrelo", {"per_row": True}, 1 / 8)
    # a rule applies to 1-D tensors too, before the dense default
    assert policy.resolve("model.norm.weight", (64,)) == ("bitdelta", {}, 1 / 8)
    # rules are matched on the whole name
    assert policy.resolve("xlm_head.weight", (100, 64))[0] == "dqrelo"
    d = policy.to_dict()
    assert d["rules"][0] == {"pattern": "lm_head.weight", "method": "svd", "params": {"ratio": 0.25}}
    assert d["method"] == "dqrelo" and d["ratio"] == 1 / 8


def test_policy_resolution_drives_encoding():
    policy = Policy("svd", 1 / 4, rules=[Rule.parse("*.k_proj.weight=dqrelo:rank=2,ratio=None")])
    base, ft = model_pair((48, 64), torch.bfloat16)
    method, params, ratio = policy.resolve("layers.0.k_proj.weight", (48, 64))
    assert (method, params, ratio) == ("dqrelo", {"rank": 2}, None)
    enc = encode_tensor("layers.0.k_proj.weight", base, ft, method, ratio, **params)
    assert enc.record["method"] == "dqrelo" and enc.record["components"][1]["rank"] == 2
