"""Peers benchmark: deltahub against the tools a user would otherwise pick, on the same pair, in one run.

Lossy, at the same bytes: mergekit's LoRA extraction (``mergekit-extract-lora``, a truncated
SVD of each weight's delta) at the largest uniform rank whose adapter fits deltahub's budget at
each ratio (1/8 and 1/16 of the dense delta), against deltahub's methods at the same ratios.
Every row: stored bytes, the ratio to the dense delta's bytes, extraction / compress time and
the performance retention PR on held-out Austen text,
PR = (NLL_base - NLL_x) / (NLL_base - NLL_finetuned).

Lossless: zipnn on the fine-tune's safetensors files, and with its XOR delta mode against the
base's files (only where the two files have the same length, that is the same layout),
against deltahub's ``lossless`` method: bytes relative to the fine-tune's files, compress time,
decompress / decode time, and the time of ``DeltaModel.from_pretrained``.

    python -m benchmarks.peers --model smollm2-light
    python -m benchmarks.peers --model smollm2-heavy --threads 1
    python -m benchmarks.peers --model NAME   # a pair recorded by benchmarks.real_pair --base/--finetuned

The peer tools are optional (``pip install -c constraints.txt -e ".[peers]"``, see
benchmarks/README.md); a tool that is missing or fails is reported in the output and the
rest still runs. The table is also written to ``benchmarks/results/peers-<model>.md``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

import deltahub
from deltahub import DeltaModel
from deltahub.evaluate import mean_nll
from deltahub.format.dtypes import itemsize

from .measure import markdown_table
from .pairs import CACHE, get_pair

DEFAULT_METHODS = ("svd", "deltacome", "dqrelo", "deltadq")
ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
SAFETENSORS_ENTRY_BYTES = 160  # rough safetensors header bytes per tensor, for the rank estimate only


def secs(t: tuple[float, float]) -> str:
    """``(wall, cpu)`` seconds as ``"wall (cpu)"``."""
    return f"{t[0]:.1f} ({t[1]:.1f})" if t[0] >= 10 else f"{t[0]:.2f} ({t[1]:.2f})"


def parse_ratio(text: str) -> float:
    """``"1/8"`` or ``"0.125"`` as a float."""
    return float(Fraction(text))


def ratio_label(ratio: float) -> str:
    """``0.125`` as ``"1/8"``."""
    return f"1/{round(1 / ratio)}" if ratio and abs(1 / ratio - round(1 / ratio)) < 1e-9 else f"{ratio:g}"


def file_bytes(folder: Path, names: tuple[str, ...] = ("*.safetensors",)) -> int:
    """Total size of the files in ``folder`` matching any of ``names``."""
    return sum(p.stat().st_size for pattern in names for p in folder.glob(pattern))


def dense_delta_bytes(finetuned: Path) -> int:
    """Bytes of the dense delta in the fine-tune's dtype: every tensor's elements times its item size."""
    ckpt = deltahub.Checkpoint.open(finetuned)
    total = 0
    for name in ckpt.names():
        info = ckpt.info(name)
        total += math.prod(info.shape) * itemsize(info.dtype)
    return total


def ckpt_dtype(finetuned: Path) -> str:
    """The safetensors dtype that most of the fine-tune's elements have (``"BF16"`` ...)."""
    ckpt = deltahub.Checkpoint.open(finetuned)
    count: dict[str, int] = {}
    for name in ckpt.names():
        info = ckpt.info(name)
        count[info.dtype] = count.get(info.dtype, 0) + math.prod(info.shape)
    return max(count, key=count.__getitem__)


def held_out_ids(finetuned: Path, eval_tokens: int) -> torch.Tensor:
    """The first ``eval_tokens + 1`` token ids of the held-out Austen text, as in benchmarks.methods."""
    from transformers import AutoTokenizer

    from benchmarks.real_pair import heldout_text

    tok = AutoTokenizer.from_pretrained(finetuned)
    return tok(heldout_text(), return_tensors="pt").input_ids[0][: eval_tokens + 1]


