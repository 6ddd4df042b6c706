# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
from benchmarks.diagnosis.common import base, exact, ft, group, layer, model, params, set_deltas, tok, bp, ftp  # noqa: F401
import torch
from benchmarks.knowledge_pair import score, facts, problems
def run(deltas, label):
    set_deltas(deltas)
    f,_=score(model,tok,facts()); s,nll=score(model,tok,problems()[1])
    print(f"{label:40s} facts {f:.3f} skill {s:.3f} nll {nll:.4f}", flush=True)
for g in ('embed','attn','norm'):
    run({k:(exact[k]*0 if group(k)==g else exact[k]) for k in base}, f"dropped {g}")
for part in ('q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj'):
    run({k:(exact[k]*0 if part in k else exact[k]) for k in base}, f"dropped {part}")
