"""Serve several fine-tunes on one base: unmerged deltas, hot swap, a mixed batch, LoRA export.

Runs offline in a minute or two: it builds a small Llama-style base, fine-tunes it twice on two
different token patterns, compresses both fine-tunes, then serves both deltas on one copy of
the base. With network, pass a Hub base and deltas made against it instead:

    python examples/serve_many.py --base HuggingFaceTB/SmolLM2-135M --deltas user/math-delta user/code-delta

Run: python examples/serve_many.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import deltahub
from deltahub import DeltaModel


def make_local_deltas(root: Path) -> tuple[Path, list[Path]]:
    """A 4-layer Llama base, two fine-tunes of it (ascending and descending token runs), their deltas."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.to(torch.bfloat16).save_pretrained(root / "base")
    deltas = []
    for name, pattern, method in (("up", torch.arange(32), "dqrelo"), ("down", torch.arange(32).flip(0), "svd")):
        model = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(20):
            batch = torch.stack([pattern.repeat(2).roll(int(s)) for s in torch.randint(0, 32, (4,))])
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        model.to(torch.bfloat16).save_pretrained(root / f"ft-{name}")
        result = deltahub.compress(root / "base", root / f"ft-{name}", root / f"delta-{name}", method=method, ratio=1 / 8, progress=False)
        print(f"compressed {name}: {result}")
        deltas.append(root / f"delta-{name}")
    return root / "base", deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model folder or Hub id (default: build a small one)")
    parser.add_argument("--deltas", nargs="*", help="delta folders or Hub ids made against --base")
    args = parser.parse_args()
    if args.base and not args.deltas:
        parser.error("--base needs --deltas: one or more deltas made against it")
    work = Path(tempfile.mkdtemp(prefix="deltahub-serve-"))
    if args.base:
        base, deltas = args.base, list(args.deltas)
    else:
        base, deltas = make_local_deltas(work)
    torch.set_grad_enabled(False)

    # One base in memory; each delta adds only its compressed operators.
    model = DeltaModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(base))
    names = [f"d{i}" for i in range(len(deltas))]
    for name, delta in zip(names, deltas):
        loaded = model.load_delta(delta, name=name)
        print(f"loaded {delta} as {name!r}: {loaded.nbytes / 1e6:.2f} MB of operators (delta stored: {(loaded.stored_bytes or 0) / 1e6:.2f} MB)")
    params = sum(p.numel() * p.element_size() for p in model.base_model.parameters())
    print(f"base weights {params / 1e6:.1f} MB + all deltas {model.delta_nbytes() / 1e6:.1f} MB")

    prompt = torch.tensor([[5, 6, 7, 8]])
    for name in names:
        model.set_delta(name)  # hot swap: nothing is reloaded
        print(f"{name}: {model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()}")
    with model.disable_delta():
        print(f"base: {model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()}")

    # One forward pass, one delta per row (None: the plain base).
    rows = names + [None]
    batch = prompt.repeat(len(rows), 1)
    out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=8, do_sample=False, delta_names=rows)
    for name, seq in zip(rows, out):
        print(f"mixed batch, row with {name or 'the base'}: {seq.tolist()}")

    # A delta as a PEFT LoRA adapter (exact for svd deltas).
    report = deltahub.export_lora(deltas[-1], work / "lora", progress=False)
    print(report)
    try:
        import peft
    except ImportError:
        print("(pip install peft to load the adapter)")
    else:
        peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), work / "lora")
        print(f"PEFT with the adapter: {peft_model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()}")

    # Fold one delta in and get a plain transformers model back.
    model.set_delta(names[0])
    merged = model.merge_and_unload()
    print(f"merged {names[0]}: {type(merged).__name__}, {merged.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()}")
    print(f"files in {work}")


if __name__ == "__main__":
    main()
