"""A history of training checkpoints: what full copies, content-defined chunking and deltas store.

Two short training runs on the SmolLM2-135M + Austen recipe of :mod:`benchmarks.real_pair`
(same base, text, batches, AdamW and float32 training; :func:`benchmarks.real_pair.train`), each
saving a bf16 checkpoint (a ``save_pretrained`` safetensors folder, as real_pair saves its
fine-tunes) every ``--every`` steps:

- ``sft``: a supervised fine-tune like the ``heavy`` recipe (lr 2e-4, warm-up, cosine decay);
- ``rl``: the same loss at an RL-sized learning rate (2e-6, constant), so that most bf16 values
  stay bit-identical from one checkpoint to the next. Not RL: only the size of its updates.

The checkpoints are cached in ``$DELTAHUB_CACHE/checkpoints`` (a folder per run, named by a hash
of its recipe and ``--every``), so a rerun only measures. For each checkpoint k (checkpoint 0 is
the base) it prints the bytes of the full checkpoint; the share of its bf16 values bit-identical
to checkpoint k-1 and to the base; the stored bytes (``CompressResult.stored_bytes``, the whole
repo) of ``deltahub.compress(..., method="lossless", ratio=None)`` against the base and against
checkpoint k-1 (what one link of a chain of versions costs), and of ``method="auto",
ratio=1/16`` against the base; and what a content-defined-chunking store (the Hugging Face Xet
store's parameters) adds for it. Then the seconds to encode a link (lossless against k-1) and to
decode it (``deltahub.apply`` onto checkpoint k-1, checked bit for bit against checkpoint k),
against the training time of one step and of the steps between two checkpoints.

Content-defined chunking (CDC): a gear rolling hash over a 64-byte window, ``h = (h << 1) +
G[byte]`` (mod 2^64), cut after a byte where the top 16 bits of ``h`` are zero, chunks of 8 KiB
to 128 KiB (64 KiB on average): xet-core's chunker (``TARGET_CHUNK_SIZE`` 64 KiB, minimum 1/8,
maximum 2x, mask ``0xFFFF << 48``). Two departures, neither of which changes the statistics:
the gear table ``G`` is drawn from a seeded generator, not the ``gearhash`` crate's, and a cut
is only taken at a chunk length of at least 8 KiB (xet-core may also cut in the 64 bytes before
that, on a hash of fewer bytes). The whole hash is vectorised with numpy (six shift-and-add
passes give every position's 64-byte window sum). Every safetensors file of the history is
chunked; a chunk counts the first time its BLAKE2b digest is seen. Columns: new chunk bytes with
the base's chunks already stored, the same compressed (each new chunk with zstd level 1, raw or
byte-grouped by 4 like Xet's BG4, whichever is smaller: a stand-in for Xet's LZ4 / BG4-LZ4, at
least as small), and new chunk bytes with nothing stored before the first checkpoint.

Usage (from the repository root)::

    nice -n 5 python -m benchmarks.checkpoints [--runs sft,rl] [--steps 24] [--every 3]

Training a step takes about 3.3 s on 2 idle cores; the defaults train 24 steps per run (8
checkpoints) and the measurements (three compressions per checkpoint, ``auto`` the slowest)
take most of the time (about 19 minutes in all on the project's shared 2-core machine);
``--no-auto`` skips ``auto``. ``--json PATH`` keeps every figure, and ``--from-json PATH``
prints the tables again from such a file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .pairs import CACHE

RUN_META = "run.json"
AUTO_RATIO = 1 / 16

# --------------------------------------------------------------------------- content-defined chunking

CDC_MIN, CDC_AVG, CDC_MAX = 8 * 1024, 64 * 1024, 128 * 1024  # xet-core: target 64 KiB, min /8, max x2
_GEAR = np.random.default_rng(0x5EED).integers(0, 2**64, size=256, dtype=np.uint64)
_CDC_MASK = np.uint64((CDC_AVG - 1) << 48)  # (target - 1) shifted to the top bits, as xet-core does
_BLOCK = 1 << 23  # bytes hashed at a time: 64 MiB of uint64 sums


def gear_candidates(data: np.ndarray) -> np.ndarray:
    """Every index ``i >= 63`` of ``data`` (uint8) whose 64-byte window ``data[i-63 .. i]`` has a gear
    hash with its top 16 bits zero: a cut may follow byte ``i``."""
    out = []
    for start in range(0, len(data), _BLOCK):
        end = min(len(data), start + _BLOCK)
        lo = max(0, start - 63)
        h = _GEAR[data[lo:end]]
        for k in (1, 2, 4, 8, 16, 32):  # h_i = sum_{j<2k} G[b_{i-j}] << j from the sums over k
            h[k:] += h[:-k] << np.uint64(k)
        first = max(start, 63)  # windows of 64 whole bytes only
        out.append(np.flatnonzero((h[first - lo :] & _CDC_MASK) == 0) + first)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def cdc_cuts(data: np.ndarray) -> list[int]:
    """Chunk ends (exclusive offsets) of ``data``: the first candidate cut at least ``CDC_MIN`` after the
    chunk's start, else ``CDC_MAX`` after it; the last chunk ends with the data."""
    cand = gear_candidates(data) + 1  # a cut after byte i ends the chunk at i + 1
    cuts: list[int] = []
    start, n = 0, len(data)
    while start < n:
        j = int(np.searchsorted(cand, start + CDC_MIN, side="left"))
        end = int(cand[j]) if j < len(cand) and cand[j] - start <= CDC_MAX else start + CDC_MAX
        end = min(end, n)
        cuts.append(end)
        start = end
    return cuts


