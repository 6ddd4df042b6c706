# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
from benchmarks.diagnosis.common import base, exact, ft, group, layer, model, params, set_deltas, tok, bp, ftp  # noqa: F401
import torch
from benchmarks.knowledge_pair import score, facts, problems
E=exact['model.embed_tokens.weight']
m=E.mean(0,keepdim=True)
print("mean-row energy share", float((m.expand_as(E)**2).sum()/(E**2).sum()))
u,s,vh=torch.linalg.svd(E,full_matrices=False)
print("top sv", s[:6].tolist())
print("u1 stats: mean", float(u[:,0].mean()), "std", float(u[:,0].std()), "cos with ones", float(u[:,0].sum()/u[:,0].norm()/E.shape[0]**0.5))
R=E-m
ur,sr,vr=torch.linalg.svd(R,full_matrices=False)
print("residual sv", sr[:6].tolist(), "energy share rank8", float((sr[:8]**2).sum()/(sr**2).sum()))
def run(deltas, label):
    set_deltas(deltas)
    f,_=score(model,tok,facts()); s_,nll=score(model,tok,problems()[1])
    print(f"{label:40s} facts {f:.3f} skill {s_:.3f} nll {nll:.4f}", flush=True)
run({**exact,'model.embed_tokens.weight':m.expand_as(E).clone()}, "embed = mean row only")
run({**exact,'model.embed_tokens.weight':R}, "embed = delta - mean row")
run({**exact,'model.embed_tokens.weight':(u[:,:1]*s[:1])@vh[:1]}, "embed = rank1")
run({**exact,'model.embed_tokens.weight':E-(u[:,:8]*s[:8])@vh[:8]}, "embed = delta - rank8")
