"""A deltahub delta served by vLLM straight from the delta repo (the ``deltahub`` load and config
formats of deltahub/integrations/vllm.py, found through the ``vllm.general_plugins`` entry point)
gives the same greedy tokens and the same log-probabilities as vLLM serving ``deltahub apply``'s
checkpoint. Runs in the vLLM environment only (tools/test_vllm.sh); every engine starts in a
subprocess of its own, as vLLM's spawned workers want."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltahub

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _tokenizer():
    """A byte-level BPE trained offline on deltahub's README (no tokenizer download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(HERE.parents[1] / "README.md").read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny bf16 Llama, a fine-tune of it (every weight moved), their delta at 1/4 and the
    checkpoint `deltahub apply` writes; and a lossless chain member on top of the delta."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vllm")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
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


def _serve(model: Path, fmt: str | None = None, **env: str) -> dict:
    cmd = [sys.executable, str(HERE / "serve_once.py"), str(model)] + ([fmt] if fmt else [])
    run = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **env}, timeout=600)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return {**json.loads(lines[-1][len("RESULT "):]), "log": run.stdout + run.stderr}


def test_a_delta_serves_as_its_applied_checkpoint(models):
    applied = _serve(models / "applied")
    delta = _serve(models / "delta", "deltahub")
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
    reference = _serve(models / "applied", TP="2", VLLM_CPU_OMP_THREADS_BIND="0|1")
    tp2 = _serve(models / "delta", "deltahub", TP="2", VLLM_CPU_OMP_THREADS_BIND="0|1")
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
    served = _serve(models / "member", "deltahub")
    reference = _serve(ft2)
    assert served["tokens"] == reference["tokens"] and served["logprobs"] == reference["logprobs"]