def _zstd_size(chunk: bytes, zc: Any) -> int:
    """Compressed size of one chunk: zstd-1 of the bytes or of their 4-way byte grouping, the smaller."""
    a = np.frombuffer(chunk, np.uint8)
    n4 = len(a) // 4 * 4
    grouped = np.concatenate([a[:n4].reshape(-1, 4).T.reshape(-1), a[n4:]]).tobytes()
    return min(len(zc.compress(chunk)), len(zc.compress(grouped)))


@dataclass
class ChunkStore:
    """Chunks by digest, as a deduplicating store would keep them."""

    seen: set[bytes] = field(default_factory=set)

    def add_file(self, path: Path, sizes: dict[bytes, int]) -> tuple[int, int, int]:
        """Chunk ``path``; ``(chunks, new bytes, new bytes compressed)``. ``sizes`` caches each digest's
        compressed size across stores."""
        import zstandard

        zc = zstandard.ZstdCompressor(level=1)
        data = np.fromfile(path, dtype=np.uint8)
        chunks = new = new_z = 0
        start = 0
        for end in cdc_cuts(data):
            piece = data[start:end].tobytes()
            digest = hashlib.blake2b(piece, digest_size=16).digest()
            chunks += 1
            if digest not in self.seen:
                self.seen.add(digest)
                if digest not in sizes:
                    sizes[digest] = _zstd_size(piece, zc)
                new += len(piece)
                new_z += sizes[digest]
            start = end
        return chunks, new, new_z


