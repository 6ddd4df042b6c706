"""A deltahub delta served by vLLM straight from the delta repo (the ``deltahub`` load and config
formats of deltahub/integrations/vllm.py, found through the ``vllm.general_plugins`` entry point)
gives the same greedy tokens and the same log-probabilities as vLLM serving ``deltahub apply``'s
checkpoint. Runs in the vLLM environment only (tools/test_vllm.sh); every engine starts in a
subprocess of its own, as vLLM's spawned workers want."""

from __future__ import annotations

import pytest
import torch

import deltahub
from engines import serve_once, tiny_llama, tokenizer

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny bf16 Llama, a fine-tune of it (every weight moved), their delta at 1/4 and the
    checkpoint `deltahub apply` writes; and a lossless chain member on top of the delta."""
    root = tmp_path_factory.mktemp("vllm")
    tok = tokenizer()
    model = tiny_llama(tok)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                d = torch.randn(p.shape[0], 8, generator=g) @ torch.randn(8, p.shape[1], generator=g)
                p.add_((d / d.norm() * p.float().norm() * 0.1).to(p.dtype))
            else:
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    model.save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    deltahub.compress(root / "base", root / "ft", root / "delta", ratio=1 / 4, progress=False)
    deltahub.apply(root / "delta", root / "applied", progress=False)
    return root


def test_a_delta_serves_as_its_applied_checkpoint(models):
    applied = serve_once(models / "applied")
    delta = serve_once(models / "delta", "deltahub")
    assert delta["tokens"] == applied["tokens"]
    assert delta["logprobs"] == applied["logprobs"]  # bit for bit: the same weights reach vLLM
    # The plugin's loader ran in the worker process of vLLM's multiprocess executor (the one vLLM uses on a CPU).
    assert any(line.startswith("(Worker pid=") and "deltahub:" in line and "decoded and loaded" in line for line in delta["log"].splitlines()), delta["log"][-3000:]
    assert "multiproc_executor.py" in delta["log"]
    print(f"startup: applied {applied['startup_s']} s, delta {delta['startup_s']} s")


def test_two_tensor_parallel_ranks_each_load_the_delta(models):
    """Tensor parallel size 2 under the multiprocess executor: each rank decodes the delta and
    vLLM takes its slice; the output is the applied checkpoint's at two ranks too (not at one:
    the all-reduce sums in another order, and a tiny random model's greedy path is chaotic)."""
    reference = serve_once(models / "applied", env={"TP": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    tp2 = serve_once(models / "delta", "deltahub", env={"TP": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    loads = [l for l in tp2["log"].splitlines() if "deltahub:" in l and "decoded and loaded" in l]
    assert len(loads) == 2, tp2["log"][-3000:]  # one per rank
    assert tp2["tokens"] == reference["tokens"] and tp2["logprobs"] == reference["logprobs"]


def test_a_version_stored_against_its_parent_serves_through_its_chain(models):
    """A lossless chain member on top of the 1/4 delta: vLLM serves it as the checkpoint it stores."""
    from safetensors.torch import load_file, save_file

    ft2 = models / "ft2"
    if not ft2.exists():
        import shutil

        shutil.copytree(models / "applied", ft2)
        weights = load_file(ft2 / "model.safetensors")
        g = torch.Generator().manual_seed(2)
        for name, t in weights.items():  # a few training steps later: some values move
            if t.ndim == 2:
                mask = torch.rand(t.shape, generator=g) < 0.05
                weights[name] = torch.where(mask, (t.float() * 1.01).to(t.dtype), t)
        save_file(weights, ft2 / "model.safetensors", metadata={"format": "pt"})
        deltahub.compress(None, ft2, models / "member", parent=models / "delta", ratio=None, progress=False)
    served = serve_once(models / "member", "deltahub")
    reference = serve_once(ft2)
    assert served["tokens"] == reference["tokens"] and served["logprobs"] == reference["logprobs"]


def test_a_delta_on_the_hub_serves_by_its_id_at_a_revision(models, hub, tmp_path):
    """``LLM(model="org/delta", revision="v1", load_format="deltahub", ...)`` against the local Hub
    test double: vLLM's process downloads the delta and the base it records (a Hub id) into an
    empty cache, and serves the version asked for, not the newest."""
    from huggingface_hub import HfApi

    from conftest import HUB_TOKEN

    api = HfApi(token=HUB_TOKEN)
    api.create_repo("tester/vllm-base")
    api.upload_folder(repo_id="tester/vllm-base", folder_path=str(models / "base"))
    for ratio, name in ((1 / 4, "hub-v1"), (1 / 2, "hub-v2")):
        deltahub.compress(models / "base", models / "ft", models / name, ratio=ratio, base_id="tester/vllm-base", token=HUB_TOKEN, progress=False)
        deltahub.push(models / name, "tester/vllm-delta", token=HUB_TOKEN)
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": HUB_TOKEN}
    served = serve_once("tester/vllm-delta", "deltahub", env=env, revision="v1")
    reference = serve_once(models / "applied")  # the 1/4 delta's checkpoint: v1's
    assert served["tokens"] == reference["tokens"] and served["logprobs"] == reference["logprobs"]
    assert (tmp_path / "hf-home" / "hub" / "models--tester--vllm-base").is_dir()  # the base came from the Hub too


def test_a_delta_for_another_base_is_refused_with_deltahubs_error(models, tmp_path):
    """The loader's ``base`` option pointing at another model: vLLM does not start, and its log
    carries deltahub's BaseMismatchError, which names the recorded base."""
    other = tiny_llama(tokenizer(), seed=1)
    other.save_pretrained(tmp_path / "other-base")
    failed = serve_once(models / "delta", "deltahub", check=False, base=str(tmp_path / "other-base"))
    assert failed["returncode"] != 0 and not failed.get("tokens")
    assert "BaseMismatchError" in failed["log"] and str(models / "base") in failed["log"], failed["log"][-4000:]


def test_two_pipeline_stages_each_decode_only_their_layers(models):
    """Pipeline parallel size 2 under the multiprocess executor: each stage decodes the tensors of
    its own decoder layers (and the embeddings and norms), not the other stage's, and holds the
    applied checkpoint's weights bit for bit. (Weights, not generation: vllm-cpu 0.32 cannot
    generate at two pipeline stages, with any checkpoint: the second stage's worker fails an
    ``intermediate_tensors`` assertion.)"""
    env = {"PP": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    reference = serve_once(models / "applied", env=env, digests="")
    pp2 = serve_once(models / "delta", "deltahub", env=env, digests="")
    loads = [l for l in pp2["log"].splitlines() if "deltahub:" in l and "decoded and loaded" in l]
    assert len(loads) == 2 and all("of other pipeline stages not decoded here" in l for l in loads), pp2["log"][-3000:]
    assert len(pp2["digests"]) == 2 and all(pp2["digests"]) and pp2["digests"] == reference["digests"]


def test_a_finetuned_config_larger_than_the_delta_is_refused_before_vllm_allocates(models, tmp_path):
    """vLLM builds the model the config describes before any loader runs: a hostile
    ``intermediate_size`` would allocate terabytes. The config format refuses it with deltahub's
    message, naming the file, as deltahub's own loaders do."""
    import json
    import shutil

    bad = tmp_path / "huge"
    shutil.copytree(models / "delta", bad)
    cfg = json.loads((bad / "finetuned_config.json").read_text())
    cfg["intermediate_size"] = 2_000_000_000
    (bad / "finetuned_config.json").write_text(json.dumps(cfg))
    failed = serve_once(bad, "deltahub", check=False)
    assert failed["returncode"] != 0 and not failed.get("tokens")
    # vLLM wraps the parser's error in its own (pydantic) one, with deltahub's message whole.
    assert "finetuned_config.json: the model it describes holds" in failed["log"] and "does not describe these weights" in failed["log"], failed["log"][-4000:]
    assert "can't allocate memory" not in failed["log"]