def nll_of(path: Path, ids: torch.Tensor) -> float:
    """Held-out NLL of the checkpoint at ``path`` (its own dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    nll = mean_nll(model, ids)
    del model
    gc.collect()
    return nll


# --------------------------------------------------------------------------- mergekit LoRA


def lora_bytes_model(finetuned: Path, embed_lora: bool = True) -> tuple[int, int]:
    """``(bytes per unit of rank, fixed bytes)`` of a mergekit LoRA adapter of ``finetuned``.

    Mirrors mergekit's plan: every ``nn.Linear`` (and ``nn.Embedding`` with ``embed_lora``) gets
    ``A [r, in]`` and ``B [out, r]``, a tied output head its own pair; other modules with weights
    (norms) are saved whole (``modules_to_save``); plus a rough safetensors header. Only used to
    choose the rank: the table reports the bytes actually written.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    item = itemsize(ckpt_dtype(finetuned))
    config = AutoConfig.from_pretrained(finetuned)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    per_rank, fixed, entries = 0, 0, 0
    for _, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if "weight" not in own:
            continue
        if isinstance(module, torch.nn.Linear):
            per_rank += (module.in_features + module.out_features) * item
            entries += 2
        elif isinstance(module, torch.nn.Embedding) and embed_lora:
            per_rank += (module.num_embeddings + module.embedding_dim) * item
            entries += 2
        else:
            fixed += own["weight"].numel() * item
            entries += 1
        if own.get("bias") is not None:
            fixed += own["bias"].numel() * item
            entries += 1
    return per_rank, fixed + entries * SAFETENSORS_ENTRY_BYTES + 1024


def mergekit_plan(ft: Path, note, what: str) -> tuple[str | None, int, int]:
    """``(mergekit's version, bytes per unit of rank, fixed bytes)`` of its LoRA adapters of
    ``ft``, or ``(None, 0, 0)`` with a note when mergekit is missing or cannot plan the model."""
    try:
        import mergekit  # noqa: F401
        from importlib.metadata import version

        return version("mergekit"), *lora_bytes_model(ft)
    except Exception as e:  # ImportError, or a model mergekit cannot plan
        note(f"{what} skipped: {type(e).__name__}: {e}. Install with "
             "`pip install -c constraints.txt -e \".[peers]\"` (see benchmarks/README.md).")
        return None, 0, 0


