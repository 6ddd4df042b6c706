"""Tiny base/fine-tune pairs of several architectures, fine-tuned for a few real optimizer steps
so their deltas have the structure real fine-tunes have (not random noise)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

VOCAB = 160


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    return {
        "llama": (transformers.LlamaConfig(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=False, **common), transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True, **common), transformers.Qwen2ForCausalLM),
        "qwen3_moe": (
            transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False, **common),
            transformers.Qwen3MoeForCausalLM,
        ),
        "gpt2": (transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True), transformers.GPT2LMHeadModel),
        "bert": (transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, max_position_embeddings=64), transformers.BertForMaskedLM),
    }


ARCHS = list(_configs())


def build(arch: str, seed: int = 0):
    config, cls = _configs()[arch]
    torch.manual_seed(seed)
    return cls(config)


def finetune(model, steps: int = 4, lr: float = 3e-3, seed: int = 1) -> None:
    """A few AdamW steps on a fixed token pattern, so the delta is learned, not random."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randint(0, VOCAB // 2, (4, 24), generator=g) * 2  # even tokens only: a learnable bias
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def save(model, path: Path, dtype: torch.dtype, fused: bool = False) -> Path:
    """``save_pretrained`` in ``dtype``; ``fused=True`` writes the in-memory state dict as is
    (3-D expert tensors), the layout some MoE checkpoints ship in."""
    model = model.to(dtype)
    if fused:
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(path)
    else:
        model.save_pretrained(path)
    model.float()
    return path


def make_pair(arch: str, root: Path, dtype: torch.dtype = torch.bfloat16, fused: bool = False, grow_vocab: int = 0, steps: int = 4) -> tuple[Path, Path]:
    model = build(arch)
    base = save(model, root / f"{arch}-base", dtype, fused)
    if grow_vocab:
        model.resize_token_embeddings(VOCAB + grow_vocab)
    finetune(model, steps)
    ft = save(model, root / f"{arch}-ft", dtype, fused)
    return base, ft


def load(path: Path, arch: str):
    _, cls = _configs()[arch]
    return cls.from_pretrained(path)


def tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
