"""Retention where it is hard (issue #20): what each method keeps of a fine-tune that added
knowledge and a skill, at 1/16 to 1/256.

The pair is :mod:`benchmarks.knowledge_pair` (SmolLM2-135M-Instruct taught 120 invented facts and
two-digit addition). For every method at every target ratio, and for mergekit's LoRA extraction
at the largest rank that fits the same bytes, the benchmark compresses, loads base + delta
(``DeltaModel.from_pretrained``; mergekit's adapter merged as PEFT defines it) and scores:

- **facts**: exact-match accuracy on the 120 facts, greedy decoding (retention = accuracy /
  the fine-tune's);
- **skill**: exact-match accuracy on 200 held-out additions (retention = the share of the
  fine-tune's gain over the base that is kept);
- **PR**: performance retention on the held-out additions' answer NLL.

Methods that draw from the seed run with ``--seeds`` seeds (the mean, and the range). A method
that cannot reach a ratio (its smallest record is larger) is listed as refused. Rows are saved
as they are measured (``knowledge-retention.json``), and a rerun measures only what is missing.

``--pair smollm2-light`` or ``smollm2-heavy`` runs the same methods and ratios on an Austen pair,
scored by PR on 8,192 held-out Austen tokens. A variant ``auto:calibration=train`` compresses
with the fine-tune's own training text as calibration (``austen``: Austen prose;
``calibration_tokens=N`` sets how much).

    python -m benchmarks.knowledge                                   # everything (long: about 1 min per row)
    python -m benchmarks.knowledge --methods auto,deltacome --ratios 1/64,1/128 --seeds 1
    python -m benchmarks.knowledge --methods "auto;auto:noise_weight=1,calibration=train" --seeds 1
    python -m benchmarks.knowledge --pair smollm2-heavy --methods auto,deltacome,svd,mergekit --seeds 1
    python -m benchmarks.knowledge --plot-only

Results: ``benchmarks/results/knowledge-retention.{md,json,png}``, ``retention-<pair>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import deltahub

from .measure import markdown_table
from .pairs import CACHE, get_pair
from .peers import dense_delta_bytes, extract_lora, file_bytes, merge_lora, mergekit_plan, parse_ratio, rank_for_budget, ratio_label

RESULTS = Path(__file__).parent / "results"
RATIOS = (1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256)
METHODS = ("auto", "deltacome", "svd", "dqrelo", "deltadq", "dare", "magnitude", "bitdelta", "mergekit")
NATURAL = ("bitdelta",)
RANDOM = ("auto", "dare", "deltadq")
# Variants drawn in the plot (dashed) besides the methods: auto before the noise weight, and
# auto with its sparse family forced.
PLOTTED_VARIANTS = ("auto:zstd_codes=false", "auto:noise_weight=1,zstd_codes=false", "auto:lowrank_above=1000")


EVAL_TOKENS = 8192  # held-out Austen tokens for the PR of the Austen pairs (as benchmarks.methods)


class Scorer:
    """What a run is scored on: the knowledge pair's facts, skill and answer NLL, or an Austen
    pair's held-out NLL alone (``--pair smollm2-light`` / ``smollm2-heavy``)."""

    def __init__(self, pair: str, tokenizer) -> None:
        self.pair, self.tokenizer = pair, tokenizer
        if pair != "knowledge":
            from .real_pair import heldout_text

            self.ids = tokenizer(heldout_text(), return_tensors="pt").input_ids[0][: EVAL_TOKENS + 1]

    def __call__(self, model) -> dict[str, float]:
        with torch.inference_mode():
            if self.pair == "knowledge":
                from .knowledge_pair import evaluate

                return evaluate(model, self.tokenizer)
            from .methods import heldout_nll

            return {"nll": heldout_nll(model, self.ids)}


def split_variant(method: str) -> tuple[str, dict[str, Any]]:
    """``"auto:sign_part=never,max_rank=8"`` as ``("auto", {"sign_part": "never", "max_rank": 8})``."""
    from deltahub.policy import parse_value

    name, _, params = method.partition(":")
    return name, {k: parse_value(v) for k, v in (item.split("=", 1) for item in params.split(",") if item)}


