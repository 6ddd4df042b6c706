"""export_lora / `deltahub export-lora`: the adapter loads back with PEFT and gives the delta's
outputs (exactly for svd deltas, within the reported error otherwise)."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltahub
from cli.main import app
from deltahub import DeltaModel, ServingError

from model_pairs import load, make_pair, tokens

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def _without_1d_changes(base, ft, out):
    """The fine-tune with its norms and biases reset to the base's: what a LoRA adapter can hold whole."""
    shutil.copytree(ft, out)
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    save_file({k: (b[k] if v.dim() <= 1 and k in b else v) for k, v in f.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        base, ft = make_pair(arch, root)
        out[arch] = (base, ft, _without_1d_changes(base, ft, root / f"{arch}-ft-2d"))
    return out


@torch.no_grad()
def _logits(model, x):
    return model(input_ids=x).logits.float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_svd_delta_exports_exactly_and_loads_in_peft(arch, pairs, tmp_path):
    """Linear (llama), tied embedding + LM head (qwen2), Conv1D + tied embeddings (gpt2)."""
    base, _, ft = pairs[arch]
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=None, params={"rank": 2}, progress=False)
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False)
    assert report.exact and report.rel_error < 1e-6 and not report.skipped
    assert {m.rank for m in report.modules} == {2}
    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 2 and cfg["base_model_name_or_path"] == str(base.resolve())
    peft_model = peft.PeftModel.from_pretrained(load(base, arch).float(), tmp_path / "lora")
    ours = DeltaModel.from_pretrained(tmp_path / "d", merge=False, dtype=torch.float32)
    x = tokens()
    got, want = _logits(peft_model, x), _logits(ours, x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    merged = _logits(DeltaModel.from_pretrained(tmp_path / "d"), x)
    assert (got - merged).abs().max() < 3e-2  # the merged model rounds its weights to bf16


def test_other_methods_export_a_truncated_svd_with_its_error(pairs, tmp_path):
    # (a sparse delta: dqrelo's low-rank factors are now exported as they are stored, see test_fail_loudly.py; at 1/3,
    # as the records' digests, 76 bytes a tensor, weigh on this 111 KiB model's budget)
    base, ft, _ = pairs["llama"]
    deltahub.compress(base, ft, tmp_path / "d", method="magnitude", ratio=1 / 3, progress=False)
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False)
    assert not report.exact and 0 < report.rel_error < 1 and all(m.source == "truncated SVD" for m in report.modules)
    assert all(0 <= m.rel_error < 1 and m.rank >= 1 for m in report.modules)
    # norms are not expressible as LoRA: listed with their share of the delta
    assert {s.name for s in report.skipped} == {n for n in deltahub.DeltaReader(tmp_path / "d").records if n.endswith("norm.weight")}
    assert 0 < report.skipped_share < 0.1 and abs(sum(s.share for s in report.skipped) - report.skipped_share) < 1e-9
    # the default rank spends about the record's bytes: the adapter is no bigger than the delta
    assert report.adapter_bytes <= 1.5 * report.delta_bytes
    peft_model = peft.PeftModel.from_pretrained(load(base, "llama").float(), tmp_path / "lora")
    x = tokens()
    got = _logits(peft_model, x)
    merged = _logits(DeltaModel.from_pretrained(tmp_path / "d"), x)
    plain = _logits(load(base, "llama"), x)
    assert (got - merged).norm() < (plain - merged).norm(), "the adapter moves the base toward the delta"
    # a higher rank is closer
    better = deltahub.export_lora(tmp_path / "d", tmp_path / "lora16", rank=16, progress=False)
    assert better.rel_error < report.rel_error and {m.rank for m in better.modules} == {16}
    assert (_logits(peft.PeftModel.from_pretrained(load(base, "llama").float(), tmp_path / "lora16"), x) - merged).norm() < (got - merged).norm()
    saved = json.loads((tmp_path / "lora" / "deltahub_lora_report.json").read_text())
    assert saved["rel_error"] == pytest.approx(report.rel_error) and len(saved["modules"]) == len(report.modules)


def test_truncating_an_svd_delta_and_leaving_embeddings_out(pairs, tmp_path):
    base, _, ft = pairs["qwen2"]
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=None, params={"rank": 4}, progress=False)
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", rank=2, embeddings=False, dtype="bfloat16", progress=False)
    assert not report.exact and {m.rank for m in report.modules} == {2} and 0 < report.rel_error < 1
    assert "model.embed_tokens" not in {m.module for m in report.modules} and "lm_head" not in {m.module for m in report.modules}
    assert any(s.name == "model.embed_tokens.weight" and "embeddings=False" in s.reason for s in report.skipped)
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    peft.PeftModel.from_pretrained(load(base, "qwen2"), tmp_path / "lora")  # loads
    # untruncated but rounded to bf16: not exact, and the error reported is the rounding's
    rounded = deltahub.export_lora(tmp_path / "d", tmp_path / "lora-bf16", dtype="bfloat16", progress=False)
    assert not rounded.exact and {m.rank for m in rounded.modules} == {4} and 0 < rounded.rel_error < 1e-2


def test_lossless_reads_the_base(pairs, tmp_path):
    base, ft, _ = pairs["llama"]
    deltahub.compress(base, ft, tmp_path / "d", method="lossless", ratio=None, progress=False)
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", rank=48, progress=False)  # full rank of 48-wide matrices
    assert report.rel_error < 1e-5 and not report.exact
    with pytest.raises(deltahub.BaseMismatchError):
        deltahub.export_lora(tmp_path / "d", tmp_path / "lora2", base=ft, progress=False)


def test_cli_export_lora(pairs, tmp_path):
    runner = CliRunner()
    base, _, ft = pairs["llama"]
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=None, params={"rank": 2}, progress=False)
    r = runner.invoke(app, ["export-lora", str(tmp_path / "d"), str(tmp_path / "lora")])
    assert r.exit_code == 0, r.output
    assert "LoRA modules" in r.output and "exact" in r.output
    r = runner.invoke(app, ["export-lora", str(tmp_path / "d"), str(tmp_path / "lora")])
    assert r.exit_code == 1 and "exists and is not empty" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["export-lora", str(tmp_path / "d"), str(tmp_path / "lora"), "--rank", "1", "--overwrite"])
    assert r.exit_code == 0 and "rank 1" in r.output
    r = runner.invoke(app, ["export-lora", str(tmp_path / "d"), str(tmp_path / "x"), "--rank", "0"])
    assert r.exit_code == 1 and "rank must be a positive integer" in r.output
    r = runner.invoke(app, ["export-lora", str(tmp_path / "nowhere"), str(tmp_path / "y")])
    assert r.exit_code == 1 and "Error" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    r = runner.invoke(app, ["export-lora", "--help"])
    assert r.exit_code == 0 and "Example" in r.output
    with pytest.raises(ServingError, match="positive integer"):
        deltahub.export_lora(tmp_path / "d", tmp_path / "z", rank=-1)
