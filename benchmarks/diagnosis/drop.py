# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from benchmarks.knowledge_pair import knowledge_path, score, facts, problems
from benchmarks.real_pair import base_path
torch.set_grad_enabled(False)
ftp, bp = knowledge_path(), base_path()
ft = load_file(str(ftp/"model.safetensors")); base = load_file(str(bp/"model.safetensors"))
tok = AutoTokenizer.from_pretrained(ftp)
model = AutoModelForCausalLM.from_pretrained(bp).float().eval()
params = dict(model.named_parameters())
exact={k: ft[k].float()-base[k].float() for k in base}
def group(k):
    if 'embed' in k: return 'embed'
    if 'layers' in k:
        part=k.split('.')[-2]
        if part.endswith('proj'): return 'attn' if part[0] in 'qkvo' else 'mlp'
        return 'norm'
    return 'norm'
def run(deltas, label):
    for k,p in params.items(): p.copy_(base[k].float()+deltas[k])
    f,_=score(model,tok,facts()); s,nll=score(model,tok,problems()[1])
    print(f"{label:40s} facts {f:.3f} skill {s:.3f} nll {nll:.4f}", flush=True)
for g in ('embed','attn','norm'):
    run({k:(exact[k]*0 if group(k)==g else exact[k]) for k in base}, f"dropped {g}")
for part in ('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj'):
    run({k:(exact[k]*0 if part in k else exact[k]) for k in base}, f"dropped {part}")
