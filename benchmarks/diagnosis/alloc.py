# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
from benchmarks.diagnosis.common import base, exact, ft, group, layer, model, params, set_deltas, tok, bp, ftp  # noqa: F401
import torch, sys, math
from benchmarks.knowledge_pair import score, facts, problems
mats=[k for k in base if exact[k].ndim==2]
svd={k: torch.linalg.svd(exact[k],full_matrices=False) for k in mats}
dense_bytes=sum(exact[k].numel()*2 for k in base)
def alloc(ratio, weight):
    budget=ratio*dense_bytes - sum(exact[k].numel()*2 for k in base if k not in mats)
    cand=[]
    for k in mats:
        P,Q=exact[k].shape; c=(P+Q)*2/8+(-(-P//128)-(-Q//128))*3+4
        w=weight(k); s=svd[k][1]
        for i in range(len(s)): cand.append((w*float(s[i])**2/c, c, k, i))
    cand.sort(reverse=True)
    rank={k:0 for k in mats}; spent=0
    for g,c,k,i in cand:
        if spent+c>budget: break
        if rank[k]==i: rank[k]+=1; spent+=c
    return rank
def build(rank):
    d=dict(exact)
    for k in mats:
        U,S,Vh=svd[k]; r=rank[k]; d[k]=(U[:,:r]*S[:r])@Vh[:r]
    return d
def run(label, weight, ratio):
    rank=alloc(ratio, weight)
    d=build(rank)
    set_deltas(d)
    f,_=score(model,tok,facts())
    g={gr: sum(rank[k]*(sum(exact[k].shape)) for k in mats if group(k)==gr) for gr in ('embed','attn','mlp')}
    tot=sum(g.values())
    print(f"{label:28s} 1/{round(1/ratio)} facts {f:.3f}  share " + " ".join(f"{a}={b/tot:.2f}" for a,b in g.items()), flush=True)
norms={k: float(exact[k].pow(2).sum()) for k in mats}
bnorm={k: float(base[k].float().pow(2).sum()) for k in mats}
numel={k: exact[k].numel() for k in mats}
W={
 'frobenius': lambda k:1.0,
 'embed x0.1': lambda k:0.1 if group(k)=='embed' else 1.0,
 'attn x0.3': lambda k:0.3 if group(k)=='attn' else 1.0,
 'embed0.1 attn0.3': lambda k:0.1 if group(k)=='embed' else (0.3 if group(k)=='attn' else 1.0),
 'depth early x2': lambda k: 2-layer(k)/29 if layer(k)>=0 else 1.0,
 'relative to delta': lambda k:1/norms[k],
 'relative to base': lambda k:1/bnorm[k],
 'per element rms': lambda k:numel[k]/norms[k],
}
for ratio in map(eval, sys.argv[1].split(',')):
    for name in sys.argv[2].split(',') if len(sys.argv)>2 else W:
        run(name, W[name], ratio)
