"""A generated base/fine-tune pair of several GB, for load and compress benchmarks at scale.

The base is a Llama-shaped bf16 checkpoint of random weights written shard by shard (no model
is ever held in memory); the fine-tune adds to every 2-D weight a delta shaped like a real one
(a decaying spectrum of rank 64 plus dense noise, mean |delta| about 1e-3).

    python -m benchmarks.generated --hidden 2048 --layers 24   # about 3.5 GB per checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_CACHE = Path(os.environ.get("DELTAHUB_CACHE", Path.home() / ".cache" / "deltahub")) / "generated"


def llama_config(hidden: int, layers: int, vocab: int = 32000) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": hidden * 4, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "dtype": "bfloat16",
    }


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _delta(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.randn(shape, generator=g) * 1e-3
    rank = 64
    u = torch.randn(shape[0], rank, generator=g) / math.sqrt(shape[0])
    v = torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])
    spectrum = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.7
    d = (u * spectrum) @ v
    return d / d.abs().mean() * 8e-4 + torch.randn(shape, generator=g) * 4e-4


def build(hidden: int = 2048, layers: int = 24, cache: Path = DEFAULT_CACHE, shard_bytes: int = 2 * 10**9) -> tuple[Path, Path]:
    """Write (or reuse) ``base`` and ``finetuned`` folders; returns their paths."""
    root = cache / f"llama-h{hidden}-l{layers}"
    base, ft = root / "base", root / "finetuned"
    if (base / "model.safetensors.index.json").is_file() and (ft / "model.safetensors.index.json").is_file():
        return base, ft
    cfg = llama_config(hidden, layers)
    shapes = tensor_shapes(cfg)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for kind in ("base", "finetuned"):
        (tmp / kind).mkdir(parents=True)
        (tmp / kind / "config.json").write_text(json.dumps(cfg, indent=2))
    g_base, g_delta = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if size and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for idx, names in enumerate(groups, start=1):
        fname = f"model-{idx:05d}-of-{len(groups):05d}.safetensors"
        b_part, f_part = {}, {}
        for name in names:
            shape = shapes[name]
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g_base) * 0.02
            b_part[name] = w.bfloat16()
            f_part[name] = (w + _delta(shape, g_delta)).bfloat16()
            weight_map[name] = fname
        save_file(b_part, str(tmp / "base" / fname), metadata={"format": "pt"})
        save_file(f_part, str(tmp / "finetuned" / fname), metadata={"format": "pt"})
        del b_part, f_part
    total = sum(2 * math.prod(s) for s in shapes.values())
    for kind in ("base", "finetuned"):
        (tmp / kind / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return base, ft


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()
    b, f = build(args.hidden, args.layers)
    gb = sum(p.stat().st_size for p in b.glob("*.safetensors")) / 1e9
    print(f"base {b}\nfinetuned {f}\n{gb:.2f} GB each")
