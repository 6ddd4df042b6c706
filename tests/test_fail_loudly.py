"""Fail loudly (issue #16): a target ratio is met by the whole repo or refused before any work,
a PEFT adapter is not compressed as a model, and export-lora is exact where the delta is low-rank."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import deltahub
from deltahub import CheckpointError, DeltaModel, InfeasibleRatioError
from deltahub.format import DeltaReader

from model_pairs import VOCAB, finetune, save, tokens

pytestmark = pytest.mark.usefixtures("single_threaded_torch")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _llama(hidden: int = 128) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small llama (128 wide: 1.3 MB of bf16 delta) fine-tuned for a few real steps."""
    root = tmp_path_factory.mktemp("loud")
    model = _llama()
    base = save(model, root / "base", torch.bfloat16)
    finetune(model, steps=4)
    return base, save(model, root / "ft", torch.bfloat16)


@pytest.fixture(scope="module")
def lowrank_pair(tmp_path_factory):
    """A fine-tune whose matrices moved by rank-2 deltas, large against the weights: auto stores them as low rank."""
    root = tmp_path_factory.mktemp("lowrank")
    model = _llama(64)
    base = save(model, root / "base", torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    state = load_file(str(base / "model.safetensors"))
    for k, w in state.items():
        if w.dim() == 2:
            p, q = w.shape
            d = (torch.randn(p, 2, generator=g) @ torch.randn(2, q, generator=g)) * 0.05 * w.float().pow(2).mean().sqrt()
            state[k] = (w.float() + d).to(w.dtype)
    ft = root / "ft"
    ft.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (ft / f.name).write_bytes(f.read_bytes())
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltahub", *args], capture_output=True, text=True, env=ENV, timeout=600)


def _achieved(out: Path) -> float:
    totals = DeltaReader(out).config["totals"]
    on_disk = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("delta"))
    assert totals["stored_bytes"] == on_disk  # every byte of shards, index and config
    return on_disk / totals["dense_bytes"]


def test_bitdelta_at_1_16_fails_before_any_work_naming_the_smallest_target(pair, tmp_path):
    base, ft = pair
    with pytest.raises(InfeasibleRatioError) as info:
        deltahub.compress(base, ft, tmp_path / "d", method="bitdelta", ratio=1 / 16, progress=False)
    msg = str(info.value)
    assert "bitdelta" in msg and "1/16 = 0.0625" in msg and "natural size" in msg
    smallest = float(re.search(r"--ratio ([0-9.]+)", msg).group(1))
    assert 1 / 16 < smallest < 0.1
    assert not (tmp_path / "d").exists() and not any(tmp_path.iterdir())  # nothing written, no partial folder
    # the target the message names is met
    result = deltahub.compress(base, ft, tmp_path / "d", method="bitdelta", ratio=smallest, progress=False)
    assert result.ratio <= smallest and _achieved(tmp_path / "d") <= smallest


def test_cli_exit_code_and_the_natural_size(pair, tmp_path):
    base, ft = pair
    p = _cli("compress", str(base), str(ft), str(tmp_path / "d"), "--method", "bitdelta", "--ratio", "1/16")
    assert p.returncode == 1, p.stdout + p.stderr
    err = p.stderr.strip()
    assert err.startswith("Error:") and "bitdelta" in err and "smallest target" in err and re.search(r"--ratio 0\.0[6-9]\d+", err), err
    assert not (tmp_path / "d").exists()
    p = _cli("compress", str(base), str(ft), str(tmp_path / "d"), "--method", "bitdelta", "--ratio", "none")
    assert p.returncode == 0, p.stderr
    assert "natural size, no target" in p.stdout
    assert 1 / 16 < _achieved(tmp_path / "d") < 0.1  # 1 bit per weight, honestly counted


def test_one_in_a_thousand_with_svd_fails_loudly(pair, tmp_path):
    base, ft = pair
    with pytest.raises(InfeasibleRatioError, match=r"svd cannot store this delta in 1/1000 = 0.001 .*--ratio 0\.0\d+.*rank") as info:
        deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=1 / 1000, progress=False)
    assert not (tmp_path / "d").exists()
    p = _cli("compress", str(base), str(ft), str(tmp_path / "d"), "-m", "svd", "-r", "1/1000")
    assert p.returncode == 1 and "1/1000" in p.stderr and "smallest target" in p.stderr
    assert str(info.value).split("smallest target")[1][:30] in p.stderr  # the same figure through the CLI


def test_deltadq_at_1_32_fails_or_meets_it(pair, tmp_path):
    base, ft = pair
    try:
        result = deltahub.compress(base, ft, tmp_path / "d", method="deltadq", ratio=1 / 32, progress=False)
    except InfeasibleRatioError as e:
        assert "deltadq" in str(e) and "1/32" in str(e) and "keep" in str(e)
        assert not (tmp_path / "d").exists()
    else:
        assert result.ratio <= 1 / 32 and _achieved(tmp_path / "d") <= 1 / 32


