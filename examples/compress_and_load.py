"""Compress a fine-tune, inspect it, load it with DeltaModel.from_pretrained, generate, apply it.

Runs offline in about a minute: it builds a small Llama-style base, fine-tunes it for a few
steps, and works on those two folders. With network, pass Hub ids instead, for example:

    BASE = "Qwen/Qwen2.5-0.5B"
    FINETUNED = "Qwen/Qwen2.5-0.5B-Instruct"

Run: python examples/compress_and_load.py [--base BASE --finetuned FINETUNED]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import deltahub
from deltahub import DeltaModel


def make_local_pair(root: Path) -> tuple[Path, Path]:
    """A 4-layer Llama base and a fine-tune of it (20 AdamW steps on a repeating pattern)."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(root / "base")
    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pattern = torch.arange(32).repeat(2)
    for _ in range(20):
        batch = torch.stack([pattern.roll(int(s)) for s in torch.randint(0, 32, (4,))])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16).save_pretrained(root / "finetuned")
    return root / "base", root / "finetuned"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model folder or Hub id (default: build a small one)")
    parser.add_argument("--finetuned", help="fine-tuned model folder or Hub id")
    parser.add_argument("--ratio", default=1 / 8, type=float)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deltahub-example-"))
    base, finetuned = (args.base, args.finetuned) if args.base else make_local_pair(work)

    # 1. Compress: streams both checkpoints one tensor at a time.
    result = deltahub.compress(base, finetuned, work / "delta", method="dqrelo", ratio=args.ratio)
    print(result)

    # 2. Inspect: reads delta_config.json only (on a Hub id, no shard is downloaded).
    info = deltahub.info(work / "delta")
    print("method:", info.config["method"]["name"], "| stored ratio:", info.config["totals"]["ratio"])
    for row in info.tensors[:4]:
        print(f"  {row.name:45s} {row.kind:10s} {'+'.join(row.components):14s} ratio {row.ratio:.4f}")

    # 3. Load: base (recorded in the delta) + decoded delta, placed by accelerate.
    model = DeltaModel.from_pretrained(work / "delta", device_map="auto")
    prompt = torch.arange(8).unsqueeze(0).to(model.device)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    print("generated token ids:", out[0].tolist())

    # 4. Apply: the full fine-tuned checkpoint, loadable by transformers or vLLM.
    full = deltahub.apply(work / "delta", work / "full")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(full, device_map="auto")
    same = torch.equal(reloaded.generate(prompt, max_new_tokens=12, do_sample=False), out)
    print(f"applied checkpoint at {full}: generates the same tokens: {same}")


if __name__ == "__main__":
    main()
