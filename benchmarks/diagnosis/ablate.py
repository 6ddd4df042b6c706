# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
import torch, time, sys, json, shutil
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
import deltahub
from benchmarks.knowledge_pair import knowledge_path, evaluate, score, facts
from benchmarks.real_pair import base_path
torch.set_grad_enabled(False)
ftp, bp = knowledge_path(), base_path()
ft = load_file(str(ftp/"model.safetensors")); base = load_file(str(bp/"model.safetensors"))
tok = AutoTokenizer.from_pretrained(ftp)
model = AutoModelForCausalLM.from_pretrained(bp).float().eval()
params = dict(model.named_parameters())
def group(k):
    if 'embed' in k: return 'embed'
    if 'layers' in k:
        part=k.split('.')[-2]
        if part.endswith('proj'): return 'attn' if part[0] in 'qkvo' else 'mlp'
        return 'norm'
    return 'norm'
def run(deltas, label):
    t=time.time()
    for k,p in params.items():
        key=k if k in base else k
        p.copy_(base[k].float()+deltas[k].float())
    f,_=score(model,tok,facts())
    print(f"{label:40s} facts {f:.3f}  ({time.time()-t:.0f}s)", flush=True); return f
exact={k: ft[k].float()-base[k].float() for k in base}
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
def layer(k):
    return int(k.split('.')[2]) if 'layers' in k else -1
for lo,hi in ((0,10),(10,20),(20,30)):
    run({k:(exact[k] if lo<=layer(k)<hi else dec[k]) for k in base}, f"exact layers {lo}-{hi}")
