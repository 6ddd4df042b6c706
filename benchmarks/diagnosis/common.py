"""What every diagnosis script loads: the knowledge pair, its exact deltas, a float32 base model
whose weights are set to base + any delta, and the tensors' groups."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.knowledge_pair import knowledge_path
from benchmarks.real_pair import base_path

torch.set_grad_enabled(False)
ftp, bp = knowledge_path(), base_path()
ft = load_file(str(ftp / "model.safetensors"))
base = load_file(str(bp / "model.safetensors"))
tok = AutoTokenizer.from_pretrained(ftp)
model = AutoModelForCausalLM.from_pretrained(bp).float().eval()
params = dict(model.named_parameters())
exact = {k: ft[k].float() - base[k].float() for k in base}


def group(k: str) -> str:
    """embed, attn (q/k/v/o projections), mlp (gate/up/down) or norm."""
    if "embed" in k:
        return "embed"
    if "layers" in k:
        part = k.split(".")[-2]
        if part.endswith("proj"):
            return "attn" if part[0] in "qkvo" else "mlp"
    return "norm"


def layer(k: str) -> int:
    return int(k.split(".")[2]) if "layers" in k else -1


def set_deltas(deltas: dict) -> None:
    """The model's weights become base + ``deltas`` (float32)."""
    for k, p in params.items():
        p.copy_(base[k].float() + deltas[k].float())
