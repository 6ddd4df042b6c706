"""LoRA-exact ``auto`` (issue #18): what serving a delta as a LoRA adapter keeps, at 1/16 and 1/32.

Per target ratio of the dense delta's bytes, on one pair, in one process:

1. ``auto``, unconstrained, the delta as stored (``DeltaModel.from_pretrained``);
2. ``auto`` with ``lora=True``: every matrix a low-rank record, no sign part, as stored;
3. the same delta's adapter as vLLM serves it: ``deltahub.export_lora(..., dtype="bfloat16")``,
   the stored factors dequantized to bf16, norms and biases left out (a LoRA adapter cannot hold
   them); base + adapter merged into the bf16 weights (``peers.merge_lora``) and, as vLLM
   computes it, unmerged beside the base weights (PEFT); and, to price the norms alone, the
   merged adapter plus the delta's own decoded 1-D tensors;
4. ``auto`` with ``lora=True, max_rank=64`` (vLLM's ``--max-lora-rank 64``), as stored and as its
   adapter;
5. mergekit's LoRA extraction (``mergekit-extract-lora``, ``peers.extract_lora``) at the largest
   uniform rank whose bf16 adapter fits the target's budget (as ``benchmarks.peers`` does), and at
   the rank whose adapter takes as many bytes as row 3's adapter (equal served bytes).

Every row: bytes (stored, or the adapter's ``adapter_model.safetensors`` + ``adapter_config.json``),
the ratio of those bytes to the dense delta's, the largest rank, compress / export / extract time
and the performance retention PR = (NLL_base - NLL_x) / (NLL_base - NLL_finetuned) on held-out
Austen text, computed as ``benchmarks.peers`` computes it (its functions, imported).

    python -m benchmarks.lora_retention --model smollm2-light
    python -m benchmarks.lora_retention --model smollm2-heavy --threads 1

mergekit is optional (the ``peers`` extra); without it the mergekit rows are named in the notes
and the rest runs. The table goes to ``benchmarks/results/lora-retention-<model>.md`` and the
rows to ``.json`` beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import deltahub
from deltahub import DeltaModel
from deltahub.evaluate import mean_nll

from .measure import markdown_table
from .pairs import CACHE, get_pair
from .peers import (
    dense_delta_bytes,
    extract_lora,
    file_bytes,
    held_out_ids,
    mergekit_plan,
    lora_nlls,
    merge_lora,
    nll_of,
    parse_ratio,
    rank_for_budget,
    ratio_label,
    secs,
)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
SEED = 0


def target_label(ratio: float | None) -> str:
    """``"1/16"``, or ``"-"`` for a row sized by no target."""
    return "-" if ratio is None else ratio_label(ratio)


def timed(fn, *args, **kwargs) -> tuple[Any, tuple[float, float]]:
    """``(fn(...), (wall s, CPU s))``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def delta_shape(delta: Path) -> dict[str, Any]:
    """What a delta's records are: counts by family, sign parts, the largest and total low rank."""
    reader = deltahub.DeltaReader(delta)
    out = {"lowrank": 0, "sparse": 0, "dense": 0, "other": 0, "signed": 0, "max_rank": 0}
    for rec in reader.records.values():
        comps = rec.get("components") or []
        types = {c["type"] for c in comps}
        if rec["kind"] == "dense":
            out["dense"] += 1
        elif "lowrank" in types:
            out["lowrank"] += 1
            out["max_rank"] = max(out["max_rank"], sum(c.get("rank", 0) for c in comps if c["type"] == "lowrank"))
        elif "sparse" in types:
            out["sparse"] += 1
        elif rec["kind"] not in ("unchanged", "removed"):
            out["other"] += 1
        out["signed"] += "sign" in types
    return out


def decoded_1d(delta: Path, base: Path) -> dict[str, torch.Tensor]:
    """The delta's 1-D tensors (norms, biases) decoded against the base: what base + delta has there."""
    reader = deltahub.DeltaReader(delta)
    ckpt = deltahub.Checkpoint.open(base)
    return {name: reader.decode(name, ckpt.get(name)) for name, rec in reader.records.items()
            if rec["kind"] not in ("unchanged", "removed") and len(rec["shape"]) == 1}


