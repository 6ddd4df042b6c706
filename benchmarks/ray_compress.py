"""Compress on a Ray cluster (issue #19): the local run against Ray with 1 and 2 workers on this
machine (wall time, the driver's peak memory, whether the bytes are the local run's), and a model
of the cost at cluster scale.

Each run is a fresh driver process (its peak RSS is the driver's alone); the Ray cluster is
started once with ``ray start --head --num-cpus 2`` and the drivers join it through
``RAY_ADDRESS``. "1 worker": tasks of 2 torch threads (one at a time on the 2 CPUs), the local
run's thread count, so the bytes must be the local run's; "2 workers": tasks of 1 thread, two at
once (bytes compared with a 1-thread local run).

The model: per-tensor decomposition time measured here (a full SVD, the encode's, and the Gram
eigendecomposition, the plan's), fitted as ``c * p * q * min(p, q)`` on the largest measured
shape, times the tensors of Llama-3-8B and Llama-3-70B, over 1, 8 and 64 workers, against the
reads (base and fine-tune, twice for ``auto``: plan and encode) at a stated disk bandwidth.

    python -m benchmarks.ray_compress --model smollm2-light
    python -m benchmarks.ray_compress --model generated            # the 3.5 GB generated pair
    python -m benchmarks.ray_compress --cost-model

Results: ``benchmarks/results/ray-compress-<model>.md`` and ``ray-cost-model.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from .measure import markdown_table, run_measured
from .pairs import CACHE, add_pair_arguments, get_pair

RESULTS = Path(__file__).parent / "results"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != "README.md":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def compress_case(base: Path, ft: Path, out: Path, threads: int, ratio: float, ray_address: str | None) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    executor = "ray" if ray_address else "local"
    m = run_measured(f"import torch, deltahub\ntorch.set_num_threads({threads})",
                     f"deltahub.compress({str(base)!r}, {str(ft)!r}, {str(out)!r}, 'auto', {ratio}, executor={executor!r}, progress=False)", env=env)
    return m.seconds, m.peak_mib


def machine_runs(model: str, hidden: int, layers: int, ratio: float) -> str:
    base, ft, label = get_pair(model, hidden, layers)
    work = CACHE / "bench" / "ray"
    rows = []
    started = subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
                             capture_output=True, text=True)
    if started.returncode:
        raise SystemExit(started.stderr[-2000:])
    try:
        import ray

        ray.init(address="auto", logging_level="ERROR")
        address = ray.get_runtime_context().gcs_address
        ray.shutdown()
        local = {}
        for threads in (2, 1):
            s, mib = compress_case(base, ft, work / f"local-{threads}", threads, ratio, None)
            local[threads] = digest(work / f"local-{threads}")
            rows.append([f"local, {threads} thread(s)", f"{s:.1f}", f"{mib:.0f}", "-"])
        for workers, threads in ((1, 2), (2, 1)):
            s, mib = compress_case(base, ft, work / f"ray-{workers}", threads, ratio, address)
            same = digest(work / f"ray-{workers}") == local[threads]
            rows.append([f"Ray, {workers} worker(s) x {threads} thread(s)", f"{s:.1f}", f"{mib:.0f}", "yes" if same else "NO"])
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
    text = "\n".join([
        f"### Compress on Ray: {label}, `auto` at 1/{round(1 / ratio)}", "",
        f"`python -m benchmarks.ray_compress --model {model}`" + (f" (h{hidden} l{layers})" if model == "generated" else ""), "",
        markdown_table(["run", "wall s", "driver peak MiB", "bytes = local run's (same threads)"], rows), "",
        f"{os.cpu_count()} CPUs; one Ray cluster (`ray start --head --num-cpus 2`) shared by the Ray runs; each driver a fresh process "
        "(its peak RSS is its own; the workers' is not in it).", ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ray-compress-{model}.md").write_text(text)
    return text


# ------------------------------------------------------------------ the cost model

LLAMA = {  # (rows, cols, count per layer), layers, vocab, hidden
    "Llama-3-8B": ([(4096, 4096, 2), (1024, 4096, 2), (14336, 4096, 2), (4096, 14336, 1)], 32, 128256, 4096),
    "Llama-3-70B": ([(8192, 8192, 2), (1024, 8192, 2), (28672, 8192, 2), (8192, 28672, 1)], 80, 128256, 8192),
}
MEASURED = [(1024, 4096), (2048, 2048), (2048, 7168), (4096, 4096)]


def per_tensor_seconds(threads: int) -> tuple[float, float, list[list[object]]]:
    """``(c_svd, c_eig, rows)``: seconds per p*q*min(p, q) for the encode's SVD and the plan's Gram eigendecomposition."""
    import torch

    from deltahub.methods.linalg import singular_values, truncated_svd

    torch.set_num_threads(threads)
    rows, c_svd, c_eig = [], 0.0, 0.0
    for p, q in MEASURED:
        x = torch.randn(p, q)
        t0 = time.perf_counter()
        truncated_svd(x, min(p, q))
        svd = time.perf_counter() - t0
        t0 = time.perf_counter()
        singular_values(x)
        eig = time.perf_counter() - t0
        work = p * q * min(p, q)
        c_svd, c_eig = svd / work, eig / work  # the largest shape's constants are kept (the last one)
        rows.append([f"{p} x {q}", f"{svd:.2f}", f"{eig:.2f}"])
    return c_svd, c_eig, rows


def cost_model(threads: int, disk_gbps: float) -> str:
    c_svd, c_eig, measured = per_tensor_seconds(threads)
    rows = []
    for name, (shapes, layers, vocab, hidden) in LLAMA.items():
        tensors = [(p, q) for p, q, n in shapes for _ in range(n)] * layers + [(vocab, hidden)] * 2  # + embeddings, LM head
        compute = sum((c_svd + c_eig) * p * q * min(p, q) for p, q in tensors)
        weights = sum(p * q * 2 for p, q in tensors)  # bf16
        reads = 2 * 2 * weights  # base and fine-tune, plan and encode
        longest = max((c_svd + c_eig) * p * q * min(p, q) for p, q in tensors)  # one task: the critical path
        for workers in (1, 8, 64):
            c = max(compute / workers, longest)
            r = reads / (disk_gbps * 1e9)  # one shared disk: the reads do not scale with workers
            bound = "disk" if r > c else ("the largest tensor (one task)" if longest >= compute / workers else "compute")
            rows.append([name, workers, f"{c / 60:.1f}", f"{r / 60:.1f}", f"{max(c, r) / 60:.1f}", bound])
    text = "\n".join([
        "### Compress at cluster scale: a model", "", f"`python -m benchmarks.ray_compress --cost-model --threads {threads} --disk-gbps {disk_gbps}`", "",
        f"Measured here ({threads} thread(s)), seconds per tensor:", "", markdown_table(["shape", "full SVD (encode)", "Gram eigendecomposition (plan)"], measured), "",
        f"Fitted: {c_svd:.3g} s (SVD) and {c_eig:.3g} s (eig) per p*q*min(p, q), on the largest shape. Each worker as this machine ({threads} "
        f"thread(s)); reads: base and fine-tune, twice (plan and encode), from one disk at {disk_gbps} GB/s shared by all workers.", "",
        markdown_table(["model", "workers", "compute min", "reads min", "total min (the larger)", "bound by"], rows), "",
        "compute = max(all tensors' time / workers, the largest tensor's time): one tensor is one task, so the embedding and LM head "
        "(128256 rows) set a floor that more workers do not lower; one matrix's decomposition is one task (fused experts are split, matrices are not). The driver only "
        "writes the records (1/16 of the weights at most) in order: it is not the bottleneck at these sizes.", ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray-cost-model.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(ap)
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--cost-model", action="store_true", help="print the cluster-scale model instead of running compress")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="the shared disk's read bandwidth in the model (GB/s)")
    args = ap.parse_args()
    print(cost_model(args.threads, args.disk_gbps) if args.cost_model else machine_runs(args.model, args.hidden, args.layers, args.ratio))


if __name__ == "__main__":
    main()
