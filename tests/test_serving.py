"""Serving deltas unmerged on one base (issue #6): every method against the merged model,
the operators against the decoded deltas, switching, disabling, deleting, mixed-delta batches,
other bases refused. Tiny real architectures from model_pairs, fine-tuned a few steps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import deltahub
from deltahub import BaseMismatchError, DeltaModel, ServingError, UnknownDeltaError
from deltahub.format import DeltaReader
from deltahub.format.components import Component
from deltahub.format.records import delta_from_components, stored_key
from deltahub.checkpoint import sample_digest
from deltahub.serving.layers import DeltaLayer
from deltahub.serving.operators import TensorDelta, ValueDelta

from model_pairs import build, load, make_pair, save, tokens

# Tiny tensors: extra threads only add contention on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# Targets every method meets on these tiny models: the index and config are a large share of
# their repos, and a target is a whole-repo promise (compress refuses one it cannot keep).
METHODS = {
    "auto": 1 / 2,
    "bitdelta": None,
    "dqrelo": 1 / 2,
    "svd": 1 / 2,
    "deltacome": 1 / 2,
    "deltadq": 3 / 4,
    "dare": 1 / 2,
    "magnitude": 1 / 2,
    "lossless": None,
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    out = {arch: make_pair(arch, root) for arch in ("llama", "qwen2", "gpt2", "bert")}
    out["qwen3_moe"] = make_pair("qwen3_moe", root / "moe")
    out["qwen3_moe_fused"] = make_pair("qwen3_moe", root / "fused", fused=True)
    return out


@pytest.fixture(scope="module")
def llama_deltas(pairs, tmp_path_factory):
    """The llama pair compressed with every method."""
    root = tmp_path_factory.mktemp("llama-deltas")
    base, ft = pairs["llama"]
    return {m: deltahub.compress(base, ft, root / m, method=m, ratio=r, progress=False).path for m, r in METHODS.items()}


@torch.no_grad()
def _logits(model, x, **kw):
    return model(input_ids=x, **kw).logits.float()


def _close_to_merged(got: torch.Tensor, merged: torch.Tensor, base: torch.Tensor) -> None:
    """Unmerged and merged differ by rounding only: the merged weights are rounded to bf16 once,
    the unmerged path rounds activations instead. A couple of bf16 steps at most, and tiny
    against what the delta changes."""
    assert (got - merged).abs().max() <= 2e-2 * merged.abs().max()
    assert (got - merged).norm() <= 0.05 * (merged - base).norm()


@pytest.mark.parametrize("method", list(METHODS))
def test_unmerged_matches_merged_for_every_method(method, pairs, llama_deltas):
    base, _ = pairs["llama"]
    delta = llama_deltas[method]
    merged = DeltaModel.from_pretrained(delta)
    model = DeltaModel.from_pretrained(delta, merge=False)
    assert isinstance(model, DeltaModel) and model.active_delta == "default"
    x = tokens()
    got, want, plain = _logits(model, x), _logits(merged, x), _logits(load(base, "llama"), x)
    if method == "lossless":
        assert torch.equal(got, want), "lossless layers compute exactly what the merged model computes"
    else:
        _close_to_merged(got, want, plain)
    with model.disable_delta():
        assert torch.equal(_logits(model, x), plain), "disabled: exactly the plain base"
    assert model.active_delta == "default"
    # merge_and_unload folds the delta in exactly as from_pretrained decodes it
    folded = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in folded.modules())
    ref = merged.state_dict()
    for k, v in folded.state_dict().items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("method", list(METHODS))
def test_operators_apply_the_decoded_delta(method, pairs, llama_deltas):
    """Each operator against the float32 delta decoded by the format code: x Δᵀ, Δ[ids], the
    dense delta and (Conv1D's product) x Δ."""
    base, _ = pairs["llama"]
    reader = DeltaReader(llama_deltas[method])
    model = DeltaModel.from_base(load(base, "llama"))
    loaded = model.load_delta(reader, "d")
    assert loaded.ops and loaded.nbytes > 0
    g = torch.Generator().manual_seed(0)
    for name, op in loaded.ops.items():
        record = reader.record(name)
        comps = [
            Component(meta, {f: reader.get(stored_key(name, i, f)) for f in deltahub.format.components.component_type(meta["type"]).layout(meta, deltahub.format.components.block_shape(tuple(record["shape"]), meta))})
            for i, meta in enumerate(record["components"])
        ]
        if isinstance(op, ValueDelta):
            assert method == "lossless" or len(record["shape"]) == 1
            assert torch.equal(op.value, reader.decode(name, model._param(name).detach()))
            continue
        assert isinstance(op, TensorDelta)
        want = delta_from_components(tuple(record["shape"]), comps)
        dense = torch.zeros(want.shape)
        op.add_into(dense)
        assert torch.allclose(dense, want, atol=1e-6, rtol=1e-5), name
        tol = dict(atol=1e-5 * float(want.abs().max() + 1) * want.shape[1] ** 0.5, rtol=1e-4)
        x = torch.randn(5, want.shape[1], generator=g)
        assert torch.allclose(op.mm_t(x), x @ want.t(), **tol), name
        x2 = torch.randn(5, want.shape[0], generator=g)
        assert torch.allclose(op.mm(x2), x2 @ want, **tol), name
        ids = torch.tensor([0, want.shape[0] - 1, 3, 3])
        assert torch.allclose(op.rows(ids, torch.float32), want[ids], atol=1e-6), name


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "bert", "qwen3_moe_fused"])
def test_architectures(arch, pairs, tmp_path):
    """Tied embeddings and LM head (qwen2, gpt2, bert), biases, GPT-2's Conv1D, BERT's head
    bias, fused MoE experts and routers (generic modules)."""
    base, ft = pairs[arch]
    name = arch.removesuffix("_fused")
    deltahub.compress(base, ft, tmp_path / "d", method="dqrelo", ratio=1 / 2, progress=False)
    merged = DeltaModel.from_pretrained(tmp_path / "d")
    model = DeltaModel.from_pretrained(tmp_path / "d", merge=False)
    x = tokens()
    _close_to_merged(_logits(model, x), _logits(merged, x), _logits(load(base, name), x))
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, DeltaLayer)}
    expected = {"qwen2": {"DeltaLinear", "DeltaEmbedding", "DeltaParams"}, "gpt2": {"DeltaConv1D", "DeltaEmbedding", "DeltaLinear", "DeltaParams"},
                "bert": {"DeltaLinear", "DeltaEmbedding", "DeltaParams"}, "qwen3_moe_fused": {"DeltaLinear", "DeltaEmbedding", "DeltaParams"}}[arch]
    assert kinds == expected
    # a mixed batch (delta, plain base) equals each row alone
    mixed = _logits(model, x, delta_names=["default", None])
    assert torch.allclose(mixed[0], _logits(model, x[:1])[0], atol=1e-5)
    with model.disable_delta():
        assert torch.allclose(mixed[1], _logits(model, x[1:])[0], atol=1e-5)