def nll_adapter_with(base: Path, adapter: Path, tensors: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
    """Held-out NLL of base + adapter merged (``peers.merge_lora``), with ``tensors`` (the delta's
    decoded norms) put in place: the adapter's PR had it the norms, to price leaving them out."""
    from transformers import AutoModelForCausalLM

    model = merge_lora(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    nll = mean_nll(model, ids)
    del model
    gc.collect()
    return nll


def compress_auto(base: Path, ft: Path, out: Path, ratio: float, params: dict[str, Any], ids: torch.Tensor,
                  note=print) -> dict[str, Any]:
    """``auto`` at ``ratio`` with ``params``; the held-out NLL of ``DeltaModel.from_pretrained``
    (as ``peers.deltahub_row``, which takes no params). (The rows in results/ were taken before
    auto's planner fix, b0370ab, with a work-around reserving 4 KB more on refusal: the notes there say where.)"""
    shutil.rmtree(out, ignore_errors=True)
    reserved = 0
    result, seconds = timed(deltahub.compress, base, ft, out, method="auto", ratio=ratio, params=params, seed=SEED, progress=False)
    gc.collect()
    model = DeltaModel.from_pretrained(out)
    nll = mean_nll(model, ids)
    del model
    gc.collect()
    return {"bytes": result.stored_bytes, "dense": result.dense_bytes, "seconds": seconds, "nll": nll,
            "fallbacks": list(result.fallbacks), "reserved": reserved, **delta_shape(out)}


def export_adapter(delta: Path, out: Path) -> tuple[Any, tuple[float, float], int]:
    """``export_lora(delta, out, dtype="bfloat16")``: ``(report, seconds, adapter bytes)``."""
    shutil.rmtree(out, ignore_errors=True)
    report, seconds = timed(deltahub.export_lora, delta, out, dtype="bfloat16", progress=False)
    return report, seconds, file_bytes(out, ADAPTER_FILES)


def adapter_extra_tensors(adapter: Path) -> list[str]:
    """Keys of an adapter that are not LoRA factors (``modules_to_save``: whole tensors)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return [k for k in f.keys() if ".lora_" not in k]


def lora_only(adapter: Path, out: Path) -> int:
    """A copy of ``adapter`` with only its LoRA factors (no ``modules_to_save``), what vLLM loads
    for a causal LM (vLLM 0.32 accepts a whole module only for a classifier head); its bytes."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tensors = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if ".lora_" in k}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["modules_to_save"] = None
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return file_bytes(out, ADAPTER_FILES)


def run(model: str, ratios: list[float], max_rank: int, eval_tokens: int, mergekit_served: bool, mergekit_slot: bool,
        out_dir: Path, command: str) -> str:
    """Measure, print the table, write ``out_dir/lora-retention-<model>.md`` and ``.json``; the markdown."""
    torch.set_grad_enabled(False)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    load_start = os.getloadavg()[1]
    base, ft, label = get_pair(model)
    work = CACHE / "bench" / "lora_retention" / model
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    dense = dense_delta_bytes(ft)
    ids = held_out_ids(ft, eval_tokens)
    nll_base, nll_ft = nll_of(base, ids), nll_of(ft, ids)
    gain = nll_base - nll_ft

    def pr(nll: float | None) -> float | None:
        return None if nll is None or not gain else (nll_base - nll) / gain

    def fmt(x: float | None, digits: int = 4) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    def note(text: str) -> None:
        notes.append(text)
        print(f"NOTE: {text}", flush=True)

    print(f"{label}: dense delta {dense / 1e6:.1f} MB; NLL base {nll_base:.4f}, fine-tune {nll_ft:.4f} "
          f"({ids.numel() - 1} tokens)", flush=True)

    mk_version, per_rank, fixed = mergekit_plan(ft, note, "mergekit rows")

    rows: list[dict[str, Any]] = []
    families: list[str] = []

    def add(row: dict[str, Any]) -> None:
        row.setdefault("target", None)
        row["ratio"] = row["bytes"] / dense
        row["pr"] = pr(row.get("nll"))
        row["pr_unmerged"] = pr(row.get("nll_unmerged"))
        rows.append(row)
        print(f"{row['row']} [{target_label(row['target'])}]: {row['bytes']} bytes ({row['ratio']:.4f}), max rank {row.get('max_rank')}, "
              f"{secs(row['seconds'])} s, PR {fmt(row['pr'])}" + (f", unmerged {fmt(row['pr_unmerged'])}" if row.get("nll_unmerged") is not None else ""),
              flush=True)

    deltas = [("auto", {}), ("auto lora=true", {"lora": True}), (f"auto lora=true max_rank={max_rank}", {"lora": True, "max_rank": max_rank})]
    for ratio in ratios:
        budget = int(ratio * dense)
        served_bytes: int | None = None
        for name, params in deltas:
            out = work / f"delta-{ratio}-{'-'.join(f'{k}{v}' for k, v in params.items()) or 'plain'}"
            try:
                row = compress_auto(base, ft, out, ratio, params, ids, note)
            except deltahub.DeltahubError as e:
                note(f"{name} at {ratio_label(ratio)} refused: {e}")
                continue
            add({"row": f"{name}, as stored", "kind": "delta", "target": ratio, "params": params, **row})
            families.append(f"{name} at {ratio_label(ratio)}: {row['lowrank']} low-rank records (largest rank {row['max_rank']}, "
                            f"{row['signed']} with a sign part), {row['sparse']} sparse, {row['dense']} dense")
            if row["fallbacks"]:
                note(f"{name} at {ratio_label(ratio)}: stored dense for want of budget: {', '.join(row['fallbacks'][:4])}")
            if not params.get("lora"):
                shutil.rmtree(out, ignore_errors=True)
                continue
            adapter = work / f"adapter-{out.name}"
            try:
                report, seconds, nbytes = export_adapter(out, adapter)
                merged, unmerged = lora_nlls(base, adapter, ids)
                norms = decoded_1d(out, base)
                with_norms = nll_adapter_with(base, adapter, norms, ids)
            except Exception as e:
                note(f"export of {name} at {ratio_label(ratio)} failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)
            common = {"kind": "adapter", "target": ratio, "params": params, "bytes": nbytes, "seconds": seconds,
                      "max_rank": report.max_rank, "vllm_max_lora_rank": report.vllm_max_lora_rank, "exact": report.exact,
                      "rel_error": report.rel_error, "skipped": len(report.skipped), "skipped_share": report.skipped_share,
                      "modules": len(report.modules), "stored_bytes": row["bytes"]}
            add({"row": f"{name}, its bf16 adapter (served: norms left out)", "nll": merged, "nll_unmerged": unmerged, **common})
            add({"row": f"{name}, its bf16 adapter + the delta's {len(norms)} norms (check: norms' cost)", "nll": with_norms, **common})
            if served_bytes is None:
                served_bytes = nbytes
            shutil.rmtree(adapter, ignore_errors=True)
        if mk_version is None:
            continue
        ranks = [("budget", rank_for_budget(budget, per_rank, fixed))]
        if mergekit_served and served_bytes is not None:
            ranks.append(("served", rank_for_budget(served_bytes, per_rank, fixed)))
        if mergekit_slot and ratio == ratios[-1]:
            ranks.append(("slot", max_rank))
        for why, rank in ranks:
            out = work / f"mergekit-lora-r{rank}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                seconds, argv = extract_lora(base, ft, out, rank)
                nbytes = file_bytes(out, ADAPTER_FILES)
                extra = adapter_extra_tensors(out)
                merged, unmerged = lora_nlls(base, out, ids)
                if extra:
                    stripped = out.with_name(out.name + "-lora-only")
                    stripped_bytes = lora_only(out, stripped)
                    s_merged, s_unmerged = lora_nlls(base, stripped, ids)
                    shutil.rmtree(stripped, ignore_errors=True)
            except Exception as e:
                note(f"mergekit LoRA extraction at r={rank} failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)
            what = {"budget": f"fits the {ratio_label(ratio)} budget ({budget / 1e6:.2f} MB)",
                    "served": f"fits row 'auto lora=true' adapter's bytes ({(served_bytes or 0) / 1e6:.2f} MB)",
                    "slot": f"= max_rank: the same --max-lora-rank {max_rank} slot as the capped rows"}[why]
            add({"row": f"mergekit {mk_version} LoRA r={rank} ({what})", "kind": "mergekit", "target": None if why == "slot" else ratio,
                 "match": why, "bytes": nbytes, "seconds": seconds, "max_rank": rank, "nll": merged, "nll_unmerged": unmerged,
                 "whole_tensors": len(extra)})
            if extra:
                add({"row": f"mergekit {mk_version} LoRA r={rank}, without its {len(extra)} whole tensors (served: norms left out)",
                     "kind": "mergekit", "target": None if why == "slot" else ratio, "match": why, "bytes": stripped_bytes, "seconds": seconds, "max_rank": rank,
                     "nll": s_merged, "nll_unmerged": s_unmerged, "whole_tensors": 0})
            if why != "slot" and nbytes > (budget if why == "budget" else served_bytes):
                note(f"mergekit LoRA r={rank} is {nbytes} bytes, over the {why} bytes it was sized for (rank estimate off)")
            if not any(n.startswith("mergekit adapters") for n in notes):
                shown = " ".join({str(base): "BASE", str(ft): "FT", str(out): "OUT"}.get(a, a) for a in argv)
                note(f"mergekit adapters: `{shown}`" + (f"; they carry {len(extra)} whole tensors besides the LoRA factors "
                                                        f"(`modules_to_save`, e.g. {extra[0]}), which vLLM refuses for a causal LM (it takes a whole "
                                                        "module only as a classifier head), so each is also scored without them" if extra else "; LoRA factors only"))

    table = [[r["row"], target_label(r["target"]), f"{r['bytes'] / 1e6:.2f}", f"{r['ratio']:.4f}", r.get("max_rank") or "-",
              secs(r["seconds"]) if (r["kind"] == "adapter") == r["row"].endswith("left out)") or r["kind"] == "delta" else "-",
              f"{r['nll']:.4f}", fmt(r["pr"]), fmt(r["pr_unmerged"])] for r in rows]
    elapsed = time.perf_counter() - started
    notes.append("records: " + "; ".join(families))
    notes.append("MB: stored bytes of a delta (shards, index, config), or an adapter's adapter_model.safetensors + adapter_config.json; "
                 "ratio: those bytes / the dense delta's bytes. PR: merged into the bf16 weights (DeltaModel.from_pretrained for a delta, "
                 "peers.merge_lora for an adapter); 'PR, peft unmerged': the adapter loaded by PEFT beside the base weights, as vLLM computes it")
    notes.append(f"auto: seed {SEED}; adapters: deltahub.export_lora(delta, out, dtype=\"bfloat16\"), exact in float32 by construction, "
                 "here the dequantized factors rounded once to bf16")
    notes.append(f"{os.cpu_count()} CPU cores, torch threads: {torch.get_num_threads()}, niceness {os.nice(0)}; 5-minute load average "
                 f"{load_start:.1f} at the start, {os.getloadavg()[1]:.1f} at the end; whole run {elapsed / 60:.1f} min "
                 "(times: wall clock, and this process's CPU time; other processes inflate both)")
    md = [f"`{command}`", "",
          f"### LoRA-exact auto: {label}; dense delta {dense / 1e6:.1f} MB; held-out NLL base {nll_base:.4f}, "
          f"fine-tune {nll_ft:.4f} ({ids.numel() - 1} tokens)", "",
          markdown_table(["row", "target", "MB", "ratio", "max rank", "compress / export / extract s: wall (CPU)", "NLL", "PR",
                          "PR, peft unmerged"], table),
          "", "Notes:", ""] + [f"- {n}" for n in notes]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"lora-retention-{model}.md").write_text(text)
    payload = {"command": command, "model": model, "label": label, "dense_bytes": dense, "eval_tokens": ids.numel() - 1,
               "nll_base": nll_base, "nll_finetuned": nll_ft, "threads": torch.get_num_threads(), "seconds": elapsed,
               "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows], "notes": notes}
    (out_dir / f"lora-retention-{model}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"written: {out_dir / f'lora-retention-{model}.md'} and .json")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-light", help="smollm2-light, smollm2-heavy or a recorded pair's name")
    ap.add_argument("--ratios", default="1/16,1/32", help="comma-separated, e.g. 1/16,1/32")
    ap.add_argument("--max-rank", type=int, default=64, help="the capped row's auto max_rank (vLLM's --max-lora-rank)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--nice", type=int, default=5, help="added to this process's niceness (0: none)")
    ap.add_argument("--no-mergekit-served", action="store_true",
                    help="skip the mergekit row at the bytes of the auto lora=true adapter (equal served bytes)")
    ap.add_argument("--mergekit-slot", action=argparse.BooleanOptionalAction, default=True,
                    help="also mergekit at r = --max-rank, once (the same vLLM --max-lora-rank slot as the capped row)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)
    torch.set_num_threads(args.threads)
    command = ("python -m benchmarks.lora_retention " + " ".join(sys.argv[1:])).strip()
    run(args.model, [parse_ratio(r) for r in args.ratios.split(",")], args.max_rank, args.eval_tokens,
        not args.no_mergekit_served, args.mergekit_slot, args.out, command)


if __name__ == "__main__":
    main()
