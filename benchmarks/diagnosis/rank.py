# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
from benchmarks.diagnosis.common import base, exact, ft, group, layer, model, params, set_deltas, tok, bp, ftp  # noqa: F401
import torch, time, sys
from benchmarks.knowledge_pair import score, facts, problems
svds={k: torch.linalg.svd(v, full_matrices=False) for k,v in exact.items() if v.ndim==2}
def run(deltas, label):
    set_deltas(deltas)
    f,_=score(model,tok,facts()); s,nll=score(model,tok,problems()[1])
    print(f"{label:40s} facts {f:.3f} skill {s:.3f} nll {nll:.4f}", flush=True)
def trunc(k,r):
    u,s,vh=svds[k]; return (u[:,:r]*s[:r])@vh[:r]
sel=sys.argv[1]
for r in (8,16,32,64,128):
    run({k:(trunc(k,r) if (sel in k and k in svds) else exact[k]) for k in base}, f"{sel} rank {r}")
# energy share of top r
for k in ['model.layers.3.mlp.up_proj.weight','model.layers.3.mlp.down_proj.weight','model.layers.3.self_attn.q_proj.weight','model.embed_tokens.weight']:
    s=svds[k][1]; e=(s**2).cumsum(0)/(s**2).sum(); print(k, [round(float(e[r-1]),3) for r in (8,16,32,64,128,256)])