class _ScaledEmbedding(nn.Embedding):
    """An embedding with its own forward, as Gemma 3's scaled word embedding has."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 1.5


def test_tied_weight_reaches_a_module_with_its_own_forward(pairs, tmp_path):
    """A tied embedding whose module has no stock forward still gets the delta (as a generic
    module) next to the LM head's operator: the output is the merged model's."""
    base, ft = pairs["qwen2"]
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=1 / 2, progress=False)

    def scaled(model):
        model.model.embed_tokens.__class__ = _ScaledEmbedding
        return model

    model = DeltaModel.from_base(scaled(load(base, "qwen2")))
    model.load_delta(tmp_path / "d")
    assert type(model.base_model.model.embed_tokens).__name__ == "DeltaParams"
    x = tokens()
    _close_to_merged(_logits(model, x), _logits(scaled(DeltaModel.from_pretrained(tmp_path / "d")), x), _logits(scaled(load(base, "qwen2")), x))


class _Gated(nn.Module):
    """A module with a parameter of its own around a Linear (Mamba's mixers, gated blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(16))
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.gate


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.block = _Gated()
        self.head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(ids)))


def test_mixed_batch_through_a_generic_module_around_a_wrapped_one(tmp_path):
    """The generic wrapper runs each group of rows through the module's own forward; the Linear
    inside must then apply that group's delta to all the rows it sees."""
    torch.manual_seed(0)
    base, ft = _Tiny(), _Tiny()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for name, m in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(dict(m.state_dict()), str(tmp_path / name / "model.safetensors"))
    deltahub.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="svd", ratio=None, params={"rank": 16}, progress=False)
    model = DeltaModel.from_base(base)
    model.load_delta(tmp_path / "d", "d")
    assert {type(model.base_model.block).__name__, type(model.base_model.block.base_layer.proj).__name__} == {"DeltaParams", "DeltaLinear"}
    x = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(x, delta_names=["d", None, "d"])
        assert torch.allclose(mixed[[0, 2]], model(x[[0, 2]]), atol=1e-6)
        assert torch.allclose(mixed[[0, 2]], ft(x[[0, 2]]), atol=1e-3)
        with model.disable_delta():
            assert torch.equal(mixed[1], model(x[1:2])[0])