def rank_for_budget(budget: int, per_rank: int, fixed: int) -> int:
    """The largest uniform rank whose estimated adapter bytes fit ``budget`` (at least 1)."""
    return max(1, (budget - fixed) // per_rank)


def extract_lora(base: Path, finetuned: Path, out: Path, rank: int) -> tuple[tuple[float, float], list[str]]:
    """Run mergekit's ``mergekit-extract-lora`` in this process on CPU; ``((wall s, CPU s), argv)``.

    ``--embed-lora`` makes the embeddings low-rank too (by default mergekit saves them at full
    rank in ``modules_to_save``, which alone is larger than a 1/8 budget of a small model).
    """
    from mergekit.scripts.extract_lora import main as extract_main

    argv = ["--model", str(finetuned), "--base-model", str(base), "--out-path", str(out),
            "--max-rank", str(rank), "--embed-lora", "--device", "cpu", "--quiet"]
    t0, c0 = time.perf_counter(), time.process_time()
    extract_main.main(args=argv, standalone_mode=False)
    return (time.perf_counter() - t0, time.process_time() - c0), ["mergekit-extract-lora", *argv]


def _lora_scaling(cfg: dict[str, Any], module: str) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for ``module``, honouring the patterns."""
    short = module.split(".")[-1]

    def pick(pattern: dict[str, Any], default: Any) -> Any:
        for key in (module, short):
            if key in pattern:
                return pattern[key]
        return default

    r = pick(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pick(cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", r))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def merge_lora(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """Merge a PEFT LoRA adapter into ``model`` in place, as PEFT defines it, without peft.

    Linear: ``W += B @ A * scaling``; embedding: ``W += (B @ A).T * scaling``; ``lora_B.bias``
    adds to the bias; ``modules_to_save`` replace the module's tensors. An output head tied to
    the input embedding is untied first when the adapter has its own LoRA for it, so each side
    gets its own update, as an unmerged PEFT model computes it.
    """
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model."
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head_name = next(n for n, m in modules.items() if m is head)
        if any(k.startswith(f"{prefix}{head_name}.lora") for k in tensors):
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    done: set[str] = set()
    with torch.no_grad():
        for key in tensors:
            name = key[len(prefix):]
            for kind in ("lora_A.weight", "lora_embedding_A"):
                if name.endswith("." + kind):
                    mod_name = name[: -len(kind) - 1]
                    b_key = key.replace("lora_A.weight", "lora_B.weight").replace("lora_embedding_A", "lora_embedding_B")
                    a, b = tensors[key].float(), tensors[b_key].float()
                    delta = (b @ a) * _lora_scaling(cfg, mod_name)
                    if kind == "lora_embedding_A":
                        delta = delta.T
                    w = modules[mod_name].weight
                    w.copy_((w.float() + delta).to(w.dtype))
                    bias = tensors.get(f"{prefix}{mod_name}.lora_B.bias")
                    if bias is not None:
                        modules[mod_name].bias.add_(bias.to(modules[mod_name].bias.dtype))
                    done.update({key, b_key, f"{prefix}{mod_name}.lora_B.bias"})
        for key, value in tensors.items():
            if key in done:
                continue
            name = key[len(prefix):]
            mod_name, _, attr = name.rpartition(".")
            if ".lora_" in name or mod_name not in modules:
                raise ValueError(f"adapter tensor {key} not understood")
            getattr(modules[mod_name], attr).copy_(value)
    return model


def lora_nlls(base: Path, adapter: Path, ids: torch.Tensor) -> tuple[float, float | None]:
    """Held-out NLL of base + adapter: ``(merged, unmerged)``.

    ``merged``: the adapter merged into the weights by :func:`merge_lora` and the result kept in
    the checkpoint's dtype, as ``merge_and_unload`` or any merged export gives, and as deltahub
    decodes. ``unmerged``: loaded with peft (``PeftModel.from_pretrained``), the LoRA path
    computed beside the base weights; ``None`` without peft.
    """
    from transformers import AutoModelForCausalLM

    merged = mean_nll(merge_lora(AutoModelForCausalLM.from_pretrained(base), adapter).eval(), ids)
    gc.collect()
    try:
        from peft import PeftModel
    except ImportError:
        return merged, None
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    unmerged = mean_nll(model, ids)
    del model
    gc.collect()
    return merged, unmerged


# --------------------------------------------------------------------------- zipnn


def zipnn_rows(base: Path, finetuned: Path, dtype: str) -> list[dict[str, Any]]:
    """zipnn on each of the fine-tune's safetensors files, plain and XOR-delta against the base's file.

    Each file is read into memory first (not timed), compressed with zipnn's byte API
    (``ZipNN(input_format="byte", bytearray_dtype=...)``), decompressed and checked bit for bit.
    zipnn 0.5.4 rewrites the buffer it compresses in place (even a ``bytes`` object), so it is
    given a copy.
    """
    from zipnn import ZipNN

    zdtype = ZIPNN_DTYPES.get(dtype)
    if zdtype is None:
        raise ValueError(f"zipnn has no byte-grouping for dtype {dtype}")
    files = sorted(finetuned.glob("*.safetensors"))
    rows = []
    for mode in ("plain", "delta"):
        orig = comp = 0
        t_comp = t_dec = c_comp = c_dec = 0.0
        skipped = None
        for f in files:
            data = f.read_bytes()
            digest = hashlib.sha256(data).digest()
            other = base / f.name
            if mode == "delta":
                if not other.is_file() or other.stat().st_size != len(data):
                    skipped = f"{f.name}: the base has no file of the same name and length (different layout); XOR delta needs equal layouts"
                    break
                second: bytes | None = other.read_bytes()
                kw = {"delta_compressed_type": "byte"}
            else:
                second, kw = None, {}
            work = bytearray(data)
            del data
            t0, c0 = time.perf_counter(), time.process_time()
            packed = ZipNN(input_format="byte", bytearray_dtype=zdtype, **kw).compress(work, delta_second_data=second)
            t_comp, c_comp = t_comp + time.perf_counter() - t0, c_comp + time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            out = ZipNN(input_format="byte", bytearray_dtype=zdtype, **kw).decompress(packed, delta_second_data=second)
            t_dec, c_dec = t_dec + time.perf_counter() - t0, c_dec + time.process_time() - c0
            if hashlib.sha256(out).digest() != digest:
                raise RuntimeError(f"zipnn {mode} round trip of {f.name} is not bit-exact")
            orig += len(work)
            comp += len(packed)
            del work, out, packed, second
            gc.collect()
        rows.append({"mode": mode, "orig": orig, "comp": comp, "compress_s": (t_comp, c_comp), "decompress_s": (t_dec, c_dec),
                     "skipped": skipped})
    return rows


# --------------------------------------------------------------------------- deltahub


def deltahub_row(base: Path, ft: Path, out: Path, method: str, ratio: float | None, ids: torch.Tensor | None) -> dict[str, Any]:
    """Compress with deltahub, then (if ``ids``) the held-out NLL of ``DeltaModel.from_pretrained``."""
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    result = deltahub.compress(base, ft, out, method=method, ratio=ratio, progress=False)
    row: dict[str, Any] = {"bytes": result.stored_bytes, "dense": result.dense_bytes,
                           "seconds": (time.perf_counter() - t0, time.process_time() - c0)}
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    model = DeltaModel.from_pretrained(out)
    row["load_s"] = (time.perf_counter() - t0, time.process_time() - c0)
    if ids is not None:
        row["nll"] = mean_nll(model, ids)
    del model
    gc.collect()
    return row


def decode_time(delta: Path, base: Path) -> tuple[float, float]:
    """``(wall, CPU)`` seconds to decode every tensor of ``delta`` against ``base`` (base reads included)."""
    reader = deltahub.DeltaReader(delta)
    ckpt = deltahub.Checkpoint.open(base)
    t0, c0 = time.perf_counter(), time.process_time()
    for name, rec in reader.records.items():
        if rec["kind"] != "removed":
            reader.decode(name, ckpt.get(name) if name in ckpt else None)
    return time.perf_counter() - t0, time.process_time() - c0


# --------------------------------------------------------------------------- run


def run(model: str, ratios: list[float], methods: list[str], eval_tokens: int, out_dir: Path, command: str) -> str:
    """Measure everything, print the tables, write them to ``out_dir/peers-<model>.md``; the markdown."""
    torch.set_grad_enabled(False)
    load_start = os.getloadavg()[1]
    base, ft, label = get_pair(model)
    work = CACHE / "bench" / "peers" / model
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    dense = dense_delta_bytes(ft)
    ft_bytes = file_bytes(ft)
    dtype = ckpt_dtype(ft)
    ids = held_out_ids(ft, eval_tokens)
    nll_base, nll_ft = nll_of(base, ids), nll_of(ft, ids)
    gain = nll_base - nll_ft

    def pr(nll: float) -> str:
        return f"{(nll_base - nll) / gain:.4f}" if gain else "n/a"

    def note(text: str) -> None:
        notes.append(text)
        print(f"NOTE: {text}", flush=True)

    print(f"{label}: dense delta {dense / 1e6:.1f} MB ({dtype}); NLL base {nll_base:.4f}, fine-tune {nll_ft:.4f} "
          f"({ids.numel() - 1} tokens)", flush=True)

    # ---- lossy, at the same bytes
    lossy: list[list[object]] = []
    mk_version, per_rank, fixed = mergekit_plan(ft, note, "mergekit LoRA extraction")
    for ratio in ratios:
        budget = int(ratio * dense)
        if mk_version is not None:
            rank = rank_for_budget(budget, per_rank, fixed)
            out = work / f"mergekit-lora-r{rank}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                seconds, argv = extract_lora(base, ft, out, rank)
                nbytes = file_bytes(out, ("adapter_model.safetensors", "adapter_config.json"))
                nll, unmerged = lora_nlls(base, out, ids)
                lossy.append([f"mergekit {mk_version} LoRA r={rank}", ratio_label(ratio), f"{nbytes / 1e6:.2f}",
                              f"{nbytes / dense:.4f}", secs(seconds), f"{nll:.4f}", pr(nll),
                              "peft not installed" if unmerged is None else pr(unmerged)])
                print(f"mergekit LoRA r={rank}: {nbytes} bytes ({nbytes / dense:.4f}), {secs(seconds)} s, PR {pr(nll)} merged, "
                      f"{'n/a' if unmerged is None else pr(unmerged)} unmerged", flush=True)
                if nbytes > budget:
                    note(f"mergekit LoRA r={rank} is {nbytes} bytes, over the {ratio_label(ratio)} budget of {budget} (rank estimate off)")
                if not any(n.startswith("mergekit adapters") for n in notes):
                    shown = " ".join(a if a not in (str(base), str(ft), str(out)) else {str(base): "BASE", str(ft): "FT"}.get(a, "OUT") for a in argv)
                    note(f"mergekit adapters: `{shown}` (rank: the largest whose adapter fits the budget); NLL and PR "
                         f"with the adapter merged into the {dtype} weights (peers.merge_lora, PEFT's definition), "
                         "'PR, peft unmerged' with the adapter loaded by peft beside the base weights")
            except Exception as e:
                note(f"mergekit LoRA extraction at r={rank} failed: {type(e).__name__}: {e}")
                traceback.print_exc()
            shutil.rmtree(out, ignore_errors=True)
        for method in methods:
            out = work / f"deltahub-{method}-{ratio}"
            try:
                row = deltahub_row(base, ft, out, method, ratio, ids)
            except deltahub.DeltahubError as e:
                note(f"deltahub {method} at {ratio_label(ratio)} refused: {e}")
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)
            lossy.append([f"deltahub {method}", ratio_label(ratio), f"{row['bytes'] / 1e6:.2f}", f"{row['bytes'] / dense:.4f}",
                          secs(row["seconds"]), f"{row['nll']:.4f}", pr(row["nll"]), "-"])
            print(f"deltahub {method} {ratio_label(ratio)}: {row['bytes']} bytes ({row['bytes'] / dense:.4f}), "
                  f"{secs(row['seconds'])} s, PR {pr(row['nll'])}", flush=True)

    # ---- lossless
    lossless: list[list[object]] = []
    try:
        import zipnn  # noqa: F401
        from importlib.metadata import version

        z_version = version("zipnn")
        for r in zipnn_rows(base, ft, dtype):
            what = "fine-tune files" if r["mode"] == "plain" else "fine-tune XOR base files"
            if r["skipped"]:
                note(f"zipnn delta skipped: {r['skipped']}")
                continue
            lossless.append([f"zipnn {z_version}: {what}", f"{r['comp'] / 1e6:.2f}", f"{r['comp'] / ft_bytes:.4f}",
                             secs(r["compress_s"]), f"{secs(r['decompress_s'])}: decompress", "-"])
            print(f"zipnn {r['mode']}: {r['comp']} bytes ({r['comp'] / ft_bytes:.4f}), {secs(r['compress_s'])} s, "
                  f"decompress {secs(r['decompress_s'])} s", flush=True)
    except Exception as e:
        note(f"zipnn skipped: {type(e).__name__}: {e}. Install with `pip install -c constraints.txt -e \".[peers]\"` (see benchmarks/README.md).")
    out = work / "deltahub-lossless"
    try:
        row = deltahub_row(base, ft, out, "lossless", None, None)
        decode = decode_time(out, base)
        lossless.append(["deltahub lossless", f"{row['bytes'] / 1e6:.2f}", f"{row['bytes'] / ft_bytes:.4f}",
                         secs(row["seconds"]), f"{secs(decode)}: decode", secs(row["load_s"])])
        print(f"deltahub lossless: {row['bytes']} bytes ({row['bytes'] / ft_bytes:.4f}), {secs(row['seconds'])} s, "
              f"decode {secs(decode)} s, load {secs(row['load_s'])} s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)

    md = [f"`{command}`", "",
          f"### Peers: {label}; dense delta {dense / 1e6:.1f} MB ({dtype}); held-out NLL base {nll_base:.4f}, "
          f"fine-tune {nll_ft:.4f} ({ids.numel() - 1} tokens)", "",
          "Lossy, at the same bytes (ratio = stored bytes / dense delta bytes):", "",
          markdown_table(["tool", "target", "MB", "ratio", "extract / compress s: wall (CPU)", "NLL", "PR", "PR, peft unmerged"], lossy), "",
          f"Lossless (ratio = stored bytes / the fine-tune's {ft_bytes / 1e6:.1f} MB of safetensors):", "",
          markdown_table(["tool", "MB", "ratio", "compress s: wall (CPU)", "decompress / decode s", "DeltaModel load s"], lossless)]
    notes.append(f"{os.cpu_count()} CPU cores, torch threads: {torch.get_num_threads()}; 5-minute load average {load_start:.1f} at the start, "
                 f"{os.getloadavg()[1]:.1f} at the end (times: wall clock, and this process's CPU time; other processes inflate both)")
    md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"peers-{model}.md").write_text(text)
    print(f"written: {out_dir / f'peers-{model}.md'}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-light", help="smollm2-light, smollm2-heavy or a recorded pair's name")
    ap.add_argument("--ratios", default="1/8,1/16", help="comma-separated, e.g. 1/8,1/16")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="deltahub methods for the lossy table")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared 2-core machine, 2-thread SVDs ran 15-100x slower than 1")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks.peers " + " ".join(sys.argv[1:])
    run(args.model, [parse_ratio(r) for r in args.ratios.split(",")], args.methods.split(","), args.eval_tokens,
        args.out, command.strip())


if __name__ == "__main__":
    main()
