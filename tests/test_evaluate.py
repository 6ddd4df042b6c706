"""deltahub eval: per-tensor errors, NLL, perplexity and retention on a text."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

import deltahub
from cli.main import app
from deltahub.demo import build_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    base, ft = build_pair(work, base_steps=6, finetune_steps=6, progress=False)
    return base, ft, work


def test_lossless_keeps_everything_and_lossy_keeps_less(pair):
    base, ft, work = pair
    deltahub.compress(base, ft, work / "lossless", method="lossless", ratio=None, progress=False)
    from deltahub.demo import DATA

    text = (DATA / "austen_finetune_excerpt.txt").read_text()[:4000]  # what the fine-tune trained on
    report = deltahub.evaluate(work / "lossless", ft, text=text, max_tokens=300, progress=False)
    assert all(t.rel_error == 0 for t in report.tensors) and report.total_rel_error == 0
    s = report.text
    assert s.tokens == 300 and s.nll_delta == s.nll_finetuned and s.retention == 1.0
    assert s.nll_finetuned < s.nll_base  # the fine-tune learned something the base did not
    assert math.isclose(s.ppl_base, math.exp(s.nll_base))

    deltahub.compress(base, ft, work / "svd", method="svd", ratio=1 / 16, progress=False)
    lossy = deltahub.evaluate(work / "svd", ft, text=text, max_tokens=300, progress=False)
    compressed = [t for t in lossy.tensors if t.kind == "compressed"]
    assert compressed and all(0 < t.rel_error < 1 for t in compressed)
    assert lossy.worst(3)[0].rel_error == max(t.rel_error for t in lossy.tensors)
    assert lossy.text.retention < 1.0


def test_eval_cli_json_and_table(pair, tmp_path):
    base, ft, work = pair
    deltahub.compress(base, ft, tmp_path / "d", method="dqrelo", ratio=1 / 4, progress=False)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 8)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tmp_path / "d"), "--finetuned", str(ft), "--text", str(text), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data["text"]) >= {"nll_base", "nll_finetuned", "nll_delta", "ppl_delta", "retention"}
    assert data["worst"] and data["total_rel_error"] > 0
    r = runner.invoke(app, ["eval", str(tmp_path / "d"), "--finetuned", str(ft), "--tensors-only"])
    assert r.exit_code == 0 and "relative error of the whole delta" in r.output and "retention" not in r.output


def test_without_the_finetune_scores_base_and_base_plus_delta_only(pair):
    """Someone who only pulled a delta: NLL of base and base + delta, and nothing that needs the fine-tune."""
    base, ft, work = pair
    deltahub.compress(base, ft, work / "svd-nf", method="svd", ratio=1 / 8, progress=False)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 6
    full = deltahub.evaluate(work / "svd-nf", ft, text=text, max_tokens=200, progress=False)
    alone = deltahub.evaluate(work / "svd-nf", text=text, max_tokens=200, progress=False)
    assert alone.finetuned is None and alone.tensors == [] and alone.total_rel_error is None and alone.mean_rel_error is None
    s = alone.text
    assert s.nll_finetuned is None and s.ppl_finetuned is None and s.retention is None
    # the same tokens and the same two models as the full evaluation
    assert s.tokens == full.text.tokens and s.nll_base == full.text.nll_base and s.nll_delta == full.text.nll_delta
    assert s.nll_delta != s.nll_base
    data = alone.to_dict()
    assert data["finetuned"] is None and data["total_rel_error"] is None and data["worst"] is None and data["tensors"] is None
    assert data["text"]["retention"] is None and data["text"]["nll_finetuned"] is None and data["text"]["ppl_delta"] > 0
    json.dumps(data)  # JSON-serializable as it is
    out = str(alone)
    assert "not measured" in out and "--finetuned" in out and "base + delta" in out and "fine-tune " not in out and "PR =" not in out
    assert "PR =" in str(full) and "relative error of the whole delta" in str(full)


def test_without_the_finetune_the_base_is_still_checked(pair):
    """With no tensor pass to compare against, a wrong base is refused before any model runs."""
    base, ft, work = pair
    deltahub.compress(base, ft, work / "chk", method="svd", ratio=1 / 8, progress=False)
    with pytest.raises(deltahub.errors.BaseMismatchError):
        deltahub.evaluate(work / "chk", base=ft, text="a few words " * 20, max_tokens=50, progress=False)
    with pytest.raises(ValueError, match="nothing to measure"):
        deltahub.evaluate(work / "chk", with_text=False, progress=False)


def test_eval_cli_without_finetuned(pair, tmp_path):
    """`deltahub eval DELTA` in a real process, output piped: base against base + delta, no PR."""
    import subprocess
    import sys

    base, ft, work = pair
    deltahub.compress(base, ft, tmp_path / "d", method="svd", ratio=1 / 8, progress=False)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 4)
    cmd = [sys.executable, "-m", "deltahub", "eval", str(tmp_path / "d"), "--text", str(text), "--max-tokens", "100"]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["finetuned"] is None and data["total_rel_error"] is None and data["text"]["retention"] is None
    assert data["text"]["nll_finetuned"] is None and data["text"]["nll_base"] > 0 and data["text"]["nll_delta"] > 0
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "not measured" in r.stdout and "base + delta" in r.stdout and "retention PR" not in r.stdout


def test_without_any_tokenizer_the_error_says_so(tmp_path):
    """A pair whose folders hold no tokenizer files: scoring a text is refused with the cause, not
    transformers' advice to install sentencepiece; the tensors alone still measure."""
    from model_pairs import make_pair

    base, ft = make_pair("llama", tmp_path)
    assert not list(base.glob("tokenizer*")) and not list(ft.glob("tokenizer*"))
    delta = deltahub.compress(base, ft, tmp_path / "d", method="dense", ratio=None, progress=False).path
    with pytest.raises(deltahub.DeltahubError, match="neither the fine-tune, the delta nor the base has tokenizer files"):
        deltahub.evaluate(delta, ft, text="a few words " * 20, max_tokens=50, progress=False)
    assert deltahub.evaluate(delta, ft, with_text=False, progress=False).text is None
