"""The ``auto`` method: whole-model budget, ordinary decoding, determinism, allocation by spectrum."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors.torch import save_file

import deltahub
from deltahub.methods.rounding import stochastic_codes
from deltahub.format import DeltaReader


def _save(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _lowrank(p, q, spectrum, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, len(spectrum), generator=g))
    v, _ = torch.linalg.qr(torch.randn(q, len(spectrum), generator=g))
    return (u * torch.tensor(spectrum)) @ v.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A float32 checkpoint pair whose deltas differ in kind: small dense noise (sparse family), large
    low-rank deltas with a heavy and a light spectrum (low-rank family), and a norm."""
    root = tmp_path_factory.mktemp("auto")
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(512, 768, generator=g) * 0.05 for i in range(4)}
    base["norm.weight"] = torch.ones(512)
    ft = dict(base)
    ft["layers.0.w"] = base["layers.0.w"] + torch.randn(512, 768, generator=g) * 2e-5  # tiny: sparse family
    ft["layers.1.w"] = base["layers.1.w"] + torch.randn(512, 768, generator=g) * 6e-5  # tiny, 3x larger RMS
    ft["layers.2.w"] = base["layers.2.w"] + _lowrank(512, 768, [8.0 / (1 + i) for i in range(512)], 1) * 0.05  # heavy spectrum
    ft["layers.3.w"] = base["layers.3.w"] + _lowrank(512, 768, [4.0 / (1 + i) ** 1.5 for i in range(512)], 2) * 0.05  # light spectrum
    ft["norm.weight"] = base["norm.weight"] + 0.01
    # float32, so that the tiny deltas are not rounded away as bf16 would round them
    b = _save(root / "base", base)
    f = _save(root / "ft", ft)
    return b, f, root


def _bytes_by_tensor(path):
    reader = DeltaReader(path)
    from deltahub.format.records import record_nbytes

    return {n: record_nbytes(n, r) for n, r in reader.records.items()}, reader


@pytest.mark.parametrize("ratio", [1 / 8, 1 / 16, 1 / 32])
def test_auto_never_exceeds_the_whole_model_budget(pair, ratio):
    base, ft, root = pair
    res = deltahub.compress(base, ft, root / f"d{ratio}", method="auto", ratio=ratio, progress=False)
    assert res.ratio <= ratio
    assert res.ratio > 0.8 * ratio, "the budget should be spent, not left idle"
    assert not res.fallbacks
    assert deltahub.verify(res.path, base=base).ok


def test_auto_picks_a_family_per_tensor_and_spends_where_it_buys_more(pair):
    base, ft, root = pair
    res = deltahub.compress(base, ft, root / "fam", method="auto", ratio=1 / 32, progress=False)
    nbytes, reader = _bytes_by_tensor(res.path)
    types = {n: [c["type"] for c in r.get("components", [])] for n, r in reader.records.items()}
    assert types["layers.0.w"] == ["sparse"] and types["layers.1.w"] == ["sparse"]
    assert types["layers.2.w"] == ["lowrank"] and types["layers.3.w"] == ["lowrank"]
    assert nbytes["layers.2.w"] > 1.5 * nbytes["layers.3.w"]  # heavier spectrum: more singular vectors
    keep = {n: reader.records[n]["components"][0]["nnz"] / (512 * 768) for n in ("layers.0.w", "layers.1.w")}
    assert keep["layers.0.w"] == pytest.approx(keep["layers.1.w"], rel=0.01)  # sparse tensors share one keep rate
    widths = [s["bits"] for s in reader.records["layers.2.w"]["components"][0]["u"]]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1  # mixed precision, widest first


def test_auto_decodes_through_the_ordinary_reader_and_is_deterministic(pair):
    base, ft, root = pair
    a = deltahub.compress(base, ft, root / "a", method="auto", ratio=1 / 16, progress=False)
    b = deltahub.compress(base, ft, root / "b", method="auto", ratio=1 / 16, progress=False)
    digest = lambda p: hashlib.sha256(b"".join(f.read_bytes() for f in sorted(p.glob("*.safetensors")))).hexdigest()  # noqa: E731
    assert digest(a.path) == digest(b.path)
    applied = deltahub.apply(a.path, root / "applied", base=base, progress=False)
    from safetensors.torch import load_file

    out = load_file(str(next(applied.glob("*.safetensors"))))
    want = load_file(str(ft / "model.safetensors"))
    for name in want:
        err = (out[name].float() - want[name].float()).norm() / max(float((want[name].float() - load_file(str(base / "model.safetensors"))[name].float()).norm()), 1e-12)
        assert err < 3.0, name  # a noisy but unbiased estimate for the sparse family, bounded


