# One-off diagnosis (issue #20), kept as run: statistics of each pair's deltas by projection type; outputs in benchmarks/results/knowledge-diagnosis.md.
# python -m benchmarks.diagnosis.delta_stats knowledge|heavy
import sys, torch
from safetensors.torch import load_file
from collections import defaultdict
torch.set_grad_enabled(False)
from benchmarks.real_pair import base_path, finetuned_path
from benchmarks.knowledge_pair import knowledge_path
which = sys.argv[1]
bp = base_path()
fp = knowledge_path() if which == "knowledge" else finetuned_path(which)
base = load_file(str(bp / "model.safetensors")); ft = load_file(str(fp / "model.safetensors"))
def group(k):
    if "embed" in k: return "embed"
    if "layers" in k:
        part = k.split(".")[-2]
        if part.endswith("proj"): return part
    return "norm"
agg = defaultdict(list)
for k in base:
    if base[k].dim() != 2: continue
    d = ft[k].float() - base[k].float(); b = base[k].float()
    g = group(k)
    rel = (d.norm() / b.norm()).item()
    s = torch.linalg.svdvals(d) ** 2
    e = s / s.sum()
    n = min(d.shape)
    top = lambda f: e[: max(1, int(f * n))].sum().item()
    kurt = (((d - d.mean()) / d.std()) ** 4).mean().item()
    srank = (s.sum() / s[0]).item()
    # row / col norm concentration: share of energy in the top 5% rows/cols
    rows = (d ** 2).sum(1); cols = (d ** 2).sum(0)
    rconc = rows.sort(descending=True).values[: max(1, len(rows) // 20)].sum().item() / rows.sum().item()
    cconc = cols.sort(descending=True).values[: max(1, len(cols) // 20)].sum().item() / cols.sum().item()
    # effective rank (entropy)
    erank = torch.exp(-(e * torch.log(e.clamp_min(1e-30))).sum()).item() / n
    agg[g].append((rel, top(0.05), top(0.1), top(0.2), kurt, srank / n, erank, rconc, cconc))
print(f"{which}: group  n  relRMS  top5%  top10%  top20%  kurt  srank/n  erank/n  rowconc colconc")
for g, rows in agg.items():
    m = torch.tensor(rows).mean(0).tolist()
    print(f"{g:8s} {len(rows):3d} " + " ".join(f"{x:7.4f}" for x in m))
