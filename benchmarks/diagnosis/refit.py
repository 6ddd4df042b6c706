# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
from benchmarks.diagnosis.common import base, exact, ft, group, layer, model, params, set_deltas, tok, bp, ftp  # noqa: F401
import torch, sys
import deltahub
from deltahub.format.quant import quantize_groups, dequantize_groups
from benchmarks.knowledge_pair import score, facts, problems
r=deltahub.DeltaReader(sys.argv[1])
plan={}
for k,rec in r.records.items():
    comps=rec.get('components') or []
    lr=[c for c in comps if c['type']=='lowrank']
    if lr and len(comps)==1: plan[k]=[(s['start'],s['end'],s['bits']) for s in lr[0]['u']]
print(len(plan),'lowrank tensors')
def q(x, segs):  # x [r, L] vectors
    out=x.clone()
    for a,b,bits in segs:
        g=quantize_groups(x[a:b],bits,128); out[a:b]=dequantize_groups(g.codes,g.scale,g.zero,128)
    return out
def build(mode):
    d={}
    for k in base:
        if k not in plan: d[k]=exact[k]; continue
        segs=plan[k]; rank=segs[-1][1]
        D=exact[k].double()
        U,S,Vh=torch.linalg.svd(D,full_matrices=False)
        U,S,V=U[:,:rank],S[:rank],Vh[:rank].T
        if mode=='float': d[k]=((U*S)@V.T).float(); continue
        if mode.startswith('sign'):
            P,Q=D.shape
            def cost(b): return (P+Q)*b/8 + (-(-P//128)-(-Q//128))*(3 if b>1 else 2)+4
            r1=min(int(rank*cost(2)/cost(1)), min(P,Q))
            U2,S2,Vh2=torch.linalg.svd(D,full_matrices=False)
            U1,S1,V1=U2[:,:r1],S2[:r1],Vh2[:r1].T
            def sq(x):  # x [L, r] columns are vectors; groups of 128 along L
                L,R=x.shape; out=torch.empty_like(x)
                for g0 in range(0,L,128):
                    blk=x[g0:g0+128]
                    if mode=='sign_shrunk': a=blk.abs().mean(0,keepdim=True)
                    else: a=(blk**2).sum(0,keepdim=True)/blk.abs().sum(0,keepdim=True).clamp(min=1e-30)
                    out[g0:g0+128]=a*torch.sign(blk)
                return out
            d[k]=((sq(U1)*S1)@sq(V1).T).float(); continue
        Uq=q(U.T.float(),segs).T.double()
        if mode=='rtn': Vq=q(V.T.float(),segs).T.double(); d[k]=((Uq*S)@Vq.T).float(); continue
        # refit: V*S = lstsq(Uq, D)
        VS=torch.linalg.lstsq(Uq, D).solution.T  # [q, r]
        Vn=VS/S  # keep S
        Vq=q(Vn.T.float(),segs).T.double()
        d[k]=((Uq*S)@Vq.T).float()
    return d
def run(deltas, label):
    set_deltas(deltas)
    f,_=score(model,tok,facts()); s_,nll=score(model,tok,problems()[1])
    num=sum(float((deltas[k]-exact[k]).pow(2).sum()) for k in plan); den=sum(float(exact[k].pow(2).sum()) for k in plan)
    print(f"{label:20s} facts {f:.3f} skill {s_:.3f} nll {nll:.4f} relerr {(num/den)**0.5:.4f}", flush=True)
for mode in sys.argv[2].split(','):
    run(build(mode), mode)