def test_stochastic_codes_are_unbiased():
    values = torch.linspace(-1.0, 3.0, 41)
    total = torch.zeros_like(values)
    trials = 400
    for seed in range(trials):
        codes, scale, zero = stochastic_codes(values, 2, seed)
        total += scale * (codes.float() - zero)
    mean = total / trials
    step = 4.0 / 3
    # Each trial's rounding error is within one step with variance <= step^2/4.
    assert float((mean - values).abs().max()) < 4 * step / 2 / math.sqrt(trials)
    codes, scale, zero = stochastic_codes(torch.tensor([0.0, 0.5]), 4, 0)
    assert float(scale * (codes[0].float() - zero)) == 0.0  # zero stays exactly zero


def test_stochastic_codes_make_the_merged_bf16_weight_unbiased():
    """Deltas of a few bf16 ulps: a decoder's cast of base + value snaps the grid values to the
    weights' own grid. With the base and dtype, the codes are drawn so that the *merged* weight
    is right on average; without them the snapping leaves a bias of a sizeable part of an ulp."""
    g = torch.Generator().manual_seed(0)
    w = (0.04 + 0.02 * torch.rand(200, generator=g)).bfloat16()  # one binade: ulp 2^-12
    ulp = 2.0**-12
    v = (torch.rand(200, generator=g) * 2 - 1) * 3 * ulp
    target = w.double() + v.double()

    def mean_error(merged: bool) -> float:
        total = torch.zeros(200, dtype=torch.float64)
        for seed in range(400):
            codes, scale, zero = stochastic_codes(v, 4, seed, w if merged else None, torch.bfloat16 if merged else None)
            total += (w.float() + torch.tensor(scale, dtype=torch.float32) * (codes.float() - zero)).bfloat16().double()
        return float((total / 400 - target).abs().max()) / ulp

    # Each merged weight is one of two neighbouring bf16 values: standard error <= ulp/2/sqrt(400).
    assert mean_error(merged=True) < 0.15
    assert mean_error(merged=False) > 0.3


def test_auto_takes_a_sign_part_where_it_pays(tmp_path):
    """D-QRELO's sign part, chosen per tensor by the planner: a delta of dense +-c noise (flat
    spectrum) gets one, a low-rank delta does not, and the choice lowers the error."""
    g = torch.Generator().manual_seed(0)
    base = {"a.w": torch.randn(256, 512, generator=g) * 0.05, "b.w": torch.randn(256, 512, generator=g) * 0.05}
    delta = {
        "a.w": 0.004 * torch.sign(torch.randn(256, 512, generator=g)) + _lowrank(256, 512, [0.2] * 4, 3),
        "b.w": _lowrank(256, 512, [1.0 / (1 + i) for i in range(16)], 4),
    }
    b = _save(tmp_path / "base", base)
    f = _save(tmp_path / "ft", {k: base[k] + delta[k] for k in base})
    errors = {}
    for sign_part in ("auto", "never"):
        out = tmp_path / f"d{sign_part}"
        deltahub.compress(b, f, out, method="auto", ratio=1 / 8, params={"sign_part": sign_part}, progress=False)
        reader = DeltaReader(out)
        kinds = {n: [c["type"] for c in reader.records[n]["components"]] for n in base}
        if sign_part == "auto":
            assert kinds == {"a.w": ["sign", "lowrank"], "b.w": ["lowrank"]}
        errors[sign_part] = float((reader.decode("a.w", base["a.w"]) - base["a.w"] - delta["a.w"]).norm() / delta["a.w"].norm())
    assert errors["auto"] < 0.5 * errors["never"]


def test_auto_alone_fills_the_tensor_budget():
    base = torch.zeros(128, 256, dtype=torch.bfloat16)
    ft = (torch.randn(128, 256) * 1e-2).bfloat16()
    enc = deltahub.encode_tensor("w", base, ft, "auto", ratio=1 / 8)
    assert 0.1 < enc.ratio <= 1 / 8
    # A delta as large as the weights: the low-rank family; white noise has a flat spectrum, so a
    # sign part removes more error for its bytes than singular vectors would.
    assert [c["type"] for c in enc.record["components"]] == ["sign", "lowrank"]
    small = (torch.randn(128, 256) * 1e-2).bfloat16()
    enc = deltahub.encode_tensor("w", small, (small.float() + torch.randn(128, 256) * 1e-6).bfloat16(), "auto", ratio=1 / 8)
    assert enc.record["components"][0]["type"] == "sparse"


