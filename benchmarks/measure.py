"""Run a snippet in a fresh Python process and report its wall time and peak resident memory.

A fresh process per measurement keeps one run's memory from counting in the next; the peak is
``VmHWM`` of that process (resident pages, memory-mapped checkpoint pages included, which is
what a user sees in ``top``). Not ``ru_maxrss``: Linux carries it over from the parent through
fork and exec, so a benchmark that had just compressed in-process reported its own peak for
every child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

_WRAPPER = """
import json, resource, time
t0 = time.perf_counter()
{body}
seconds = time.perf_counter() - t0
try:
    peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except OSError:  # not Linux
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("@@RESULT@@" + json.dumps({{"seconds": seconds, "peak_mib": peak_kib / 1024, "extra": globals().get("extra")}}))
"""


@dataclass
class Measurement:
    seconds: float
    peak_mib: float
    extra: object = None


def run_measured(setup: str, body: str, repeat: int = 1, env: dict | None = None) -> Measurement:
    """Time ``body`` (after untimed ``setup``) in a child process; the best of ``repeat`` runs."""
    code = textwrap.dedent(setup) + "\n" + _WRAPPER.format(body=textwrap.indent(textwrap.dedent(body), ""))
    best: Measurement | None = None
    for _ in range(repeat):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"measured snippet failed:\n{p.stderr[-3000:]}")
        line = next(l for l in p.stdout.splitlines() if l.startswith("@@RESULT@@"))
        data = json.loads(line[len("@@RESULT@@") :])
        m = Measurement(data["seconds"], data["peak_mib"], data["extra"])
        if best is None or m.seconds < best.seconds:
            best = m
    assert best is not None
    return best


def run_interleaved(cases: dict[str, tuple[str, str]], repeat: int) -> dict[str, list[Measurement]]:
    """Each ``name: (setup, body)`` measured ``repeat`` times, taking turns (a, b, a, b, ...),
    so that a slow spell of a shared machine falls on every case alike."""
    runs: dict[str, list[Measurement]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, (setup, body) in cases.items():
            runs[name].append(run_measured(setup, body))
    return runs


def sgemm_gflops(threads: int) -> float:
    """This machine's float32 matrix-product rate on ``threads`` torch threads, from a product
    large enough to run near the BLAS peak (a best case: decoding's products are smaller)."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(256, 1024), torch.randn(1024, 2048)
        a @ b  # warm-up: the BLAS threads start on the first call
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        return 20 * 2 * 256 * 1024 * 2048 / (time.perf_counter() - t) / 1e9
    finally:
        torch.set_num_threads(before)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
