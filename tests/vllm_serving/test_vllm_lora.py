"""Many deltas on one vLLM: deltas made with ``auto``'s ``lora=True`` export exactly as LoRA
adapters (``export_lora``), and a real OpenAI-compatible vLLM server (``--enable-lora``, each
adapter a ``--lora-modules`` entry) answers requests from the ``openai`` client, each request's
``model`` picking a delta. Each delta's greedy tokens equal those of its merged model
(``deltahub apply``'s checkpoint) and so do its log-probabilities, up to float32 summation order.

float32 throughout: LoRA serving computes ``x·W + (x·A)·B`` where the merged model computes
``x·(W + B·A)``, and in bfloat16 the two round differently; in float32 the difference is ~1e-6,
so a token that differs would mean the adapter is not the delta."""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import deltahub
from engines import openai_server, tiny_llama, tokenizer

from serve_once import PROMPTS

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A float32 tiny Llama and three fine-tunes of its linear layers (embeddings and norms as
    the base's, as a LoRA adapter can hold them), each stored with ``auto`` at 1/2 with
    ``lora=True, max_rank=16``, exported as LoRA, and applied."""
    root = tmp_path_factory.mktemp("lora-fleet")
    tok = tokenizer()
    model = tiny_llama(tok, torch.float32)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(TENANTS):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(base_state[pname])
                if p.ndim == 2 and "proj" in pname:  # the linear layers only
                    low = torch.randn(p.shape[0], 6, generator=g) @ torch.randn(6, p.shape[1], generator=g)
                    d = low / low.norm() * p.norm() * 0.15 + torch.randn(p.shape, generator=g) * float(p.std()) * 0.01
                    p.add_(d)
        model.save_pretrained(root / f"{name}-ft")
        deltahub.compress(root / "base", root / f"{name}-ft", root / name, method="auto", ratio=1 / 2,
                          params={"lora": True, "max_rank": 16}, progress=False)
        report = deltahub.export_lora(root / name, root / f"{name}-lora", progress=False)
        assert report.exact and not report.skipped and report.vllm_max_lora_rank == 16, str(report)
        deltahub.apply(root / name, root / f"{name}-applied", progress=False)
    return root


@torch.no_grad()
def _greedy(path, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """The merged model's greedy continuation and each chosen token's logprob, with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, out, logprobs = list(prompt_ids), [], []
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        t = int(lp.argmax())
        out.append(t)
        logprobs.append(float(lp[t]))
        ids.append(t)
    return out, logprobs


def _ids(tokens: list[str]) -> list[int]:
    """``return_tokens_as_token_ids`` gives tokens as ``token_id:N``."""
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":", 1)[1]) for t in tokens]


def test_one_server_serves_each_delta_as_a_lora_through_the_openai_client(fleet, tmp_path):
    from openai import OpenAI

    tok = tokenizer()
    prompts = [tok(p).input_ids for p in PROMPTS]
    want = {name: [_greedy(fleet / f"{name}-applied", ids) for ids in prompts] for name in TENANTS}
    want["base"] = [_greedy(fleet / "base", ids) for ids in prompts]
    # The deltas differ from each other and from the base: a request served by the wrong one would show.
    assert len({json_tokens for json_tokens in (str([w[0] for w in v]) for v in want.values())}) == len(want)

    args = ["--model", str(fleet / "base"), "--served-model-name", "base", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--max-num-seqs", "8", "--seed", "0", "--enable-lora", "--max-loras", "4",
            "--max-lora-rank", "16", "--lora-modules", *[f"{n}={fleet / f'{n}-lora'}" for n in TENANTS]]
    with openai_server(args, tmp_path / "server.log") as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {"base", *TENANTS}

        def ask(job):
            name, i = job
            r = client.completions.create(model=name, prompt=prompts[i], max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1,
                                          extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            return job, _ids(r.choices[0].logprobs.tokens), r.choices[0].logprobs.token_logprobs

        # All twelve requests at once: the engine batches rows of different adapters, and of the
        # base, together. vLLM 0.32's CPU LoRA kernels give a row without an adapter the adapter
        # of the last slot (vllm-project/vllm#49656); --max-loras one above the adapters in use
        # keeps that slot empty, so base rows are right (README, "Many deltas on one vLLM").
        jobs = [(name, i) for name in (*TENANTS, "base") for i in range(len(prompts))]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
    for (name, i), tokens, logprobs in answers:
        want_tokens, want_logprobs = want[name][i]
        assert tokens == want_tokens, (name, i)
        assert all(math.isclose(a, b, abs_tol=2e-3) for a, b in zip(logprobs, want_logprobs)), (name, i, logprobs, want_logprobs)
    # Every adapter was loaded by the server from its folder.
    log = (tmp_path / "server.log").read_text()
    assert all(n in log for n in TENANTS), log[-3000:]