def test_auto_widens_a_dominant_vector_on_a_tight_budget():
    # One direction holds nearly all the energy and the budget holds about one 8-bit vector pair:
    # the bytes must raise that vector's width, not buy near-zero vectors at 2 bits (a width the
    # vector passes on its way up must not be charged a segment the record will not hold).
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(256, 1, generator=g) @ torch.randn(1, 688, generator=g) * 1e-2 + torch.randn(256, 688, generator=g) * 1e-5
    base = torch.zeros(256, 688, dtype=torch.bfloat16)
    for ratio in (1 / 200, 1 / 150):
        enc = deltahub.encode_tensor("w", base, delta.bfloat16(), "auto", ratio=ratio, sign_part="never")
        top = enc.record["components"][-1]["u"][0]
        assert enc.ratio <= ratio and (top["start"], top["end"]) == (0, 1) and top["bits"] >= 4, enc.record["components"][-1]["u"]


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """A small Llama with a real tokenizer (the demo's), trained a few steps then fine-tuned."""
    from deltahub.demo import build_pair

    return build_pair(tmp_path_factory.mktemp("cal"), base_steps=3, finetune_steps=3, progress=False)


def _output_error(delta_path, base, ft, name, h):
    from deltahub import Checkpoint

    reader = DeltaReader(delta_path)
    b = Checkpoint.open(base).get(name)
    err = reader.decode(name, b).float() - Checkpoint.open(ft).get(name).float()
    return float(((err.double() @ h.double()) * err.double()).sum())


def test_calibration_lowers_the_error_on_activations(demo_pair, tmp_path):
    from deltahub.calibration import Calibration
    from deltahub.demo import DATA

    base, ft = demo_pair
    text = tmp_path / "cal.txt"
    text.write_text((DATA / "austen_excerpt.txt").read_text()[:4000])
    plain = deltahub.compress(base, ft, tmp_path / "plain", method="auto", ratio=1 / 8, progress=False)
    cal = deltahub.compress(base, ft, tmp_path / "cal", method="auto", ratio=1 / 8, calibration=text, calibration_tokens=256, progress=False)
    assert cal.ratio <= 1 / 8 and not cal.fallbacks
    method = DeltaReader(cal.path).config["method"]
    assert method["calibration"]["tokens"] == 256 and len(method["calibration"]["sha256"]) == 64
    h = Calibration.collect(base, text.read_text(), max_tokens=256).hessians
    names = [n for n, r in DeltaReader(cal.path).records.items() if n in h and "lowrank" in [c["type"] for c in r.get("components", [])]]
    assert names, "the demo pair's deltas are large: auto should pick low rank"
    # Calibration spreads the budget by output error, so it is the whole model's output error that
    # must drop (a single tensor may get fewer bytes than without calibration).
    assert sum(_output_error(cal.path, base, ft, n, h[n]) for n in names) < 0.9 * sum(_output_error(plain.path, base, ft, n, h[n]) for n in names)
    deltahub.DeltaModel.from_pretrained(cal.path)  # an ordinary delta for every reader


def test_calibration_refuses_bad_input(demo_pair, tmp_path):
    from deltahub.calibration import CalibrationError

    base, ft = demo_pair
    with pytest.raises(CalibrationError, match="does not exist"):
        deltahub.compress(base, ft, tmp_path / "x", method="auto", calibration=tmp_path / "missing.txt", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        deltahub.compress(base, ft, tmp_path / "x", method="auto", calibration=empty, progress=False)
    with pytest.raises(ValueError, match="auto"):
        deltahub.compress(base, ft, tmp_path / "x", method="svd", calibration=empty, progress=False)
    assert not (tmp_path / "x").exists()


def test_calibration_reads_no_more_of_a_file_than_its_tokens_need(tmp_path):
    from deltahub.calibration import BYTES_PER_TOKEN, CalibrationError, read_text

    big = tmp_path / "big.txt"
    # 3-byte characters, so that the cut falls inside one: it is dropped, not decoded half.
    big.write_text("é" * 10 + "€" * 100_000, encoding="utf-8")
    text = read_text(big, max_tokens=16)
    assert len(text.encode("utf-8")) <= 16 * BYTES_PER_TOKEN
    assert len(text.encode("utf-8")) > 16 * BYTES_PER_TOKEN - 4
    assert text.startswith("é" * 10) and set(text[10:]) == {"€"}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"text \xff\xfe more")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        read_text(bad)
    for tokens in (0, 1, -5, 2.5, True, "100"):
        with pytest.raises(CalibrationError, match="calibration_tokens"):
            read_text(big, max_tokens=tokens)