def measure_delta(method: str, ratio: float | None, seed: int, base: Path, ft: Path, scorer: Scorer, work: Path) -> dict[str, Any]:
    name, params = split_variant(method)
    out = work / f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}-{ratio}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    calibration = _calibration_file(params.pop("calibration", None), work)
    extra = {"calibration_tokens": params.pop("calibration_tokens")} if "calibration_tokens" in params else {}
    t0 = time.perf_counter()
    result = deltahub.compress(base, ft, out, method=name, ratio=ratio, params=params, seed=seed, progress=False, calibration=calibration, **extra)
    seconds = time.perf_counter() - t0
    model = deltahub.DeltaModel.from_pretrained(out)
    scores = scorer(model)
    del model
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return {"ratio": result.ratio, "bytes": result.stored_bytes, "compress_s": seconds, **scores}


def _calibration_file(source: str | None, work: Path) -> Path | None:
    """``calibration=train`` in a variant: the fine-tune's own training text (what its owner has);
    ``calibration=austen``: Austen prose, text unrelated to what the fine-tune learned."""
    if source is None:
        return None
    if source == "train":
        from .knowledge_pair import train_text

        text = train_text()
    elif source == "austen":
        from .real_pair import train_text as austen_text

        text = austen_text()
    else:
        raise SystemExit(f"calibration={source!r}: choose train or austen")
    path = work / f"calibration-{source}.txt"
    path.write_text(text)
    return path


