# One-off diagnosis of the knowledge pair (issue #20), kept as run; outputs in benchmarks/results/knowledge-diagnosis.md.
import sys, shutil, tempfile, torch
import deltahub
from transformers import AutoTokenizer, AutoModelForCausalLM
from deltahub.evaluate import mean_nll
from benchmarks.real_pair import heldout_text
from benchmarks.pairs import get_pair
import json
torch.set_grad_enabled(False)
base, ft, _ = get_pair("smollm2-heavy")
ref = json.load(open("/work/main/benchmarks/results/retention-smollm2-heavy.json"))["reference"]
b, f = ref["base_scores"]["nll"], ref["scores"]["nll"]
tok = AutoTokenizer.from_pretrained(ft)
ids = tok(heldout_text(), return_tensors="pt").input_ids[0][: 8192 + 1]
for ratio in map(eval, sys.argv[2].split(",")):
    out = tempfile.mkdtemp() + "/d"
    shutil.rmtree(out, ignore_errors=True)
    r = deltahub.compress(base, ft, out, method="auto", ratio=ratio, rules=[sys.argv[1]], progress=False)
    nll = mean_nll(deltahub.DeltaModel.from_pretrained(out).float(), ids)
    print(sys.argv[1], f"1/{round(1/ratio)} ratio {r.ratio:.4f} PR {(b-nll)/(b-f):.4f}", flush=True)