def test_compress_refuses_a_bad_calibration_token_count(demo_pair, tmp_path):
    from deltahub.calibration import CalibrationError

    base, ft = demo_pair
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    with pytest.raises(CalibrationError, match="calibration_tokens"):
        deltahub.compress(base, ft, tmp_path / "x", method="auto", ratio=1 / 8, calibration=text, calibration_tokens=0, progress=False)
    assert not (tmp_path / "x").exists()


def test_gptq_quantizer_lowers_the_output_error_of_rounding():
    from deltahub.calibration import gptq_quantizer
    from deltahub.format.quant import dequantize_groups, quantize_groups

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1  # correlated inputs
    h = x.T @ x / x.shape[0]
    v = torch.randn(16, 256, generator=g)

    def output_error(q):
        e = dequantize_groups(q.codes, q.scale, q.zero, 128) - v
        return float(((e @ h) * e).sum())

    gq = gptq_quantizer(h)(v, 3, 128)
    assert gq.codes.shape == (16, 256) and gq.scale.shape == (16, 2) and int(gq.codes.max()) <= 7
    assert output_error(gq) < 0.8 * output_error(quantize_groups(v, 3, 128))


def test_auto_meets_its_target_on_a_model_of_many_layers(tmp_path):
    """One shard per transformer block: on 32 blocks, their headers and index lines take about
    6 KB, which the planner once left out (a fixed 4 KB), so that auto's sparse plan, which
    fills its budget to the byte, was refused by compress's own final check (1/32 on SmolLM2)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(64, 96, generator=g) * 0.05).to(torch.bfloat16) for i in range(32)}
    ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-4).to(torch.bfloat16) for k, v in base.items()}
    for name, state in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    result = deltahub.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", method="auto", ratio=1 / 8, progress=False)
    assert 0.9 / 8 < result.ratio <= 1 / 8


def test_noise_weight_buys_more_rank_at_narrower_widths():
    """Rounding noise counted at a tenth of a dropped vector's error (the default): the same bytes
    hold more singular vectors at lower widths, and the error model follows the weight."""
    from deltahub.methods.widths import width_error

    assert width_error(0, 0.1) == 1.0 and width_error(2, 0.1) == pytest.approx(0.1 * width_error(2))
    g = torch.Generator().manual_seed(0)
    delta = _lowrank(512, 768, [1.0 / (1 + i) ** 0.5 for i in range(256)], 5) * 0.05
    base = torch.randn(512, 768, generator=g) * 0.02
    records = {}
    for weight in (1.0, 0.1):
        enc = deltahub.encode_tensor("w", base, base + delta, "auto", ratio=1 / 32, sign_part="never", noise_weight=weight)
        assert enc.ratio <= 1 / 32
        records[weight] = enc.record["components"][-1]
    widths = {w: [seg["bits"] for seg in r["u"] for _ in range(seg["end"] - seg["start"])] for w, r in records.items()}
    assert records[0.1]["rank"] > 1.2 * records[1.0]["rank"]
    assert sum(widths[0.1]) / len(widths[0.1]) < sum(widths[1.0]) / len(widths[1.0])


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.1", True])
def test_noise_weight_is_checked(bad):
    with pytest.raises(ValueError, match="noise_weight"):
        deltahub.get_method("auto", noise_weight=bad)


def test_calibration_weights_every_layer_alike(demo_pair, tmp_path):
    """Each layer's H is scaled to a mean diagonal of 1, so the whole-model allocation compares
    the layers' output errors in one currency (unscaled, a layer's share followed the size of its
    inputs, and the MLP's down projections starved)."""
    from deltahub.calibration import Calibration
    from deltahub.demo import DATA

    base, _ = demo_pair
    cal = Calibration.collect(base, (DATA / "austen_excerpt.txt").read_text()[:4000], max_tokens=256)
    means = {n: float(h.diagonal().mean()) for n, h in cal.hessians.items()}
    assert len(means) > 3 and all(m == pytest.approx(1.0, rel=1e-5) for m in means.values()), means


