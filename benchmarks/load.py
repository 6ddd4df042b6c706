"""Load benchmark: DeltaModel.from_pretrained against from_pretrained of the applied checkpoint.

Same disk, warm page cache; each load runs ``--repeat`` times in fresh processes, the loads
taking turns so that a slow spell of a shared machine falls on all alike; the best and the
median run are reported, with the peak resident memory of the best. A plain safetensors load
maps the file and reads nothing until the weights are used, so each load is measured twice: the
call alone, and the call plus a first forward pass on 8 tokens (time until the model has
answered once). Also the throughput of ``deltahub apply``, and what this machine charges for
fresh memory: filling as many new bytes as the model holds. Any loader that builds new weights
pays that; a plain load of a checkpoint in the page cache does not (on a virtual machine whose
host backs memory lazily it can be most of the difference).
Targets (issue #3): at most 1.5x the time and 1.3x the peak memory of the plain load.

It also prints a floor for the delta load on this machine, which no implementation can go
under: the plain load and first forward, plus filling the model's bytes of new memory, plus
the low-rank products the format prescribes (spec §6.3) at this machine's best sgemm rate on
every core. A delta whose floor is over 1.5x cannot meet the target here.

Last, what the checks against hostile deltas cost (spec/SECURITY.md): the records checked
against the base's header (``sources.check_records_against_base``, once per load) and the
finite check of every decoded tensor (``sources.check_finite``), each timed alone, in this
process, against decoding the same tensors. ``--checks-only`` prints only that.

    python -m benchmarks.load --model smollm2-light --method auto
    python -m benchmarks.load --model generated --hidden 2048 --layers 24 --method dqrelo
    python -m benchmarks.load --model generated --method dqrelo --device-map cuda
    python -m benchmarks.load --model generated --hidden 1024 --layers 8 --method dqrelo --checks-only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deltahub.checkpoint import Checkpoint, borrow_base
from deltahub.format import DeltaReader
from deltahub.sources import check_finite, check_records_against_base

from .decode import lowrank_flops
from .measure import markdown_table, run_interleaved, run_measured, sgemm_gflops
from .pairs import add_pair_arguments, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(ap)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--method", default="auto", help="the delta's method, at 1/8 (bitdelta: its fixed 1/16)")
    ap.add_argument("--device-map", default=None, help='passed to both loads, e.g. "cuda" or "auto" (default: none, CPU)')
    ap.add_argument("--checks-only", action="store_true", help="print only what the checks against hostile deltas cost")
    args = ap.parse_args()
    base, ft, delta, applied, label = prepare(args.model, args.hidden, args.layers, args.method)
    reader = DeltaReader(delta)
    if args.checks_only:
        print(f"\n### Checks: {label}, delta {args.method}\n")
        print_check_costs(reader, Checkpoint.open(base))
        return
    apply_m = run_measured("import deltahub, shutil", f"shutil.rmtree({str(applied)!r}, ignore_errors=True)\ndeltahub.apply({str(delta)!r}, {str(applied)!r}, progress=False)")
    nbytes = sum(p.stat().st_size for p in applied.glob("*.safetensors"))
    setup = "import torch, transformers\nfrom deltahub import DeltaModel\ntorch.set_grad_enabled(False)"
    # The forward pass ends with .tolist(), which waits for a GPU to finish.
    forward = "\nm(input_ids=torch.arange(8, device=m.device).unsqueeze(0)).logits[0, 0, :4].tolist()"
    placed = f", device_map={args.device_map!r}" if args.device_map else ""
    gpu_peak = "\nextra = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None"
    plain_load = f"m = transformers.AutoModelForCausalLM.from_pretrained({str(applied)!r}{placed})"
    ours_load = f"m = DeltaModel.from_pretrained({str(delta)!r}{placed})"
    runs = run_interleaved(
        {
            "plain": (setup, plain_load + gpu_peak), "ours": (setup, ours_load + gpu_peak),
            "plain_f": (setup, plain_load + forward + gpu_peak), "ours_f": (setup, ours_load + forward + gpu_peak),
            "fresh": ("import torch", f"xs = [torch.ones(n, dtype=torch.uint8) for n in [64 << 20] * ({nbytes} >> 26) + [{nbytes} % (64 << 20)]]"),
        },
        args.repeat,
    )
    best = {k: min(v, key=lambda m: m.seconds) for k, v in runs.items()}
    median = {k: statistics.median(m.seconds for m in v) for k, v in runs.items()}
    on_gpu = best["plain"].extra is not None  # GPU memory peaks, when torch sees a GPU
    rows = []
    for what, p, o in (("load", "plain", "ours"), ("load + first forward", "plain_f", "ours_f")):
        bp, bo = best[p], best[o]
        gpu = [[f"{bp.extra:.0f}", "1.00x"], [f"{bo.extra:.0f}", f"{bo.extra / max(bp.extra, 1):.2f}x"]] if on_gpu else [[], []]
        rows.append([f"from_pretrained(applied checkpoint): {what}", f"{bp.seconds:.2f}", f"{median[p]:.2f}", f"{bp.peak_mib:.0f}", "1.00x", "1.00x", "1.00x", *gpu[0]])
        rows.append([f"DeltaModel.from_pretrained(delta): {what}", f"{bo.seconds:.2f}", f"{median[o]:.2f}", f"{bo.peak_mib:.0f}", f"{bo.seconds / bp.seconds:.2f}x", f"{median[o] / median[p]:.2f}x", f"{bo.peak_mib / bp.peak_mib:.2f}x", *gpu[1]])
    fresh = best["fresh"]
    ratio = reader.config["totals"]["ratio"]
    print(f"\n### Load: {label}, delta {args.method} (ratio {ratio:.4f}){f', device_map={args.device_map!r}' if args.device_map else ''}\n")
    print(f"{args.repeat} runs of each, taking turns, each in a fresh process\n")
    headers = ["load", "best s", "median s", "peak MiB", "time vs plain (best)", "time vs plain (median)", "memory vs plain"]
    print(markdown_table(headers + (["GPU peak MiB", "GPU memory vs plain"] if on_gpu else []), rows))
    names = {"plain": "plain load", "ours": "delta load", "plain_f": "plain load + forward", "ours_f": "delta load + forward"}
    print("\nevery run, in order: " + "; ".join(f"{what} " + ", ".join(f"{m.seconds:.2f}" for m in runs[key]) for key, what in names.items()))
    print(f"fresh memory: {fresh.seconds:.2f} s to fill {nbytes / 1e9:.2f} GB of new pages (peak {fresh.peak_mib:.0f} MiB)")
    if args.device_map is None:
        threads = torch.get_num_threads()
        flops, gflops = lowrank_flops(reader), sgemm_gflops(threads)
        plain_f = best["plain_f"].seconds
        floor = plain_f + fresh.seconds + flops / 1e9 / gflops
        print(f"floor here: plain load + forward {plain_f:.2f} s + fresh memory {fresh.seconds:.2f} s + low-rank products "
              f"{flops / 1e9:.0f} GFLOP at {gflops:.0f} GFLOP/s ({threads} threads) {flops / 1e9 / gflops:.2f} s = {floor:.2f} s, "
              f"{floor / plain_f:.2f}x the plain load (the delta load: {best['ours_f'].seconds / plain_f:.2f}x)")
    print(f"apply: {apply_m.seconds:.2f} s for {nbytes / 1e9:.2f} GB ({nbytes / 1e9 / apply_m.seconds:.2f} GB/s), peak {apply_m.peak_mib:.0f} MiB")
    print_check_costs(reader, Checkpoint.open(base), best["ours_f"].seconds)


def print_check_costs(reader: DeltaReader, base: Checkpoint, load_s: float | None = None) -> None:
    """Time the records check (best of 5) and the finite check of every decoded tensor (each
    tensor decoded first, untimed; then its check timed), against decoding the tensors."""
    records = []
    for _ in range(5):
        t0 = time.perf_counter()
        check_records_against_base(reader, base)
        records.append(time.perf_counter() - t0)
    decode_s = finite_s = 0.0
    nbytes = 0
    for name, rec in reader.records.items():
        if rec["kind"] == "removed":
            continue
        with borrow_base(base, name) as b:
            t0 = time.perf_counter()
            t = reader.decode(name, b)
            t1 = time.perf_counter()
            check_finite(name, t, b, reader.path)
            t2 = time.perf_counter()
        decode_s += t1 - t0
        finite_s += t2 - t1
        nbytes += t.numel() * t.element_size()
    against = f", {finite_s / load_s:.1%} of the delta load + forward ({load_s:.2f} s)" if load_s else ""
    print(f"checks: records against the base header {min(records) * 1e3:.2f} ms for {len(reader.records)} records (best of 5); "
          f"finite check {finite_s:.3f} s for {nbytes / 1e9:.2f} GB decoded ({nbytes / 1e9 / max(finite_s, 1e-9):.1f} GB/s), "
          f"{finite_s / decode_s:.1%} of decoding the same tensors ({decode_s:.2f} s){against}")


if __name__ == "__main__":
    main()
