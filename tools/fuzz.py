"""Fuzz what deltahub reads from a delta repo alone: records, shard headers, the index and
delta_config.json (spec/SECURITY.md). Every outcome must be success or a ``DeltahubError``;
anything else is printed with a reproducer dumped to ``--out``.

    python tools/fuzz.py --minutes 10 [--seed 0] [--out fuzz-failures] [--limit-gib 4]

The process runs under RLIMIT_AS (address space ``--limit-gib`` above what it uses at start),
so an input that makes deltahub allocate what a file declares fails as an untyped
allocation error instead of eating the machine. ``tests/test_fuzz.py`` drives the same targets
with hypothesis for a bounded number of examples.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltahub import DeltaReader, DeltahubError, DeltaWriter, encode_tensor, info, verify  # noqa: E402
from deltahub.chain import recorded_weights  # noqa: E402
from deltahub.format import CONFIG_NAME, INDEX_NAME  # noqa: E402
from deltahub.format.records import describe_record, record_layout, record_nbytes, validate_record  # noqa: E402
from deltahub.format.safetensors_stream import MappedSafetensors  # noqa: E402

# (name, shape, method, params): small tensors covering every component type and layout.
SEED_TENSORS = [
    ("m.layers.0.a.weight", (12, 20), "svd", {"rank": 3}),
    ("m.layers.0.b.weight", (16, 24), "deltacome", {"rank": 4}),
    ("m.layers.0.c.weight", (8, 16), "bitdelta", {}),
    ("m.layers.1.d.weight", (12, 20), "dqrelo", {"rank": 2}),
    ("m.layers.1.e.weight", (10, 30), "dare", {"p": 0.5}),
    ("m.layers.1.f.weight", (10, 30), "magnitude", {"density": 0.2}),
    ("m.layers.2.g.weight", (12, 20), "deltadq", {"keep": 4, "bits": 4, "group_size": 8}),
    ("m.layers.2.i.weight", (8, 12), "bitdelta", {"per_row": True}),
    ("m.layers.2.h.weight", (6, 10), "lossless", {}),
    ("m.norm.weight", (24,), "dense", {}),
]

# Values a mutation puts in place of a JSON value: wrong types, huge, negative, fractional, nested.
JUNK = [
    None, True, False, 0, 1, -1, 2, 7, 255, 256, 2**31, 2**31 - 1, 2**32, 2**36, 2**53, 2**63, 2**64, 10**9, 10**30, -(2**63),
    0.0, 1.5, -0.5, 1e308, float("inf"), float("nan"), "", "x", "F16", "BF16", "U8", "I64", "F99", "csr", "seeded", "group",
    "bernoulli", "row", "tensor", "dense", "lowrank", "sparse", "sign", "lossless", "removed", "added", "compressed",
    "../x", "/etc/passwd", "delta-00001-of-00001.safetensors", "0" * 64,
    [], [0], [1, 2], [0, 1], [2**31, 1], [-1, 2], [0.5, 1], [1] * 9, [[1]], {}, {"a": 1}, {"kind": "group"}, [{"start": 0}],
]


def seed_repo(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real delta of SEED_TENSORS under ``root/seed`` (three shards) and its base tensors."""
    torch.manual_seed(0)
    bases = {}
    out = root / "seed"
    with DeltaWriter(out, max_shard_size=2000) as w:
        for i, (name, shape, method, params) in enumerate(SEED_TENSORS):
            g = torch.Generator().manual_seed(i)
            base = torch.randn(shape, generator=g).to(torch.bfloat16)
            ft = (base.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            enc = encode_tensor(name, base, ft, method, None, **params)
            w.add(enc.name, enc.record, enc.tensors)
            bases[name] = base
        added = torch.randn(3, 4).to(torch.bfloat16)
        enc = encode_tensor("m.new.weight", None, added)
        w.add(enc.name, enc.record, enc.tensors)
        # Format 1.1's fields, so that mutations reach them: each record's digest, the weights
        # digest, and a parent (the same repo copied beside it) that verify(check_base=True) opens.
        for name, record in w.records.items():
            if record["kind"] != "removed":
                record["sha256"] = hashlib.sha256(name.encode()).hexdigest()
        weights = recorded_weights(w.records)
        w.finish({
            # A base path that is not there: opening the chain's keyframe base fails at once (no Hub asked).
            "base": {"name_or_path": str((root / "no-base").resolve()), "revision": None, "fingerprint": "sha256:" + "0" * 64}, "seed": 0,
            "finetuned": {"weights": weights}, "requires": ["parent"],
            "parent": {"name_or_path": str((root / "parent").resolve()), "revision": None, "weights": weights, "depth": 1},
        })
    shutil.copytree(out, root / "parent")
    cfg = json.loads((root / "parent" / CONFIG_NAME).read_text())
    del cfg["parent"], cfg["requires"]
    (root / "parent" / CONFIG_NAME).write_text(json.dumps(cfg))
    return out, bases


# ------------------------------------------------------------------------------ mutations


def paths_of(obj, prefix=()):
    """Every path (tuple of keys/indices) to a value inside a JSON object, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths_of(v, prefix + (i,))
    return out


def set_at(obj, path, value, delete: bool = False):
    """``obj`` with the value at ``path`` replaced by ``value`` (or deleted), a deep copy."""
    if not path:
        return value
    obj = copy.deepcopy(obj)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def junk(rng: random.Random):
    """A junk JSON value: from JUNK, a number near a power of two, or a nested mix."""
    r = rng.random()
    if r < 0.6:
        return copy.deepcopy(rng.choice(JUNK))
    if r < 0.8:
        return rng.choice([1, -1]) * (2 ** rng.randint(0, 70) + rng.randint(-2, 2))
    if r < 0.9:
        return [junk(rng) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["type", "kind", "start", "end", "bits", "rows", "view", "dtype", "shape", "x"]): junk(rng) for _ in range(rng.randint(0, 3))}


def mutate_json(obj, rng: random.Random, count: int | None = None):
    """``obj`` with 1-3 random values replaced by junk, deleted, or nudged by a small integer."""
    for _ in range(count or rng.randint(1, 3)):
        paths = paths_of(obj)
        path = rng.choice(paths[1:] or paths)
        r = rng.random()
        if r < 0.15 and path:
            obj = set_at(obj, path, None, delete=True)
        elif r < 0.35:
            value = obj
            for k in path:
                value = value[k]
            if isinstance(value, int) and not isinstance(value, bool):
                obj = set_at(obj, path, value + rng.choice([-1, 1, 2, -2, value, 10**9]))
            else:
                obj = set_at(obj, path, junk(rng))
        else:
            obj = set_at(obj, path, junk(rng))
    return obj


def _split_shard(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_shard(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_shard(data: bytes, rng: random.Random) -> bytes:
    """A shard with its header mutated as JSON, or its bytes flipped, cut or grown."""
    r = rng.random()
    if r < 0.6:
        header, body = _split_shard(data)
        return _join_shard(mutate_json(header, rng), body)
    data = bytearray(data)
    if r < 0.8:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        return bytes(data)
    if r < 0.9:
        return bytes(data[: rng.randrange(len(data))])
    return bytes(data) + bytes(rng.randrange(1, 64))


# ------------------------------------------------------------------------------ targets


def run_record(record: dict, name: str = "t") -> None:
    """Everything deltahub does with a record from the config alone."""
    validate_record(name, record)
    record_layout(name, record)
    record_nbytes(name, record)
    describe_record(record)


def run_shard(path: Path) -> None:
    f = MappedSafetensors(path)
    for key in f.keys():
        f.info(key)
        with f.borrow(key) as t:
            t.float().sum() if t.dtype != torch.bool else t.sum()


def run_repo(path: Path, bases: dict[str, torch.Tensor]) -> None:
    """verify (with the chain: its parent opened), info, and decoding every record against its real base."""
    verify(path)
    verify(path, check_base=True)
    try:
        info(path)
    except DeltahubError:
        pass
    reader = DeltaReader(path)
    for name in list(reader.records)[:12]:
        try:
            b = bases.get(name) if isinstance(name, str) else None
            reader.decode(name, b.clone() if b is not None else None)
        except DeltahubError:
            pass


class Case:
    """One fuzz case: a target and its (mutated) input; ``dump`` writes a reproducer."""

    def __init__(self, target: str, payload, run) -> None:
        self.target, self.payload, self.run = target, payload, run

    def dump(self, folder: Path, error: BaseException) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix=f"{self.target}-", dir=folder))
        if isinstance(self.payload, Path) and self.payload.is_dir():
            shutil.copytree(self.payload, out / "repo", symlinks=True)
        elif isinstance(self.payload, Path):
            shutil.copy(self.payload, out / self.payload.name)
        else:
            (out / "record.json").write_text(json.dumps(self.payload))
        (out / "traceback.txt").write_text("".join(traceback.format_exception(error)))
        return out


def make_case(rng: random.Random, seed: Path, bases: dict, work: Path) -> Case:
    """A random case over the three targets."""
    cfg = json.loads((seed / CONFIG_NAME).read_text())
    which = rng.random()
    if which < 0.4:
        name = rng.choice(list(cfg["tensors"]))
        record = mutate_json(cfg["tensors"][name], rng)
        return Case("record", record, lambda: run_record(record, name))
    if which < 0.6:
        shard = rng.choice(sorted(p for p in seed.iterdir() if p.name.endswith(".safetensors")))
        path = work / "shard.safetensors"
        path.write_bytes(mutate_shard(shard.read_bytes(), rng))
        return Case("header", path, lambda: run_shard(path))
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(seed, repo)
    r = rng.random()
    if r < 0.45:
        # A record or a top-level field of the config.
        name = rng.choice(list(cfg["tensors"]))
        if rng.random() < 0.7:
            cfg["tensors"][name] = mutate_json(cfg["tensors"][name], rng)
        else:
            cfg = mutate_json(cfg, rng, 1)
        (repo / CONFIG_NAME).write_text(json.dumps(cfg))
    elif r < 0.7:
        index = json.loads((repo / INDEX_NAME).read_text())
        (repo / INDEX_NAME).write_text(json.dumps(mutate_json(index, rng)))
    else:
        # A shard, with its checksum resealed so that the rest of verify sees the change.
        shard = rng.choice(sorted(p for p in repo.iterdir() if p.name.endswith(".safetensors")))
        shard.write_bytes(mutate_shard(shard.read_bytes(), rng))
        _reseal(repo)
    return Case("repo", repo, lambda: run_repo(repo, bases))


def _reseal(repo: Path) -> None:
    import hashlib

    index = json.loads((repo / INDEX_NAME).read_text())
    for shard in index["metadata"]["sha256"]:
        index["metadata"]["sha256"][shard] = hashlib.sha256((repo / shard).read_bytes()).hexdigest()
    (repo / INDEX_NAME).write_text(json.dumps(index))


def outcome(case: Case) -> BaseException | None:
    """Run a case; ``None`` on success or a typed error, else the untyped exception."""
    try:
        case.run()
    except DeltahubError:
        return None
    except Exception as e:  # noqa: BLE001 - the point: anything untyped is a finding
        return e
    return None


def limit_address_space(extra_gib: float) -> int:
    """Cap the address space at what the process maps now plus ``extra_gib``; return the cap."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    cap = vm + int(extra_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    ap.add_argument("--limit-gib", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seed, bases = seed_repo(work)
        cap = limit_address_space(args.limit_gib)
        print(f"fuzzing for {args.minutes} min, seed {args.seed}, address space capped at {cap / (1 << 30):.1f} GiB", flush=True)
        counts: Counter = Counter()
        untyped = 0
        t0 = last = time.monotonic()
        while time.monotonic() - t0 < args.minutes * 60:
            case = make_case(rng, seed, bases, work)
            try:
                case.run()
                counts[(case.target, "ok")] += 1
            except DeltahubError as e:
                counts[(case.target, type(e).__name__)] += 1
            except Exception as e:  # noqa: BLE001
                untyped += 1
                counts[(case.target, "UNTYPED " + type(e).__name__)] += 1
                where = case.dump(args.out, e)
                print(f"UNTYPED {type(e).__name__} on {case.target}: {str(e)[:200]} -> {where}", flush=True)
            if time.monotonic() - last > 60:
                last = time.monotonic()
                n = sum(counts.values())
                print(f"{n} cases, {n / (last - t0):.1f}/s, {untyped} untyped", flush=True)
        n = sum(counts.values())
        elapsed = time.monotonic() - t0
        print(f"\n{n} cases in {elapsed / 60:.1f} min ({n / elapsed:.1f} cases/s), {untyped} untyped exception(s)")
        for (target, result), c in sorted(counts.items()):
            print(f"  {target:7s} {result:32s} {c}")
    return 1 if untyped else 0


if __name__ == "__main__":
    sys.exit(main())
