# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
import sys, shutil, tempfile, torch
import deltahub
from transformers import AutoTokenizer
from benchmarks.knowledge_pair import evaluate, knowledge_path
from benchmarks.real_pair import base_path
torch.set_grad_enabled(False)
ft, base = knowledge_path(), base_path()
tok = AutoTokenizer.from_pretrained(ft)
for ratio in map(eval, (sys.argv[2] if len(sys.argv) > 2 else "1/64,1/128").split(",")):
    out = tempfile.mkdtemp() + "/d"
    shutil.rmtree(out, ignore_errors=True)
    r = deltahub.compress(base, ft, out, method="auto", ratio=ratio, rules=[sys.argv[1]], progress=False)
    m = deltahub.DeltaModel.from_pretrained(out)
    s = evaluate(m, tok)
    print(sys.argv[1], f"1/{round(1/ratio)} ratio {r.ratio:.4f}", {k: round(v, 4) for k, v in s.items()}, flush=True)
