# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
import torch
from safetensors.torch import load_file
from benchmarks.knowledge_pair import knowledge_path
from benchmarks.real_pair import base_path, finetuned_path
torch.set_grad_enabled(False)
base = load_file(str(base_path()/"model.safetensors"))
for name, p in (("knowledge", knowledge_path()), ("austen-heavy", finetuned_path("heavy"))):
    ft = load_file(str(p/"model.safetensors"))
    out = {}
    for k in base:
        if base[k].ndim != 2 or 'embed' in k: continue
        d = ft[k].float() - base[k].float()
        s = torch.linalg.svdvals(d)
        e = (s**2).cumsum(0) / (s**2).sum()
        P, Q = d.shape
        # rank affordable at 1/64 and 1/16 at 2-bit prices
        c = (P+Q)*2/8 + (-(-P//128) - (-Q//128))*3 + 4
        for ratio in (1/16, 1/64):
            r = int(P*Q*2*ratio // c)
            out.setdefault((k.split('.')[-2], ratio), []).append(float(e[r-1]))
    for (part, ratio), v in sorted(out.items()):
        if part in ('up_proj', 'down_proj', 'q_proj', 'v_proj'):
            print(f"{name:13s} {part:10s} 1/{round(1/ratio):3d} energy kept at 2-bit affordable rank: mean {sum(v)/len(v):.3f}")
