"""Decode benchmark: where the time of rebuilding a fine-tune from its delta goes.

Decodes every tensor of a delta one after another on a fixed number of torch threads (one,
as in each of transformers' loader threads, by default) and splits the time by the profiler:
each component type's additions, the making of its row adders (unpacking, dequantizing), and
the rest (widening the base, casting back, touching the new weights' memory). Also the
arithmetic that the low-rank products need, to compare with this machine's matrix throughput.

    python -m benchmarks.decode --model generated --method dqrelo
    python -m benchmarks.decode --model smollm2-light --method auto --threads 2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from .measure import markdown_table, sgemm_gflops
from .pairs import add_pair_arguments, prepare


def lowrank_flops(reader) -> int:
    """2 x multiply-adds of every low-rank product in the delta (``p x rank`` by ``rank x q``)."""
    from deltahub.format.components import block_shape, component_type

    total = 0
    for rec in reader.records.values():
        for meta in rec.get("components") or []:
            if meta["type"] == "lowrank":
                p, q = component_type("lowrank").view(meta, block_shape(tuple(rec["shape"]), meta))
                total += 2 * p * q * meta["rank"]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(ap, "generated")
    ap.add_argument("--method", default="dqrelo", help="the delta's method, at 1/8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deltahub.checkpoint import Checkpoint, borrow_base
    from deltahub.format import DeltaReader

    base, _, delta, _, label = prepare(args.model, args.hidden, args.layers, args.method)
    reader, ckpt = DeltaReader(delta), Checkpoint.open(base)
    names = [n for n, r in reader.records.items() if r["kind"] != "removed"]
    nbytes = 0
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for name in names:
        with borrow_base(ckpt, name) as b:
            nbytes += reader.decode(name, b).nbytes
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, function): (calls, _, tottime, cumtime, callers)}
    rows, accounted = [], 0.0
    for (path, _, func), (_, _, _, cum, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        if "deltahub/format/components" not in path.replace("\\", "/"):
            continue
        if func in ("add", "row_adder") and cum >= 0.005:
            part = path.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".py")
            rows.append([f"{part}: {'additions' if func == 'add' else 'row adders (unpack, dequantize)'}", f"{cum:.2f}", f"{cum / total:.0%}"])
            accounted += cum
    rows.append(["the rest: widen the base, cast back, new memory, reading", f"{total - accounted:.2f}", f"{(total - accounted) / total:.0%}"])
    rows.append(["total", f"{total:.2f}", "100%"])
    flops = lowrank_flops(reader)
    gflops = sgemm_gflops(args.threads)
    print(f"\n### Decode: {label}, delta {args.method} 1/8, {args.threads} thread(s), profiled\n")
    print(markdown_table(["part", "seconds", "share"], rows))
    print(f"\n{len(names)} tensors, {nbytes / 1e9:.2f} GB rebuilt; low-rank products: {flops / 1e9:.0f} GFLOP, "
          f"{flops / 1e9 / gflops:.2f} s at this machine's {gflops:.0f} GFLOP/s (sgemm, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
