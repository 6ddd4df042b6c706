"""Close calls: PR of a few deltas on several stretches of the held-out text, at the honest ratio
each reaches.

``benchmarks.methods`` scores on the first ``--eval-tokens`` held-out tokens; when two methods
land within about 0.005 of PR there, the text itself decides. This script scores the same
deltas on three disjoint stretches (tokens 0-8k, 8k-24k, 24k-48k) and prints each delta's honest
ratio, so that a comparison can also be made at equal bytes (give a method a target that lands
on the other's honest ratio).

    python -m benchmarks.chunks --model smollm2-heavy --deltas auto:1/32,deltacome:1/32,deltacome:0.0298
"""

from __future__ import annotations

import argparse
import shutil

import torch

import deltahub
from deltahub import DeltaModel
from deltahub.evaluate import mean_nll

from .measure import markdown_table
from .pairs import CACHE, get_pair

STRETCHES = {"0-8k": (0, 8192), "8k-24k": (8192, 24576), "24k-48k": (24576, 49152)}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_pair import heldout_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-heavy")
    ap.add_argument("--deltas", default="auto:1/32,deltacome:1/32", help="comma-separated METHOD:RATIO")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    base, ft, label = get_pair(args.model)
    ids = AutoTokenizer.from_pretrained(ft)(heldout_text(), return_tensors="pt").input_ids[0]
    stretches = {k: ids[a : b + 1] for k, (a, b) in STRETCHES.items()}

    def nlls(model) -> dict[str, float]:
        model = model.float()  # bf16 weights, float32 arithmetic, as benchmarks.methods
        return {k: mean_nll(model, v) for k, v in stretches.items()}

    nb, nf = nlls(AutoModelForCausalLM.from_pretrained(base)), nlls(AutoModelForCausalLM.from_pretrained(ft))
    rows = []
    for spec in args.deltas.split(","):
        method, _, ratio_text = spec.partition(":")
        num, _, den = ratio_text.partition("/")
        ratio = float(num) / float(den) if den else float(num)
        out = CACHE / "bench" / "chunks" / args.model / f"{method}-{ratio:.6f}"
        shutil.rmtree(out, ignore_errors=True)
        result = deltahub.compress(base, ft, out, method=method, ratio=ratio, progress=False)
        n = nlls(DeltaModel.from_pretrained(out))
        rows.append([method, ratio_text, f"{result.ratio:.6f}"] + [f"{(nb[k] - n[k]) / (nb[k] - nf[k]):.4f}" for k in STRETCHES])
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n### PR on three stretches of held-out text: {label}\n")
    print(markdown_table(["method", "target", "honest ratio"] + [f"PR {k}" for k in STRETCHES], rows))


if __name__ == "__main__":
    main()