def test_switch_disable_delete(pairs, llama_deltas):
    base, _ = pairs["llama"]
    model = DeltaModel.from_base(load(base, "llama"))
    x = tokens()
    plain = _logits(model, x)
    model.load_delta(llama_deltas["dqrelo"], name="a")
    model.load_delta(llama_deltas["svd"], name="b")
    assert model.active_delta == "a" and set(model.loaded_deltas) == {"a", "b"}
    a = _logits(model, x)
    model.set_delta("b")
    b = _logits(model, x)
    assert not torch.equal(a, b) and not torch.equal(a, plain)
    ref_b = DeltaModel.from_pretrained(llama_deltas["svd"], merge=False)
    assert torch.equal(b, _logits(ref_b, x)), "a delta gives the same output whatever else is loaded"
    model.disable_delta()
    assert model.active_delta is None and torch.equal(_logits(model, x), plain)
    model.set_delta("a")
    assert torch.equal(_logits(model, x), a)
    with model.disable_delta():
        assert torch.equal(_logits(model, x), plain)
    assert model.active_delta == "a"
    total = model.delta_nbytes()
    assert total == model.delta_nbytes("a") + model.delta_nbytes("b")
    model.delete_delta("a")
    assert model.active_delta is None and set(model.loaded_deltas) == {"b"} and model.delta_nbytes() < total
    with pytest.raises(UnknownDeltaError, match="no delta named 'a'"):
        model.set_delta("a")
    with pytest.raises(ServingError, match="loaded already"):
        model.load_delta(llama_deltas["dqrelo"], name="b")
    with pytest.raises(ServingError, match="without '.'"):
        model.load_delta(llama_deltas["dqrelo"], name="user.math")
    model.set_delta("b")
    assert torch.equal(_logits(model, x), b)
    model.delete_delta("b")
    assert not any(isinstance(m, DeltaLayer) for m in model.modules()), "no delta left: every module unwrapped"
    assert torch.equal(_logits(model, x), plain)


