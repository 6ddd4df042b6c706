"""Compress benchmark: time and peak memory of ``deltahub.compress`` per method.

Each run is a fresh process; peak memory is its resident high-water mark. The streaming
compressor should stay a few hundred MB above the largest tensors involved, not the model.

    python -m benchmarks.compress --model smollm2-light
    python -m benchmarks.compress --model generated --methods dqrelo,bitdelta
"""

from __future__ import annotations

import argparse
import shutil

from .measure import markdown_table, run_measured
from .pairs import CACHE, add_pair_arguments, get_pair

SETTINGS = {
    "auto": 1 / 8, "bitdelta": None, "svd": 1 / 8, "deltacome": 1 / 8, "dqrelo": 1 / 8, "deltadq": 1 / 8,
    "dare": 1 / 8, "magnitude": 1 / 8, "lossless": None,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(ap)
    ap.add_argument("--methods", default=",".join(SETTINGS))
    args = ap.parse_args()
    base, ft, label = get_pair(args.model, args.hidden, args.layers)
    from deltahub import Checkpoint

    ckpt = Checkpoint.open(ft)
    largest = max(2 * (i.shape[0] * (i.shape[1] if len(i.shape) > 1 else 1)) for i in (ckpt.info(n) for n in ckpt.names()))
    rows = []
    for method in args.methods.split(","):
        ratio = SETTINGS[method]
        out = CACHE / "bench" / "compress" / f"{args.model}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        m = run_measured(
            "import deltahub",
            f"r = deltahub.compress({str(base)!r}, {str(ft)!r}, {str(out)!r}, method={method!r}, ratio={ratio!r}, progress=False)\n"
            "extra = {'ratio': r.ratio, 'mean_err': r.mean_rel_error, 'worst': r.max_rel_error, 'fallbacks': len(r.fallbacks)}",
        )
        e = m.extra
        rows.append([method, ratio if ratio is None else f"1/{round(1 / ratio)}", f"{e['ratio']:.4f}", f"{e['mean_err']:.4f}", f"{m.seconds:.1f}", f"{m.peak_mib:.0f}", e["fallbacks"]])
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n### Compress: {label} (largest tensor {largest / 2**20:.0f} MiB in bf16)\n")
    print(markdown_table(["method", "target", "honest ratio", "mean rel. error", "seconds", "peak MiB", "dense fallbacks"], rows))


if __name__ == "__main__":
    main()
