# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
from benchmarks.diagnosis.common import base, exact, ft, group, layer, model, params, set_deltas, tok, bp, ftp  # noqa: F401
import torch, time, sys, json, shutil
from pathlib import Path
import deltahub
from benchmarks.knowledge_pair import score, facts
def run(deltas, label):
    t=time.time()
    set_deltas(deltas)
    f,_=score(model,tok,facts())
    print(f"{label:40s} facts {f:.3f}  ({time.time()-t:.0f}s)", flush=True); return f
spec = sys.argv[1]; ratio=eval(sys.argv[2]); params_m=json.loads(sys.argv[3]) if len(sys.argv)>3 else {}
import hashlib
from benchmarks.pairs import CACHE
out=CACHE/"bench"/"diagnosis"/f"{spec}-{sys.argv[2].replace('/','_')}-{hashlib.sha256((sys.argv[3] if len(sys.argv)>3 else '').encode()).hexdigest()[:8]}"
if not out.exists():
    deltahub.compress(bp, ftp, out, method=spec, ratio=ratio, params=params_m, progress=False)
r=deltahub.DeltaReader(out)
dec={}
for k in base:
    dec[k]=r.decode(k, base[k]).float()-base[k].float()
run(dec, "all compressed")
run({k:(dec[k]*0 if group(k)=="embed" else dec[k]) for k in base}, "embed zero, rest compressed")
run({k:(dec[k]*0 if group(k)=="attn" else dec[k]) for k in base}, "attn zero, rest compressed")
import os
if os.environ.get("QUICK"): raise SystemExit
groups=sorted(set(map(group,base)))
for g in groups:
    run({k:(exact[k] if group(k)==g else dec[k]) for k in base}, f"exact {g}")
for g in groups:
    run({k:(dec[k] if group(k)==g else exact[k]) for k in base}, f"compressed only {g}")
for lo,hi in ((0,10),(10,20),(20,30)):
    run({k:(exact[k] if lo<=layer(k)<hi else dec[k]) for k in base}, f"exact layers {lo}-{hi}")