def test_peft_like_wrapper(pairs, llama_deltas, tmp_path):
    base, _ = pairs["llama"]
    hf = load(base, "llama")
    model = DeltaModel.from_base(hf)
    assert model.base_model is hf and model.get_base_model() is hf and model.config is hf.config
    model.load_delta(llama_deltas["dqrelo"], "a")
    x = tokens()
    before = _logits(model, x)
    out = model.generate(x[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    # .to(dtype) moves the base but never casts the stored tensors (merging needs their dtypes)
    model.to(torch.float32)
    # save_pretrained writes the delta's repo, never the wrapped model's base_layer weights
    saved = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in llama_deltas["dqrelo"].iterdir())
    op = model.loaded_deltas["a"].ops["model.layers.0.mlp.up_proj.weight"]
    assert [c.meta["type"] for c in op.comps] == ["sign", "lowrank"]
    assert op.comps[0].field("bits").dtype == torch.uint8 and op.comps[1].field("u.0.values").dtype == torch.float16
    after = _logits(model, x)
    assert (after - before).abs().max() < 2e-2
    with pytest.raises(ServingError, match="already carries delta wrappers"):
        DeltaModel.from_base(hf)


def test_mixed_batch_equals_each_row_alone(pairs, llama_deltas):
    base, _ = pairs["llama"]
    model = DeltaModel.from_base(load(base, "llama"))
    for m in ("dqrelo", "svd", "dare", "lossless"):
        model.load_delta(llama_deltas[m], m)
    names = ["dqrelo", "lossless", None, "dare", "svd", "dqrelo"]
    x = torch.randint(0, 160, (len(names), 12), generator=torch.Generator().manual_seed(3))
    model.set_delta("svd")
    mixed = _logits(model, x, delta_names=names)
    with model.delta_batch(names):
        assert torch.equal(_logits(model, x), mixed)
    assert model.active_delta == "svd"
    for i, n in enumerate(names):
        with model.disable_delta():
            if n is not None:
                model.set_delta(n)
            alone = _logits(model, x[i : i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-5), (i, n)
    # generate: greedy, one delta per row, equals each row generated alone
    gen = model.generate(x[:3, :4], max_new_tokens=3, do_sample=False, delta_names=names[:3])
    for i, n in enumerate(names[:3]):
        with model.disable_delta():
            if n is not None:
                model.set_delta(n)
            assert torch.equal(gen[i], model.generate(x[i : i + 1, :4], max_new_tokens=3, do_sample=False)[0]), n
    # beams expand every row: the expanded rows keep their row's delta
    beams = model.generate(x[:2, :4], max_new_tokens=3, do_sample=False, num_beams=2, delta_names=["dare", None])
    model.set_delta("dare")
    assert torch.equal(beams[0], model.generate(x[:1, :4], max_new_tokens=3, do_sample=False, num_beams=2)[0])
    with pytest.raises(UnknownDeltaError):
        _logits(model, x[:2], delta_names=["dare", "nope"])
    with pytest.raises(ServingError, match="6 rows"):
        _logits(model, x[:4], delta_names=names)


def test_gpt2_mixed_batch_with_shared_position_ids(pairs, tmp_path):
    """GPT-2 looks position ids up once for the whole batch ([1, T]): in a mixed batch the
    position embedding is expanded so each row gets its own delta."""
    base, ft = pairs["gpt2"]
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=1 / 2, progress=False)
    model = DeltaModel.from_pretrained(tmp_path / "d", merge=False)
    x = tokens()
    mixed = _logits(model, x, delta_names=[None, "default"])
    assert torch.allclose(mixed[1], _logits(model, x[1:])[0], atol=1e-5)
    with model.disable_delta():
        assert torch.allclose(mixed[0], _logits(model, x[:1])[0], atol=1e-5)


def test_delta_for_another_base_is_refused(pairs, llama_deltas, tmp_path):
    other = save(build("llama", seed=7), tmp_path / "other", torch.bfloat16)
    model = DeltaModel.from_base(load(other, "llama"))
    with pytest.raises(BaseMismatchError, match="same shape but other weights") as e:
        model.load_delta(llama_deltas["dqrelo"], "a")
    assert "verify_base=False" in str(e.value)
    assert not model.loaded_deltas and not any(isinstance(m, DeltaLayer) for m in model.modules())
    model.load_delta(llama_deltas["dqrelo"], "a", verify_base=False)  # the user's call
    with pytest.raises(BaseMismatchError):
        DeltaModel.from_pretrained(llama_deltas["dqrelo"], base=other, merge=False)
    # another architecture's shapes
    qwen = DeltaModel.from_base(load(pairs["qwen2"][0], "qwen2"))
    with pytest.raises((BaseMismatchError, ServingError)):
        qwen.load_delta(llama_deltas["dqrelo"])
    # the in-memory digest is the checkpoint's (spec §4.2)
    base, _ = pairs["llama"]
    ckpt = deltahub.Checkpoint.open(base)
    hf = load(base, "llama")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"):
        assert sample_digest(hf.state_dict()[name]) == ckpt.sample_digest(name)
    assert sample_digest(hf.float().state_dict()["model.norm.weight"], torch.bfloat16) == ckpt.sample_digest("model.norm.weight")


def test_unplaceable_tensors_are_refused_with_the_fix(pairs, tmp_path):
    base, ft = pairs["qwen3_moe"]  # per-expert checkpoint keys, fused by transformers on load
    deltahub.compress(base, ft, tmp_path / "moe", method="dqrelo", ratio=1 / 2, progress=False)
    with pytest.raises(ServingError, match=r"not parameters of the wrapped Qwen3MoeForCausalLM.*DeltaModel.from_pretrained\(delta\)"):
        DeltaModel.from_pretrained(tmp_path / "moe", merge=False)
    grown_base, grown_ft = make_pair("llama", tmp_path / "grown", grow_vocab=8)
    deltahub.compress(grown_base, grown_ft, tmp_path / "grown-d", method="dqrelo", ratio=1 / 2, progress=False)
    model = DeltaModel.from_base(load(grown_base, "llama"))
    with pytest.raises(ServingError, match=r"changes the shape of '(model.embed_tokens|lm_head).weight'.*resized vocabulary"):
        model.load_delta(tmp_path / "grown-d", verify_base=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unmerged_on_gpu(pairs, llama_deltas):
    base, _ = pairs["llama"]
    cpu = DeltaModel.from_pretrained(llama_deltas["dqrelo"], merge=False, dtype=torch.float32)
    gpu = DeltaModel.from_pretrained(llama_deltas["dqrelo"], merge=False, dtype=torch.float32, device_map="cuda")
    gpu.load_delta(llama_deltas["deltadq"], "dq")
    assert all(b.device.type == "cuda" for b in gpu.loaded_deltas["default"].ops["model.layers.0.mlp.up_proj.weight"].buffers())
    x = tokens()
    assert torch.allclose(_logits(gpu, x.cuda()).cpu(), _logits(cpu, x), atol=1e-3)
    mixed = _logits(gpu, x.cuda(), delta_names=["default", "dq"]).cpu()
    assert torch.allclose(mixed[0], _logits(cpu, x[:1])[0], atol=1e-3)
    # a dtype change casts the base on its device and leaves the operators there, uncast
    gpu.to(torch.bfloat16)
    assert all(b.device.type == "cuda" for op in gpu.loaded_deltas["default"].ops.values() for b in op.buffers())
    assert _logits(gpu, x.cuda()).isfinite().all()