def measure_mergekit(ratio: float, base: Path, ft: Path, scorer: Scorer, work: Path, dense: int, per_rank: int, fixed: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    rank = rank_for_budget(int(ratio * dense), per_rank, fixed)
    out = work / f"mergekit-r{rank}"
    shutil.rmtree(out, ignore_errors=True)
    (seconds, _), _ = extract_lora(base, ft, out, rank)
    nbytes = file_bytes(out, ("adapter_model.safetensors", "adapter_config.json"))
    model = merge_lora(AutoModelForCausalLM.from_pretrained(base), out)
    scores = scorer(model)
    del model
    gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return {"ratio": nbytes / dense, "bytes": nbytes, "compress_s": seconds, "rank": rank, **scores}


def retention(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Facts retention, skill retention (share of the gain over the base) and PR of one run's scores."""
    b, f = ref["base_scores"], ref["scores"]

    def kept(key: str) -> float:
        gain = f[key] - b[key]
        return (row[key] - b[key]) / gain if gain else float("nan")

    pr = {"pr": (b["nll"] - row["nll"]) / (b["nll"] - f["nll"])}
    return {"facts_ret": row["facts"] / f["facts"], "skill_ret": kept("skill"), **pr} if "facts" in f else pr


def results_name(pair: str) -> str:
    return "knowledge-retention" if pair == "knowledge" else f"retention-{pair}"


def weights_digest(folder: Path) -> str:
    """A short SHA-256 of the fine-tune's weight files: which build of the pair a row measured."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def run(methods: list[str], ratios: list[float], seeds: int, out_dir: Path, pair: str = "knowledge") -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_pair import base_path

    torch.set_grad_enabled(False)
    if pair == "knowledge":
        from .knowledge_pair import META_FILE, knowledge_path

        ft, base = knowledge_path(), base_path()
        ref = json.loads((ft / META_FILE).read_text())
    else:
        base, ft, _ = get_pair(pair)
        ref = {"data_key": ft.name, "recipe": json.loads((ft / "real_pair.json").read_text()).get("recipe", {}), "mean_abs_delta": None}
    tokenizer = AutoTokenizer.from_pretrained(ft)
    scorer = Scorer(pair, tokenizer)
    dense = dense_delta_bytes(ft)
    work = CACHE / "bench" / "knowledge"
    work.mkdir(parents=True, exist_ok=True)
    saved = out_dir / f"{results_name(pair)}.json"
    doc = json.loads(saved.read_text()) if saved.is_file() else {}
    # The recipe's key names the fine-tune, not its weights: a rebuild on another machine trains
    # to other weights (the knowledge pair's answer NLL was 0.031 on one build and 0.014 on the
    # next). Rows of another build, or of an unknown one, are never mixed with this build's.
    ref["weights"] = weights_digest(ft)
    if doc.get("data_key") == ref["data_key"] and doc["reference"].get("weights") != ref["weights"]:
        raise SystemExit(
            f"{saved} was measured on another build of {ref['data_key']} (weights {doc['reference'].get('weights') or 'not recorded'}, "
            f"this build {ref['weights']}): its rows do not apply here; pass --out DIR to measure this build in a file of its own"
        )
    if doc.get("data_key") != ref["data_key"]:  # another fine-tune: nothing measured before applies
        if pair != "knowledge":
            ref["base_scores"] = scorer(AutoModelForCausalLM.from_pretrained(base))
            ref["scores"] = scorer(AutoModelForCausalLM.from_pretrained(ft))
        doc = {"pair": pair, "data_key": ref["data_key"], "reference": {k: ref[k] for k in ("base_scores", "scores", "mean_abs_delta", "recipe", "weights")}, "rows": []}
    ref = {**ref, **doc["reference"]}
    rows: list[dict[str, Any]] = doc["rows"]
    done = {(r["method"], r["target"], r["seed"]) for r in rows}
    mk = mergekit_plan(ft, lambda text: print(f"NOTE: {text}"), "mergekit rows") if "mergekit" in methods else (None, 0, 0)

    for method in methods:
        family = split_variant(method)[0]
        for ratio in [None] if family in NATURAL else ratios:
            for seed in range(seeds if family in RANDOM else 1):
                if (method, ratio, seed) in done:
                    continue
                try:
                    if method == "mergekit":
                        if mk[0] is None:
                            continue
                        row = measure_mergekit(ratio, base, ft, scorer, work, dense, mk[1], mk[2])
                    else:
                        row = measure_delta(method, ratio, seed, base, ft, scorer, work)
                except deltahub.DeltahubError as e:
                    row = {"refused": str(e).splitlines()[0][:300]}
                row = {"method": method, "target": ratio, "seed": seed, **row}
                if "refused" not in row:
                    row.update(retention(row, ref))
                    scores = f"facts {row['facts']:.3f}  skill {row['skill']:.3f}  " if "facts" in row else ""
                    print(f"{method:10s} {ratio_label(ratio) if ratio else 'natural':8s} seed {seed}: ratio {row['ratio']:.4f}  {scores}"
                          f"PR {row['pr']:.4f}  {row['compress_s']:.0f} s", flush=True)
                else:
                    print(f"{method:10s} {ratio_label(ratio) if ratio else 'natural':8s}: refused: {row['refused'][:160]}", flush=True)
                rows.append(row)
                out_dir.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(doc, indent=1))
    write_report(doc, out_dir)
    return doc


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, target): means over seeds with their ranges."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), runs in groups.items():
        ok = [r for r in runs if "refused" not in r]
        if not ok:
            out.append({"method": method, "target": target, "refused": runs[0]["refused"]})
            continue
        entry = {"method": method, "target": target, "seeds": len(ok)}
        for key in [k for k in ("ratio", "facts", "skill", "nll", "facts_ret", "skill_ret", "pr", "compress_s") if k in ok[0]]:
            values = [r[key] for r in ok]
            entry[key] = sum(values) / len(values)
            entry[key + "_range"] = (min(values), max(values))
        out.append(entry)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda e: (order.get(split_variant(e["method"])[0], 99), e["method"], -(e["target"] or 1)))


def _cell(e: dict[str, Any], key: str, digits: int = 3) -> str:
    lo, hi = e[key + "_range"]
    return f"{e[key]:.{digits}f}" + (f" ({lo:.{digits}f}..{hi:.{digits}f})" if e["seeds"] > 1 and hi > lo else "")


def write_report(doc: dict[str, Any], out_dir: Path) -> str:
    ref = doc["reference"]
    pair = doc.get("pair", "knowledge")
    b, f = ref["base_scores"], ref["scores"]
    knowledge = pair == "knowledge"
    table = []
    for e in summarize(doc["rows"]):
        target = "natural" if e["target"] is None else ratio_label(e["target"])
        if "refused" in e:
            table.append([e["method"], target, "-", "refused"] + [""] * (4 if knowledge else 1))
            continue
        scores = [_cell(e, "facts"), _cell(e, "facts_ret"), _cell(e, "skill_ret"), _cell(e, "pr")] if knowledge else [_cell(e, "pr", 4)]
        table.append([e["method"], target, f"{e['ratio']:.4f}", *scores, f"{e['compress_s']:.0f}"])
    command = "python -m benchmarks.knowledge" + ("" if knowledge else f" --pair {pair}")
    if knowledge:
        head = [
            "### Retention of added knowledge and skill: SmolLM2-135M + 120 invented facts + two-digit addition", "",
            f"`{command}` (benchmarks/knowledge_pair.py builds the fine-tune: "
            f"{ref['recipe']['steps']} steps at lr {ref['recipe']['lr']:g}, mean |Δ| {ref['mean_abs_delta']:.2e})", "",
            f"Base: facts {b['facts']:.3f}, held-out additions {b['skill']:.3f}, answer NLL {b['nll']:.4f}. "
            f"Fine-tune: facts {f['facts']:.3f}, held-out additions {f['skill']:.3f}, answer NLL {f['nll']:.4f}.", ""]
        columns = ["method", "target", "honest ratio", "facts exact", "facts retention", "skill retention", "PR (answer NLL)", "compress s"]
        foot = ("facts retention = facts exact-match / the fine-tune's; skill retention = (accuracy - base) / (fine-tune - base) on 200 held-out "
                "additions; PR the same on their answer NLL. Greedy exact match, scored in one teacher-forced pass. ")
    else:
        head = [f"### Retention at hard ratios: {pair} (SmolLM2-135M + Austen)", "", f"`{command}`", "",
                f"Held-out NLL ({EVAL_TOKENS} Austen tokens, float32): base {b['nll']:.4f}, fine-tune {f['nll']:.4f}.", ""]
        columns = ["method", "target", "honest ratio", "PR (held-out NLL)", "compress s"]
        foot = "PR = (NLL base - NLL) / (NLL base - NLL fine-tune). "
    text = "\n".join([*head, markdown_table(columns, table), "",
                      foot + "Seeded methods: mean (range) over seeds. mergekit: `mergekit-extract-lora --embed-lora` at the largest rank "
                      "whose adapter fits the bytes, merged as PEFT does.", ""])
    (out_dir / f"{results_name(pair)}.md").write_text(text)
    plot(doc, out_dir / f"{results_name(pair)}.png")
    print(text)
    return text


def plot(doc: dict[str, Any], path: Path) -> None:
    """Facts retention loss (1 - retention, log scale) against the honest ratio, every method,
    seed ranges as error bars; a loss of 0 is drawn at the bottom edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-3
    # The methods, and the variants that tell the story; the table lists every variant.
    entries = [e for e in summarize(doc["rows"]) if "refused" not in e and (":" not in e["method"] or e["method"] in PLOTTED_VARIANTS)]
    if doc.get("pair", "knowledge") == "knowledge":
        panels = (("facts_ret", "facts (exact match)"), ("skill_ret", "held-out additions (exact match)"))
    else:
        panels = (("pr", f"{doc['pair']}: PR on held-out Austen NLL"),)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 1.5, 5.5), sharex=True, squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        for i, method in enumerate(dict.fromkeys(e["method"] for e in entries)):
            pts = sorted((e for e in entries if e["method"] == method), key=lambda e: e["ratio"])
            loss = lambda v: max(floor, 1 - v)  # noqa: E731
            ys = [loss(e[key]) for e in pts]
            lo = [y - loss(e[key + "_range"][1]) for y, e in zip(ys, pts)]
            hi = [loss(e[key + "_range"][0]) - y for y, e in zip(ys, pts)]
            ax.errorbar([e["ratio"] for e in pts], ys, yerr=[lo, hi], marker="osD^v<>PX*h"[i % 10], ms=5, lw=1.1, capsize=3,
                        label=method, color="black" if method == "mergekit" else plt.get_cmap("tab10")(i % 10),
                        ls="--" if ":" in method else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = [2.0**-k for k in range(9, 3, -1)]
        ax.set_xticks(ticks, [f"1/{round(1 / x)}" for x in ticks])
        ax.set_ylim(floor * 0.8, 1.5)
        ax.grid(True, which="major", lw=0.3, alpha=0.6)
        ax.set_xlabel("honest ratio (stored bytes / dense delta bytes)")
        ax.set_ylabel("retention loss 1 - retention (log; lower is better)")
        ax.set_title(title, fontsize=10)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.text(0.01, 0.01, f"Losses at or below {floor:g} (all kept) are drawn at {floor:g}. Error bars: range over seeds.", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated; variants with parameters separated by ';': 'auto;auto:sign_part=never,lowrank_above=0.002'")
    ap.add_argument("--ratios", default=",".join(ratio_label(r) for r in RATIOS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the methods that draw")
    ap.add_argument("--pair", default="knowledge", choices=("knowledge", "smollm2-light", "smollm2-heavy"),
                    help="knowledge: facts, skill and PR; an Austen pair: PR on held-out Austen text")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if args.plot_only:
        write_report(json.loads((args.out / f"{results_name(args.pair)}.json").read_text()), args.out)
        return
    methods = args.methods.split(";") if ";" in args.methods else args.methods.split(",")
    unknown = {split_variant(m)[0] for m in methods} - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    run(methods, [parse_ratio(r) for r in args.ratios.split(",")], args.seeds, args.out, args.pair)


if __name__ == "__main__":
    main()
