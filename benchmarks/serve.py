"""Serve benchmark (issue #6): one base + N compressed deltas unmerged, against N full fine-tunes.

Memory: for N deltas, a fresh process loads the base with transformers, wraps it
(``DeltaModel.from_base``), loads the same compressed delta N times under N names and runs one
forward pass; for N full fine-tunes, a fresh process loads the fine-tune with transformers and
holds N-1 more copies of it (``copy.deepcopy``: separate memory, as N different fine-tunes
would need) and runs one forward pass. Both report the resident memory (RSS, from
``/proc/self/statm``) after the forward pass and the process's peak; the operators' own tensor
bytes are reported next to the delta's stored bytes. The memory of Python, torch, transformers
and deltahub themselves (the "runtime only" row) is in every RSS; the "minus runtime" columns
and the ratio leave it out.

Time per token (CPU): generation of ``--tokens`` new tokens after a 16-token prompt (greedy,
batch 1), best of 3, and one forward pass over a 128-token prompt (prefill), for the plain
base, the merged model (``DeltaModel.from_pretrained``), the unmerged model with one delta,
and a batch of 4 rows using 4 deltas (the same delta under 4 names: the work is that of 4
different deltas), each in a fresh process, as ratios to the plain base at the same batch
size. ``--threads 1`` by default: on a machine shared with other jobs two OpenMP threads wait on
each other and timings swing by 10x.

    python -m benchmarks.serve --model smollm2-light
    python -m benchmarks.serve --model generated --hidden 2048 --layers 24 --no-timing --max-full-gb 8
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .measure import markdown_table, run_measured
from .pairs import add_pair_arguments, prepare

RESULTS = Path(__file__).parent / "results"

_SETUP = """
import copy, gc, os, time, torch, transformers
from deltahub import DeltaModel
torch.set_grad_enabled(False)
torch.set_num_threads({threads})
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def step(m, batch=1):
    m(input_ids=torch.arange(8).repeat(batch, 1) % 1000)
"""

_TIMING = """
def per_token(m, batch=1, n={tokens}, **kw):
    ids = (torch.arange(16).repeat(batch, 1) * 37 + torch.arange(batch)[:, None]) % 1000
    m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, **kw)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        best = min(best, (time.perf_counter() - t0) / n)
    return best
def prefill(m, batch=1, **kw):
    ids = (torch.arange(128).repeat(batch, 1) * 37) % 1000
    m(input_ids=ids, **kw)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        m(input_ids=ids, **kw)
        best = min(best, (time.perf_counter() - t0) / (128 * batch))
    return best
"""


def memory_rows(base: Path, ft: Path, delta: Path, counts: list[int], threads: int, max_full_gb: float, ft_gb: float) -> list[list[object]]:
    setup = _SETUP.format(threads=threads)
    runtime = run_measured(setup, "import deltahub\nextra = rss_mib()").extra
    plain = run_measured(setup, f"m = transformers.AutoModelForCausalLM.from_pretrained({str(base)!r})\nstep(m)\nextra = rss_mib()")
    rows: list[list[object]] = [
        ["runtime only (python, torch, transformers, deltahub)", f"{runtime:.0f}", "", "", "", "", "", ""],
        ["0 (plain base)", f"{plain.extra:.0f}", f"{plain.extra - runtime:.0f}", "", "", "", "", ""],
    ]
    for n in counts:
        body = f"""
m = DeltaModel.from_base(transformers.AutoModelForCausalLM.from_pretrained({str(base)!r}))
for i in range({n}):
    m.load_delta({str(delta)!r}, name=f"d{{i}}")
step(m)
m.set_delta("d0")
step(m)
d = m.loaded_deltas["d0"]
extra = [rss_mib(), m.delta_nbytes() / 2**20, d.nbytes / 2**20, (d.stored_bytes or 0) / 2**20]
"""
        ours = run_measured(setup, body)
        rss, ops_mib, one_ops, one_stored = ours.extra
        if n * ft_gb <= max_full_gb:
            full_body = f"""
