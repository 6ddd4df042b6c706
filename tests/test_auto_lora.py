"""``auto`` with ``lora=True``: every matrix stored as low-rank factors and no sign part, so that
``export_lora`` writes the stored factors and the adapter is the delta (many deltas served as
LoRA adapters on one vLLM, tests/vllm_serving); ``max_rank`` caps every record's rank."""

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
from deltahub import DeltaModel
from deltahub.format import DeltaReader

from model_pairs import load, make_pair, tokens

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A Llama fine-tune whose norms are the base's: what a LoRA adapter can hold whole."""
    root = tmp_path_factory.mktemp("auto-lora")
    base, ft = make_pair("llama", root)
    out = root / "ft-2d"
    shutil.copytree(ft, out)
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    save_file({k: (b[k] if v.dim() <= 1 else v) for k, v in f.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return base, out


def _matrix_records(path):
    reader = DeltaReader(path)
    return {n: r for n, r in reader.records.items() if len(r["shape"]) == 2 and r["kind"] == "compressed"}


def test_lora_auto_stores_only_factors_and_exports_exactly(pair, tmp_path):
    base, ft = pair
    # lowrank_above=1: without lora, auto would store every matrix sparse (the next test).
    result = deltahub.compress(base, ft, tmp_path / "d", method="auto", ratio=1 / 2, params={"lora": True, "lowrank_above": 1.0}, progress=False)
    assert result.ratio <= 1 / 2
    records = _matrix_records(tmp_path / "d")
    assert records and all([c["type"] for c in r["components"]] == ["lowrank"] for r in records.values())
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False)
    assert report.exact and not report.skipped and report.rel_error < 1e-6
    assert {m.source for m in report.modules} == {"factors"}
    # The adapter in PEFT gives the unmerged delta's outputs (float32: only the summation order differs).
    peft_model = peft.PeftModel.from_pretrained(load(base, "llama").float(), tmp_path / "lora").eval()
    ours = DeltaModel.from_pretrained(tmp_path / "d", merge=False, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_without_lora_auto_keeps_sparse_records_that_export_lossily(pair, tmp_path):
    """The same pair without ``lora``: auto's sparse family on some of these deltas, which
    export_lora can only approximate (what ``lora=True`` is for: the test above stores them low rank)."""
    base, ft = pair
    deltahub.compress(base, ft, tmp_path / "d", method="auto", ratio=1 / 2, params={"lowrank_above": 1.0}, progress=False)
    assert any(r["components"][0]["type"] == "sparse" for r in _matrix_records(tmp_path / "d").values())
    assert not deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False).exact


def test_max_rank_caps_every_record_and_the_adapter(pair, tmp_path):
    base, ft = pair
    deltahub.compress(base, ft, tmp_path / "d", method="auto", ratio=1 / 2, params={"lora": True, "max_rank": 3}, progress=False)
    ranks = [c["rank"] for r in _matrix_records(tmp_path / "d").values() for c in r["components"]]
    assert ranks and max(ranks) <= 3
    report = deltahub.export_lora(tmp_path / "d", tmp_path / "lora", progress=False)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert report.exact and cfg["r"] <= 3 and all(r <= 3 for r in cfg["rank_pattern"].values())
    # The report names the vLLM flag that serves it: the smallest --max-lora-rank vLLM accepts above 3.
    assert report.vllm_max_lora_rank == 8 and "--enable-lora --max-lora-rank 8" in str(report)
    # Uncapped, the same budget buys higher ranks somewhere: the cap did something.
    deltahub.compress(base, ft, tmp_path / "free", method="auto", ratio=1 / 2, params={"lora": True}, progress=False)
    assert max(c["rank"] for r in _matrix_records(tmp_path / "free").values() for c in r["components"]) > 3


@pytest.mark.parametrize(
    "params, message",
    [({"lora": "yes"}, "lora must be true or false"), ({"lora": True, "sign_part": "always"}, "no sign part"),
     ({"max_rank": 0}, "max_rank must be a positive integer"), ({"max_rank": 2.5}, "max_rank must be a positive integer")],
)
def test_bad_lora_parameters_are_refused_before_any_work(pair, tmp_path, params, message):
    base, ft = pair
    with pytest.raises(ValueError, match=message):
        deltahub.compress(base, ft, tmp_path / "d", method="auto", ratio=1 / 8, params=params, progress=False)
    assert not (tmp_path / "d").exists()


def test_cli_takes_lora_and_max_rank_as_params(pair, tmp_path):
    base, ft = pair
    run = CliRunner().invoke(app, ["compress", str(base), str(ft), str(tmp_path / "d"), "-p", "lora=true", "-p", "max_rank=4", "--ratio", "1/2", "--json"])
    assert run.exit_code == 0, run.output
    ranks = [c["rank"] for r in _matrix_records(tmp_path / "d").values() for c in r["components"]]
    assert ranks and max(ranks) <= 4
    assert all([c["type"] for c in r["components"]] == ["lowrank"] for r in _matrix_records(tmp_path / "d").values())
    run = CliRunner().invoke(app, ["export-lora", str(tmp_path / "d"), str(tmp_path / "lora")])
    assert run.exit_code == 0 and "exact" in run.output, run.output