def test_calibration_scaling_of_layers_without_inputs_or_with_overflow():
    """A layer the text never reached (all-zero inputs) is weighed by the identity, not starved by
    a zero H; activations that overflowed are refused with the layer's name."""
    from deltahub.calibration import CalibrationError, _unit_mean_diagonal

    assert torch.equal(_unit_mean_diagonal("a.weight", torch.zeros(4, 4)), torch.eye(4))
    h = torch.diag(torch.tensor([2.0, 4.0, 6.0]))
    assert float(_unit_mean_diagonal("a.weight", h).diagonal().mean()) == pytest.approx(1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CalibrationError, match="b.weight"):
            _unit_mean_diagonal("b.weight", torch.full((3, 3), bad))


def test_noise_weight_accepts_any_real_number_type():
    import numpy as np

    for value in (np.float32(0.5), np.float64(0.5), 1, 0.25):
        assert isinstance(deltahub.get_method("auto", noise_weight=value).noise_weight, float)


def test_coded_codes_buy_more_vectors_within_the_same_bytes():
    """zstd-coded codes (format 1.2, the default) take fewer bytes than packed ones: the encoder
    spends them on more singular vectors, within the same honest budget, for less error; the
    coded record decodes as its uncoded form does."""
    from deltahub.format.components import LowRank

    g = torch.Generator().manual_seed(3)
    delta = _lowrank(512, 768, [1.0 / (1 + i) ** 0.5 for i in range(256)], 6) * 0.05
    base = torch.randn(512, 768, generator=g) * 0.02
    ft = base + delta
    encs = {z: deltahub.encode_tensor("w", base, ft, "auto", ratio=1 / 64, sign_part="never", zstd_codes=z) for z in (False, True)}
    for z, enc in encs.items():
        assert enc.ratio <= 1 / 64 and enc.ratio > 0.95 / 64, (z, enc.ratio)
    plain, coded = (encs[z].record["components"][-1] for z in (False, True))
    assert not any("coding" in seg for seg in plain["u"] + plain["v"])
    assert any(seg.get("coding") == "zstd" for seg in coded["u"] + coded["v"])
    assert coded["rank"] > 1.1 * plain["rank"], (coded["rank"], plain["rank"])
    errors = {z: float((enc.decode(base.clone()) - ft).norm() / delta.norm()) for z, enc in encs.items()}
    assert errors[True] < errors[False], errors
    stored = {k.split(".", 1)[1]: t for k, t in encs[True].tensors.items()}
    meta, packed = LowRank.uncoded(coded, stored, 512, 768)
    assert not any("coding" in seg for seg in meta["u"] + meta["v"])
    assert torch.equal(LowRank.decode(meta, packed, (512, 768)), LowRank.decode(coded, stored, (512, 768)))


def test_a_repo_requires_zstd_codes_only_when_it_holds_them(pair):
    """compress writes format 1.2 and lists `zstd-codes` in `requires` when a segment is coded, so
    an older reader refuses the repo by name; with zstd_codes=false nothing is required."""
    base, ft, root = pair
    coded = deltahub.compress(base, ft, root / "coded", method="auto", ratio=1 / 32, progress=False)
    plain = deltahub.compress(base, ft, root / "plain", method="auto", ratio=1 / 32, params={"zstd_codes": False}, progress=False)
    cfg = {k: DeltaReader(r.path).config for k, r in (("coded", coded), ("plain", plain))}
    assert cfg["coded"]["format_version"] == "1.2" and cfg["coded"]["requires"] == ["zstd-codes"]
    assert "requires" not in cfg["plain"] and cfg["plain"]["method"]["params"]["zstd_codes"] is False
    segs = [seg for r in cfg["coded"]["tensors"].values() for c in r.get("components", []) if c["type"] == "lowrank" for seg in c["u"] + c["v"]]
    assert any("coding" in seg for seg in segs)
    assert coded.ratio <= 1 / 32 and plain.ratio <= 1 / 32
    assert deltahub.verify(coded.path, base=base).ok and deltahub.verify(plain.path, base=base).ok
    # A writer that codes without saying so is non-conforming: verify names the missing feature.
    import json
    import shutil

    edited = shutil.copytree(coded.path, root / "coded-no-requires")
    cfg_file = edited / "delta_config.json"
    doc = json.loads(cfg_file.read_text())
    del doc["requires"]
    cfg_file.write_text(json.dumps(doc))
    report = deltahub.verify(edited)
    assert not report.ok and any("'zstd-codes'" in problem for problem in report.problems), report