first = transformers.AutoModelForCausalLM.from_pretrained({str(ft)!r})
models = [first] + [copy.deepcopy(first) for _ in range({n} - 1)]
step(models[-1])
extra = rss_mib()
"""
            full = run_measured(setup, full_body)
            full_rss, full_w, ratio = f"{full.extra:.0f}", f"{full.extra - runtime:.0f}", f"{(rss - runtime) / (full.extra - runtime):.2f}x"
        else:
            full_rss = f"not run: {n} x {ft_gb:.2f} GB > --max-full-gb {max_full_gb:g}"
            full_w = ratio = ""
        rows.append([n, f"{rss:.0f} (peak {ours.peak_mib:.0f})", f"{rss - runtime:.0f}", f"{ops_mib:.1f} ({one_ops:.1f} each; stored {one_stored:.1f})", f"{rss - plain.extra:.0f}", full_rss, full_w, ratio])
    return rows


def timing_rows(base: Path, delta: Path, threads: int, tokens: int) -> list[list[object]]:
    setup = _SETUP.format(threads=threads) + _TIMING.format(tokens=tokens)
    configs = {
        "plain base, batch 1": f"m = transformers.AutoModelForCausalLM.from_pretrained({str(base)!r})\nextra = [per_token(m), prefill(m)]",
        "merged (DeltaModel.from_pretrained), batch 1": f"m = DeltaModel.from_pretrained({str(delta)!r})\nextra = [per_token(m), prefill(m)]",
        "unmerged, 1 delta, batch 1": f"m = DeltaModel.from_pretrained({str(delta)!r}, merge=False)\nextra = [per_token(m), prefill(m)]",
        "plain base, batch 4": f"m = transformers.AutoModelForCausalLM.from_pretrained({str(base)!r})\nextra = [per_token(m, 4), prefill(m, 4)]",
        "unmerged, 1 delta, batch 4": f"m = DeltaModel.from_pretrained({str(delta)!r}, merge=False)\nextra = [per_token(m, 4), prefill(m, 4)]",
        "unmerged, 4 rows with 4 deltas, batch 4": (
            f"m = DeltaModel.from_base(transformers.AutoModelForCausalLM.from_pretrained({str(base)!r}))\n"
            f"for i in range(4):\n    m.load_delta({str(delta)!r}, name=f'd{{i}}')\n"
            "names = ['d0', 'd1', 'd2', 'd3']\nextra = [per_token(m, 4, delta_names=names), prefill(m, 4, delta_names=names)]"
        ),
    }
    results = {label: run_measured(setup, body).extra for label, body in configs.items()}
    rows = []
    for label, (decode, pre) in results.items():
        ref_decode, ref_pre = results["plain base, batch 4" if "batch 4" in label else "plain base, batch 1"]
        rows.append([label, f"{decode * 1e3:.1f}", f"{decode / ref_decode:.2f}x", f"{pre * 1e3:.2f}", f"{pre / ref_pre:.2f}x"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_arguments(ap)
    ap.add_argument("--counts", default="1,2,4,8,16", help="numbers of deltas / full copies")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per timed generation")
    ap.add_argument("--max-full-gb", type=float, default=8.0, help="skip N full copies above this many GB (the machine is shared)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="markdown file (default: benchmarks/results/serve-MODEL.md)")
    args = ap.parse_args()
    base, ft, delta, _, label = prepare(args.model, args.hidden, args.layers)
    ft_gb = sum(p.stat().st_size for p in Path(ft).glob("*.safetensors")) / 1e9
    counts = [int(c) for c in args.counts.split(",")]
    text = [f"`python -m benchmarks.serve {shlex.join(sys.argv[1:])}`", "", f"### Serve: {label}, delta dqrelo 1/8, {args.threads} thread(s)", ""]
    text.append("Resident memory (MiB) after loading and one forward pass, each row a fresh process:\n")
    text.append(markdown_table(
        ["deltas N", "base + N deltas: RSS", "minus runtime", "operators MiB (per delta; delta stored MiB)", "RSS over plain base", "N full fine-tunes: RSS", "minus runtime", "deltas / full (minus runtime)"],
        memory_rows(Path(base), Path(ft), Path(delta), counts, args.threads, args.max_full_gb, ft_gb),
    ))
    print("\n".join(text), flush=True)
    if not args.no_timing:
        section = ["", f"Time per token on the CPU ({args.tokens} new tokens after a 16-token prompt, greedy; prefill: one 128-token forward), ratios to the plain base at the same batch size:", ""]
        section.append(markdown_table(["model", "decode ms/token", "vs base", "prefill ms/token", "vs base"], timing_rows(Path(base), Path(delta), args.threads, args.tokens)))
        print("\n".join(section), flush=True)
        text += section
    out = args.out or RESULTS / f"serve-{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
