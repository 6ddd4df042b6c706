"""Methods benchmark: every method at every feasible ratio on a real base/fine-tune pair.

For each method and each target ratio among 1/32, 1/16, 1/8 and 1/4 (bitdelta and lossless at
their natural size; dqrelo only above 1/16): the honest ratio achieved, the relative error of
the whole delta, the performance retention PR on held-out Austen text (computed in float32
from the loaded bf16 weights), compress time and decode time. Methods that draw from the seed
(auto, dare, deltadq) run with ``--seeds`` seeds and report the mean PR and its range. Prints a
markdown table and writes a PNG of the retention loss 1 - PR against ratio (:func:`plot`), with
the peers (mergekit, zipnn) read from ``peers-<model>.md`` when that file is there.

    python -m benchmarks.methods --model smollm2-light --eval-tokens 8192
    python -m benchmarks.methods --model smollm2-heavy --eval-tokens 8192 --methods auto,dare
    python -m benchmarks.methods --model smollm2-light --plot-only   # redraw from the saved JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import shutil
import time
from pathlib import Path

import torch

import deltahub
from deltahub import DeltaModel
from deltahub.evaluate import mean_nll, tensor_errors

from .measure import markdown_table
from .pairs import CACHE, get_pair

RATIOS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
NATURAL = ("bitdelta", "lossless")
LOSSY = ("auto", "svd", "deltacome", "dqrelo", "deltadq", "dare", "magnitude")
# Methods whose encoding draws from the seed (random masks, stochastic rounding): their PR is a
# random variable, reported as the mean over seeds with the range.
RANDOM = ("auto", "dare", "deltadq")


def configs() -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = [(m, None) for m in NATURAL]
    for m in LOSSY:
        out += [(m, r) for r in RATIOS if not (m == "dqrelo" and r <= 1 / 16)]
    return out


def decode_seconds(delta: Path, base: Path) -> float:
    reader = deltahub.DeltaReader(delta)
    ckpt = deltahub.Checkpoint.open(base)
    t0 = time.perf_counter()
    for name, rec in reader.records.items():
        if rec["kind"] != "removed":
            reader.decode(name, ckpt.get(name) if name in ckpt else None)
    return time.perf_counter() - t0


def heldout_nll(model, ids: torch.Tensor) -> float:
    """NLL of the model's own (bf16) weights computed in float32. bf16 arithmetic moves the NLL by a
    few 1e-4 nats with kernel blocking and thread count, about 0.002 of PR on the light pair's
    0.17-nat gain; in float32 the comparison is about the weights alone."""
    return mean_nll(model.float(), ids)


def measure(method: str, ratio: float | None, seed: int, base: Path, ft: Path, ids: torch.Tensor, out: Path) -> dict:
    """Compress with one seed, then the delta's error, held-out NLL and decode time."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = deltahub.compress(base, ft, out, method=method, ratio=ratio, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    errs = tensor_errors(out, ft, base, progress=False)
    num = sum((e.rel_error * e.delta_norm) ** 2 for e in errs if math.isfinite(e.rel_error))
    den = sum(e.delta_norm**2 for e in errs)
    m = DeltaModel.from_pretrained(out)
    nll = heldout_nll(m, ids)
    del m
    gc.collect()
    row = {"ratio": result.ratio, "rel_error": math.sqrt(num / den), "nll": nll, "compress_s": seconds,
           "decode_s": decode_seconds(out, base), "fallbacks": len(result.fallbacks)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def run(model: str, eval_tokens: int, out_dir: Path, only: list[str] | None = None, seeds: int = 3) -> list[dict]:
    from benchmarks.real_pair import heldout_text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ft, label = get_pair(model)
    tok = AutoTokenizer.from_pretrained(ft)
    ids = tok(heldout_text(), return_tensors="pt").input_ids[0][: eval_tokens + 1]
    torch.set_grad_enabled(False)
    nll_base = heldout_nll(AutoModelForCausalLM.from_pretrained(base), ids)
    nll_ft = heldout_nll(AutoModelForCausalLM.from_pretrained(ft), ids)
    rows = []
    work = CACHE / "bench" / "methods" / model
    for method, ratio in configs():
        if only and method not in only:
            continue
        runs = []
        for seed in range(seeds if method in RANDOM else 1):
            runs.append(measure(method, ratio, seed, base, ft, ids, work / f"{method}-{ratio}"))
        prs = [(nll_base - r["nll"]) / (nll_base - nll_ft) for r in runs]
        first = runs[0]  # times from the first seed: every seed does the same work
        rows.append({
            "method": method, "target": ratio, "ratio": first["ratio"], "rel_error": sum(r["rel_error"] for r in runs) / len(runs),
            "pr": sum(prs) / len(prs), "pr_seeds": prs, "nll": sum(r["nll"] for r in runs) / len(runs),
            "compress_s": first["compress_s"], "decode_s": first["decode_s"], "fallbacks": first["fallbacks"],
        })
        spread = f" (seeds {min(prs):.4f}..{max(prs):.4f})" if len(prs) > 1 else ""
        print(f"{method:10s} {str(ratio):8s} ratio {first['ratio']:.4f}  err {rows[-1]['rel_error']:.4f}  PR {rows[-1]['pr']:.4f}{spread}  {first['compress_s']:.1f}s", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = out_dir / f"methods-{model}.json"
    if only and previous.is_file():  # a subset rerun replaces its rows in the full table
        old = json.loads(previous.read_text())
        # Only rows measured on the same pair and text: a regenerated pair changes the reference NLLs.
        if (old.get("eval_tokens"), old.get("nll_base"), old.get("nll_finetuned")) == (int(ids.numel() - 1), nll_base, nll_ft):
            rows = [r for r in old["rows"] if r["method"] not in only] + rows
            rows.sort(key=lambda r: ([m for m, _ in configs()].index(r["method"]), r["target"] or 0))
    (out_dir / f"methods-{model}.json").write_text(json.dumps({"label": label, "nll_base": nll_base, "nll_finetuned": nll_ft, "eval_tokens": int(ids.numel() - 1), "rows": rows}, indent=2))
    print(f"\n### Methods: {label}; held-out NLL base {nll_base:.4f}, fine-tune {nll_ft:.4f} ({ids.numel() - 1} tokens)\n")
    table = [[r["method"], "natural" if r["target"] is None else f"1/{round(1 / r['target'])}", f"{r['ratio']:.4f}", f"{r['rel_error']:.4f}", _pr_cell(r), f"{r['compress_s']:.1f}", f"{r['decode_s']:.2f}"] for r in rows]
    print(markdown_table(["method", "target", "honest ratio", "rel. error", "PR (seed range)", "compress s", "decode s"], table))
    plot_from_results(model, out_dir)
    return rows


def _pr_cell(row: dict) -> str:
    seeds = row.get("pr_seeds") or [row["pr"]]
    return f"{row['pr']:.4f}" + (f" ({min(seeds):.4f}..{max(seeds):.4f})" if len(seeds) > 1 else "")


# The plot's y axis: 1 - PR on a symmetric log scale, linear within +-LINTHRESH so that PR = 1
# (lossless) sits at 0 and PR > 1 (base + delta beats the fine-tune on this text) shows below it.
LINTHRESH = 1e-3
Y_TOP = 2.0  # 1 - PR above this (PR below -1) is drawn on the top edge with its value written out
Y_BOTTOM = -0.03
Y_TICKS = (-0.01, 0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0)


def peer_points(markdown: str) -> list[dict]:
    """mergekit and zipnn rows of a ``peers-<model>.md`` table: ``{"tool", "ratio", "pr", "pr_unmerged"}``.

    mergekit's PR is the adapter merged into the BF16 weights (as deltahub applies a delta),
    ``pr_unmerged`` with PEFT beside the base; zipnn is lossless, so its PR is 1 by construction.
    """
    out = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("mergekit") and len(cells) >= 8:
            rank = re.search(r"r=(\d+)", cells[0])
            out.append({"tool": "mergekit LoRA", "detail": f"r={rank.group(1)}" if rank else "", "ratio": float(cells[3]), "pr": float(cells[6]), "pr_unmerged": _number(cells[7])})
        elif cells[0].startswith("zipnn") and len(cells) >= 3:
            detail = "fine-tune XOR base" if "XOR" in cells[0] else "fine-tune files"
            out.append({"tool": "zipnn", "detail": detail, "ratio": float(cells[2]), "pr": 1.0, "pr_unmerged": None})
    return out


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _loss(pr: float) -> float:
    """Retention loss 1 - PR, clipped to the plot's range (clipped points are marked separately)."""
    return min(max(1.0 - pr, Y_BOTTOM), Y_TOP)


def _tick_label(y: float) -> str:
    if y == 0:
        return "0  (PR 1)"
    return f"{y:g}  (PR {1 - y:g})"


def plot(rows: list[dict], label: str, path: Path, peers: list[dict] | None = None, peers_note: str = "") -> None:
    """Retention loss 1 - PR (symlog) against honest ratio (log2) for every method, seed ranges as
    error bars, points off the scale drawn on its edge with their PR written beside them, and the
    peers (mergekit's LoRA, zipnn) as black markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 6))
    markers = "osD^v<>PX*h"
    clipped = []  # (ratio, pr, text, colour) of the points off the scale, labelled after the lines
    methods = sorted({r["method"] for r in rows}, key=lambda m: [c for c, _ in configs()].index(m) if m in dict(configs()) else 99)
    for i, method in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"])
        xs = [r["ratio"] for r in pts]
        ys = [_loss(r["pr"]) for r in pts]
        # seed range of PR -> range of 1 - PR, asymmetric around the mean
        lo = [_loss(r["pr"]) - _loss(max(r.get("pr_seeds") or [r["pr"]])) for r in pts]
        hi = [_loss(min(r.get("pr_seeds") or [r["pr"]])) - _loss(r["pr"]) for r in pts]
        natural = " (natural size)" if method in NATURAL else ""
        line = ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], ms=6, lw=1.2, capsize=3, label=method + natural)
        for r in pts:
            if 1.0 - r["pr"] > Y_TOP or 1.0 - r["pr"] < Y_BOTTOM:
                target = "" if r["target"] is None else f" 1/{round(1 / r['target'])}"
                clipped.append((r["ratio"], r["pr"], f"{method}{target}: PR {r['pr']:.1f}", line.lines[0].get_color()))
    _mark_clipped(ax, clipped)
    for tool, marker in (("mergekit LoRA", "X"), ("zipnn", "*")):
        pts = [p for p in peers or [] if p["tool"] == tool]
        if not pts:
            continue
        ax.scatter([p["ratio"] for p in pts], [_loss(p["pr"]) for p in pts], marker=marker, s=110, color="black", zorder=5,
                   label=f"{tool} (peer)" + (": merged into BF16" if tool.startswith("mergekit") else ": lossless"))
        unmerged = [p for p in pts if p.get("pr_unmerged") is not None]
        if unmerged:
            ax.scatter([p["ratio"] for p in unmerged], [_loss(p["pr_unmerged"]) for p in unmerged], marker=marker, s=110, facecolors="none", edgecolors="black", zorder=5, label=f"{tool} (peer): PEFT, unmerged")
        for k, p in enumerate(sorted(pts, key=lambda p: p["ratio"])):  # alternate below/above: zipnn's two sit on one line
            ax.annotate(p["detail"], (p["ratio"], _loss(p["pr"])), textcoords="offset points", xytext=(5, -11 if k % 2 == 0 else 6), fontsize=7)
    ax.set_xscale("log", base=2)
    xticks = [2.0**-k for k in range(6, -1, -1)]
    ax.set_xticks(xticks, ["1" if x == 1 else f"1/{round(1 / x)}" for x in xticks])
    ax.set_xlim(min(xticks[1], min(r["ratio"] for r in rows) * 0.8), 1.0)
    ax.set_yscale("symlog", linthresh=LINTHRESH, linscale=0.5)
    ax.set_ylim(Y_BOTTOM * 1.3, Y_TOP * 1.6)
    ax.set_yticks(Y_TICKS)
    ax.set_yticklabels([_tick_label(y) for y in Y_TICKS], fontsize=8)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.grid(True, which="major", lw=0.3, alpha=0.6)
    ax.set_xlabel("honest ratio (stored bytes / dense delta bytes), log scale")
    ax.set_ylabel("retention loss 1 - PR (symlog; lower is better)")
    ax.set_title(label, fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(0.01, 0.01, "PR: share of the fine-tune's held-out NLL gain kept by base + delta. Below 0: PR > 1 (base + delta scores better than the "
             "fine-tune on this text).\nError bars: range over seeds. Points past PR -1 sit on the top edge with their PR written. " + peers_note,
             fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nplot: {path}")


def _mark_clipped(ax, points: list[tuple[float, float, str, object]]) -> None:
    """Points off the scale: an arrow marker on the edge each passed, and its PR written out,
    the labels of one edge stacked so that neighbours do not overwrite each other."""
    for top in (True, False):
        edge = sorted((p for p in points if (1.0 - p[1] > Y_TOP) == top), key=lambda p: p[0])
        y = Y_TOP if top else Y_BOTTOM
        for k, (ratio, pr, text, color) in enumerate(edge):
            ax.plot([ratio], [y], marker="^" if top else "v", ms=10, color=color, clip_on=False, zorder=6)
            ax.annotate(text, (ratio, y), textcoords="offset points", xytext=(8, (-12 if top else 12) * (k + 1)), fontsize=7, color=color,
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5}, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def plot_from_results(model: str, out_dir: Path) -> Path:
    """Redraw ``methods-<model>.png`` from ``methods-<model>.json`` (and ``peers-<model>.md`` if
    present) without measuring anything."""
    data = json.loads((out_dir / f"methods-{model}.json").read_text())
    peers_md = out_dir / f"peers-{model}.md"
    peers, note = [], ""
    if peers_md.is_file():
        text = peers_md.read_text()
        peers = peer_points(text)
        tokens = re.search(r"\((\d+) tokens\)", text)
        note = f"Peers: from {peers_md.name}" + (f" ({tokens.group(1)} held-out tokens; these rows {data['eval_tokens']})." if tokens else ".")
    path = out_dir / f"methods-{model}.png"
    plot(data["rows"], f"{data['label']}: {data['eval_tokens']} held-out tokens, NLL base {data['nll_base']:.4f}, fine-tune {data['nll_finetuned']:.4f}", path, peers, note)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-light")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the randomized methods (auto, dare, deltadq)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out's methods-MODEL.json (and peers-MODEL.md); measure nothing")
    args = ap.parse_args()
    if args.plot_only:
        plot_from_results(args.model, args.out)
        return
    run(args.model, args.eval_tokens, args.out, args.methods.split(",") if args.methods else None, args.seeds)


if __name__ == "__main__":
    main()