# --------------------------------------------------------------------------- safetensors as raw bf16


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as its raw 16-bit words (a memory map; bf16 only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        if rec["dtype"] != "BF16":
            raise SystemExit(f"{path}: {name} is {rec['dtype']}; this benchmark compares bf16 checkpoints")
        a, b = rec["data_offsets"]
        out[name] = mm[8 + n + a : 8 + n + b].view(np.uint16)
    return out


def _files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no safetensors files in {folder}")
    return files


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in _files(folder):
        out.update(_tensors(f))
    return out


def same_share(a: Path, b: Path) -> float:
    """Share of the bf16 values of checkpoint ``b`` bit-identical to ``a``'s (same names and shapes)."""
    ta, tb = _weights(a), _weights(b)
    if ta.keys() != tb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors")
    same = total = 0
    for name, x in tb.items():
        if x.shape != ta[name].shape:
            raise SystemExit(f"{name}: shapes differ between {a} and {b}")
        same += int(np.count_nonzero(x == ta[name]))
        total += x.size
    return same / total


def bit_identical(a: Path, b: Path) -> bool:
    ta, tb = _weights(a), _weights(b)
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------- the training runs


def run_recipe(kind: str, steps: int, lr: float) -> Any:
    """The :class:`benchmarks.real_pair.Recipe` of a run: ``sft`` (warm-up, cosine decay to 0.1 lr,
    like ``heavy``) or ``rl`` (constant lr)."""
    from .real_pair import Recipe

    if kind == "sft":
        return Recipe(name="ckpt-sft", steps=steps, lr=lr, warmup_steps=max(1, steps // 8))
    if kind == "rl":
        return Recipe(name="ckpt-rl", steps=steps, lr=lr, warmup_steps=0, min_lr_ratio=1.0)
    raise ValueError(kind)


def _log(msg: str) -> None:
    print(f"[checkpoints {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _build_run(recipe: Any, every: int, base: Path, tmp: Path) -> None:
    import copy

    import torch

    from .real_pair import _load, _train_tokens, train

    model, tokenizer = _load(base)
    tokens = _train_tokens(tokenizer)
    _log(f"{recipe.name}: {recipe.steps} steps at lr {recipe.lr:g}, a bf16 checkpoint every {every}")
    saved: list[int] = []
    save_seconds: list[float] = []

    def save(step: int, model: Any) -> None:
        if step % every:
            return
        t0 = time.perf_counter()
        # the same save as real_pair's fine-tunes (bf16 save_pretrained), from a copy: training goes on in float32
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp / f"ckpt-{step:04d}", safe_serialization=True)
        saved.append(step)
        save_seconds.append(time.perf_counter() - t0)

    losses, step_seconds = train(recipe, model, tokens, on_step=save)
    meta = {
        "recipe": asdict(recipe), "every": every, "base": str(base), "checkpoints": saved,
        "losses": [round(v, 4) for v in losses], "step_seconds": [round(v, 3) for v in step_seconds],
        "save_seconds": [round(v, 3) for v in save_seconds], "torch_threads": torch.get_num_threads(),
    }
    (tmp / RUN_META).write_text(json.dumps(meta, indent=2))


def run_path(recipe: Any, every: int, base: Path) -> Path:
    """The cached run's folder (``ckpt-NNNN`` subfolders and ``run.json``), trained if missing."""
    from .real_pair import _atomic_build

    final = CACHE / "checkpoints" / f"{recipe.name}-{recipe.key()}-every{every}"
    return _atomic_build(final, lambda tmp: _build_run(recipe, every, base, tmp))


# --------------------------------------------------------------------------- measuring


@dataclass
class Row:
    k: int
    step: int
    full_bytes: int
    same_prev: float
    same_base: float
    lossless_base: int
    lossless_prev: int
    auto16: int | None
    cdc_new: int
    cdc_new_z: int
    cdc_new_nobase: int
    cdc_new_nobase_z: int
    encode_s: float
    decode_s: float
    train_s: float  # training time of the steps since the previous checkpoint
    auto_s: float | None = None


def _compress(base: Path, ft: Path, out: Path, method: str, ratio: float | None) -> tuple[int, float]:
    import deltahub

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = deltahub.compress(base, ft, out, method=method, ratio=ratio, progress=False)
    return res.stored_bytes, time.perf_counter() - t0


def measure_run(kind: str, run: Path, base: Path, work: Path, auto: bool) -> dict[str, Any]:
    import deltahub

    meta = json.loads((run / RUN_META).read_text())
    ckpts = [run / f"ckpt-{s:04d}" for s in meta["checkpoints"]]
    step_s = meta["step_seconds"]
    sizes: dict[bytes, int] = {}
    with_base, no_base = ChunkStore(), ChunkStore()
    base_chunks = base_bytes = base_z = 0
    for f in _files(base):
        c, b, z = with_base.add_file(f, sizes)
        base_chunks, base_bytes, base_z = base_chunks + c, base_bytes + b, base_z + z
    rows: list[Row] = []
    prev, prev_step = base, 0
    for k, (ck, step) in enumerate(zip(ckpts, meta["checkpoints"]), start=1):
        _log(f"{kind}: checkpoint {k}/{len(ckpts)} (step {step})")
        full = sum(f.stat().st_size for f in _files(ck))
        same_prev, same_base = same_share(prev, ck), same_share(base, ck)
        lossless_base, _ = _compress(base, ck, work / "vs-base", "lossless", None)
        lossless_prev, enc_s = _compress(prev, ck, work / "vs-prev", "lossless", None)
        shutil.rmtree(work / "applied", ignore_errors=True)
        t0 = time.perf_counter()
        deltahub.apply(work / "vs-prev", work / "applied", base=prev, progress=False)
        dec_s = time.perf_counter() - t0
        if not bit_identical(ck, work / "applied"):
            raise SystemExit(f"{ck}: the lossless delta against the previous checkpoint did not decode bit for bit")
        auto16 = auto_s = None
        if auto:
            auto16, auto_s = _compress(base, ck, work / "auto", "auto", AUTO_RATIO)
        cw = [with_base.add_file(f, sizes) for f in _files(ck)]
        cn = [no_base.add_file(f, sizes) for f in _files(ck)]
        rows.append(Row(
            k=k, step=step, full_bytes=full, same_prev=same_prev, same_base=same_base,
            lossless_base=lossless_base, lossless_prev=lossless_prev, auto16=auto16,
            cdc_new=sum(c[1] for c in cw), cdc_new_z=sum(c[2] for c in cw),
            cdc_new_nobase=sum(c[1] for c in cn), cdc_new_nobase_z=sum(c[2] for c in cn),
            encode_s=enc_s, decode_s=dec_s, train_s=sum(step_s[prev_step:step]), auto_s=auto_s,
        ))
        prev, prev_step = ck, step
        for name in ("vs-base", "vs-prev", "applied", "auto"):
            shutil.rmtree(work / name, ignore_errors=True)
    return {
        "kind": kind, "run": str(run), "recipe": meta["recipe"], "every": meta["every"],
        "step_seconds": step_s, "losses": meta["losses"], "torch_threads": meta.get("torch_threads"),
        "base_bytes": sum(f.stat().st_size for f in _files(base)),
        "base_chunks": base_chunks, "base_chunk_bytes": base_bytes, "base_chunk_bytes_z": base_z,
        "rows": [asdict(r) for r in rows],
    }


# --------------------------------------------------------------------------- printing


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def totals(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["rows"]
    t = {
        "checkpoints": len(rows),
        "full": sum(r["full_bytes"] for r in rows),
        "cdc": sum(r["cdc_new"] for r in rows),
        "cdc_z": sum(r["cdc_new_z"] for r in rows),
        "cdc_nobase": sum(r["cdc_new_nobase"] for r in rows),
        "lossless_base": sum(r["lossless_base"] for r in rows),
        "chain": sum(r["lossless_prev"] for r in rows),  # link 1 is against the base: the keyframe
        "auto16": None if any(r["auto16"] is None for r in rows) else sum(r["auto16"] for r in rows),
        "step_s": statistics.median(res["step_seconds"]),
        "between_s": statistics.median(r["train_s"] for r in rows),
        "encode_s": statistics.median(r["encode_s"] for r in rows),
        "encode_max_s": max(r["encode_s"] for r in rows),
        "decode_s": statistics.median(r["decode_s"] for r in rows),
        "decode_max_s": max(r["decode_s"] for r in rows),
    }
    t["chain_cdc"] = t["chain"] / t["cdc"] if t["cdc"] else float("inf")
    t["chain_cdc_z"] = t["chain"] / t["cdc_z"] if t["cdc_z"] else float("inf")
    t["encode_under_training"] = all(r["encode_s"] < r["train_s"] for r in rows)
    return t


def report(results: list[dict[str, Any]]) -> str:
    out = []
    for res in results:
        r0 = res["recipe"]
        rows = res["rows"]
        every = res["every"]
        schedule = "constant" if r0["min_lr_ratio"] == 1 else f"warm-up {r0['warmup_steps']} steps, cosine to {r0['min_lr_ratio']:g} lr"
        out.append(f"### Run `{res['kind']}`: lr {r0['lr']:g} ({schedule}), "
                   f"{r0['steps']} steps of {r0['batch_size']}x{r0['seq_len']}, a bf16 checkpoint every {res['every']} steps; "
                   f"mean batch loss {statistics.mean(res['losses'][:every]):.3f} over the first {every} steps, "
                   f"{statistics.mean(res['losses'][-every:]):.3f} over the last {every}")
        out.append("")
        out.append(f"Base: {_mb(res['base_bytes'])} MB, {res['base_chunks']} CDC chunks ({_mb(res['base_chunk_bytes_z'])} MB compressed). "
                   "MB are 10^6 bytes; 'same' is the share of bf16 values bit-identical; deltas are whole repos (`stored_bytes`).")
        out.append("")
        header = ["k", "step", "full MB", "same as k-1", "same as base", "lossless vs base MB", "lossless vs k-1 MB",
                  "auto 1/16 vs base MB", "CDC new MB (base stored)", "CDC new MB, zstd", "CDC new MB (no base)",
                  "encode s (vs k-1)", "decode s", "train s since k-1"]
        body = [[str(r["k"]), str(r["step"]), _mb(r["full_bytes"]), f"{100 * r['same_prev']:.1f}%", f"{100 * r['same_base']:.1f}%",
                 _mb(r["lossless_base"]), _mb(r["lossless_prev"]), _mb(r["auto16"]), _mb(r["cdc_new"]), _mb(r["cdc_new_z"]),
                 _mb(r["cdc_new_nobase"]), f"{r['encode_s']:.1f}", f"{r['decode_s']:.1f}", f"{r['train_s']:.1f}"] for r in rows]
        out.append(_table(header, body))
        out.append("")
    out.append("### Whole history (every checkpoint of a run; the base not counted, already stored)")
    out.append("")
    header = ["run", "checkpoints", "full copies MB", "CDC MB", "CDC, zstd MB", "CDC, no base stored MB", "lossless vs base each MB",
              "chain MB", "auto 1/16 each MB", "chain / CDC", "chain / CDC zstd", "chain / full"]
    body = []
    for res in results:
        t = totals(res)
        body.append([res["kind"], str(t["checkpoints"]), _mb(t["full"]), _mb(t["cdc"]), _mb(t["cdc_z"]), _mb(t["cdc_nobase"]),
                     _mb(t["lossless_base"]), _mb(t["chain"]), _mb(t["auto16"]), f"{t['chain_cdc']:.3f}", f"{t['chain_cdc_z']:.3f}",
                     f"{t['chain'] / t['full']:.3f}"])
    out.append(_table(header, body))
    out.append("")
    out.append("Chain: checkpoint 1 lossless against the base (the keyframe), every later one lossless against the one before.")
    out.append("")
    out.append("### Time (seconds; medians over the checkpoints, max in brackets)")
    out.append("")
    header = ["run", "train s / step", "train s between checkpoints", "encode s (lossless vs k-1)", "decode s (apply onto k-1)",
              "encode < training between checkpoints", "auto 1/16 compress s", "restore last checkpoint from the chain s"]
    body = []
    for res in results:
        t = totals(res)
        n_ok = sum(r["encode_s"] < r["train_s"] for r in res["rows"])
        autos = [r["auto_s"] for r in res["rows"] if r["auto_s"] is not None]
        auto = f"{statistics.median(autos):.1f} ({max(autos):.1f})" if autos else "-"
        body.append([res["kind"], f"{t['step_s']:.2f}", f"{t['between_s']:.1f}", f"{t['encode_s']:.1f} ({t['encode_max_s']:.1f})",
                     f"{t['decode_s']:.1f} ({t['decode_max_s']:.1f})", f"{n_ok} of {len(res['rows'])}", auto,
                     f"{sum(r['decode_s'] for r in res['rows']):.1f} ({len(res['rows'])} applies)"])
    out.append(_table(header, body))
    out.append("")
    out.append("### Targets")
    out.append("")
    for res in results:
        t = totals(res)
        if res["kind"] == "rl":
            goal, ok = "chain <= 1/10 of CDC", t["chain_cdc"] <= 0.1
        else:
            goal, ok = "chain < CDC", t["chain_cdc"] < 1
        ok_z = (t["chain_cdc_z"] <= 0.1) if res["kind"] == "rl" else (t["chain_cdc_z"] < 1)
        out.append(f"- `{res['kind']}`: {goal}: {'met' if ok else 'NOT met'} ({t['chain_cdc']:.3f} of CDC's bytes; "
                   f"{'met' if ok_z else 'not met'} against CDC with zstd, {t['chain_cdc_z']:.3f}); encode below the training time "
                   f"between two checkpoints: {'met' if t['encode_under_training'] else 'NOT met'} (median {t['encode_s']:.1f} s "
                   f"against {t['between_s']:.1f} s)")
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.checkpoints", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="sft,rl", help="comma-separated: sft, rl (default: both)")
    ap.add_argument("--steps", type=int, default=24, help="training steps per run (default 24)")
    ap.add_argument("--every", type=int, default=3, help="save a checkpoint every N steps (default 3)")
    ap.add_argument("--sft-lr", type=float, default=2e-4, help="sft run's peak learning rate (default 2e-4)")
    ap.add_argument("--rl-lr", type=float, default=2e-6, help="rl run's constant learning rate (default 2e-6)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--no-auto", action="store_true", help="skip auto at 1/16 (the slowest compression)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    ap.add_argument("--from-json", metavar="PATH", help="print the tables of figures saved by --json; no training, no measuring")
    args = ap.parse_args(argv)
    if args.from_json:
        print(report(json.loads(Path(args.from_json).read_text())["results"]))
        return 0
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in ("sft", "rl") for r in runs):
        ap.error("--runs takes sft, rl or both")
    if args.steps < args.every or args.every < 1:
        ap.error("--every must be between 1 and --steps")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so an interrupted build removes its temp folder
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see real_pair: spinning OpenMP threads on a shared machine
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    torch.set_num_threads(args.threads)
    from .real_pair import base_path

    base = base_path()
    lrs = {"sft": args.sft_lr, "rl": args.rl_lr}
    (CACHE / "bench").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="checkpoints-", dir=CACHE / "bench"))
    results = []
    try:
        for kind in runs:
            run = run_path(run_recipe(kind, args.steps, lrs[kind]), args.every, base)
            results.append(measure_run(kind, run, base, work, auto=not args.no_auto))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "totals": [totals(r) for r in results]}, indent=2))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