@pytest.mark.parametrize("method,ratio", [("svd", 1 / 8), ("dqrelo", 1 / 8), ("deltacome", 1 / 8), ("dare", 1 / 16), ("magnitude", 1 / 8), ("deltadq", 1 / 4), ("auto", 1 / 8), ("auto", 1 / 16)])
def test_the_whole_repo_meets_the_target(pair, tmp_path, method, ratio):
    base, ft = pair
    result = deltahub.compress(base, ft, tmp_path / "d", method=method, ratio=ratio, progress=False)
    achieved = _achieved(tmp_path / "d")
    assert achieved == pytest.approx(result.ratio) and achieved <= ratio
    assert achieved > 0.5 * ratio  # the budget is used, not thrown away
    text = str(result)
    assert f"ratio {result.ratio:.4f} (target 1/{round(1 / ratio)} = {ratio:.4g};" in text


def test_small_matrices_go_dense_only_where_dense_is_smaller(tmp_path):
    """A 48-wide model: bitdelta's smallest record of the 24x48 k/v projections costs more than
    their dense bytes, so they are stored dense, listed, and the target still holds."""
    model = _llama(48)
    base = save(model, tmp_path / "base", torch.bfloat16)
    finetune(model, steps=2)
    ft = save(model, tmp_path / "ft", torch.bfloat16)
    with pytest.raises(InfeasibleRatioError) as info:
        deltahub.compress(base, ft, tmp_path / "d", method="bitdelta", ratio=1 / 8, progress=False)
    smallest = float(re.search(r"--ratio ([0-9.]+)", str(info.value)).group(1))
    result = deltahub.compress(base, ft, tmp_path / "d", method="bitdelta", ratio=smallest, progress=False)
    assert _achieved(tmp_path / "d") <= smallest
    by_name = {t.name: t for t in result.tensors}
    for name in result.fallbacks:
        assert by_name[name].kind == "dense" and by_name[name].rel_error == 0
    assert DeltaReader(tmp_path / "d").config["summary"]["fallback_dense"] == result.fallbacks


def test_a_peft_adapter_folder_is_refused_with_what_to_do(pair, tmp_path):
    base, ft = pair
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    with pytest.raises(CheckpointError) as info:
        deltahub.compress(base, adapter, tmp_path / "d", progress=False)
    msg = str(info.value)
    assert "PEFT adapter" in msg and "merge_and_unload()" in msg and "serve the LoRA adapter as it is" in msg and str(adapter) in msg
    assert not (tmp_path / "d").exists()
    p = _cli("compress", str(base), str(adapter), str(tmp_path / "d"))
    assert p.returncode == 1 and "PEFT adapter" in p.stderr and "merge_and_unload" in p.stderr
    # merged as the message says, it compresses
    merged = tmp_path / "merged"
    peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload().save_pretrained(merged)
    result = deltahub.compress(base, merged, tmp_path / "d", method="svd", ratio=1 / 8, progress=False)
    kinds = {t.kind for t in result.tensors}
    assert "added" not in kinds and "removed" not in kinds


def test_export_lora_of_an_auto_delta_is_exact_and_loads_in_peft(lowrank_pair, tmp_path):
    base, ft = lowrank_pair
    deltahub.compress(base, ft, tmp_path / "d", method="auto", ratio=1 / 4, progress=False)
    records = DeltaReader(tmp_path / "d").records
    low = [n for n, r in records.items() if r["kind"] == "compressed" and [c["type"] for c in r["components"]] == ["lowrank"]]
    assert low and any("bits" in seg for seg in records[low[0]]["components"][0]["u"])  # quantized factors
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False)
    assert report.exact and report.rel_error < 1e-6 and not report.warnings
    assert all(m.source == "factors" for m in report.modules)
    assert "exact: stored low-rank factors" in str(report) and "warning" not in str(report)
    base_model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "lora")
    x = tokens()
    with torch.no_grad():
        got = peft_model(input_ids=x).logits.float()
        unmerged = DeltaModel.from_pretrained(tmp_path / "d", merge=False, dtype=torch.float32)(input_ids=x).logits.float()
        merged = DeltaModel.from_pretrained(tmp_path / "d")(input_ids=x).logits.float()
    assert torch.allclose(got, unmerged, atol=1e-4), (got - unmerged).abs().max()
    assert (got - merged).abs().max() < 5e-2 * merged.abs().max()  # the merged model rounds its weights to bf16


def test_export_lora_warns_above_the_threshold(pair, tmp_path):
    base, ft = pair
    deltahub.compress(base, ft, tmp_path / "d", method="dqrelo", ratio=None, params={"rank": 2}, progress=False)
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False)
    assert all(m.source == "factors, sign part left out" for m in report.modules) and not report.exact
    assert report.warnings and all(m.rel_error > report.warn_above for m in report.warnings)
    text = str(report)
    assert "sign part" in text and f"warning: {len(report.warnings)} module(s) have a relative error above 0.1" in text
    saved = json.loads((tmp_path / "lora" / "deltahub_lora_report.json").read_text())
    assert saved["warnings"] == [m.module for m in report.warnings]
    p = _cli("export-lora", str(tmp_path / "d"), str(tmp_path / "lora2"))
    assert p.returncode == 0 and "warning:" in p.stdout + p.stderr
    deltahub.compress(base, ft, tmp_path / "b", method="magnitude", ratio=1 / 8, progress=False)
    sparse = deltahub.export_lora(tmp_path / "b", tmp_path / "lora3", progress=False)
    assert all(m.source == "truncated SVD" for m in sparse.modules) and sparse.warnings
    assert not math.isnan(sparse.rel_error)
