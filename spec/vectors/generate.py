"""Regenerate the golden vectors of spec/FORMAT.md. Run: ``python spec/vectors/generate.py``
(format 1.0's vectors), ``python spec/vectors/generate.py chain`` (format 1.1's chain vector) or
``python spec/vectors/generate.py coded`` (format 1.2's coded codes).

Two vectors, each a delta repo plus ``base.safetensors`` (the base it applies to) and
``expected.safetensors`` (every decoded tensor; removed tensors are absent):

- ``components/``: one record per record kind and component variant, built by hand with
  dyadic values (few significant bits, equal scales), so every float32 operation is exact
  and any conforming reader must reproduce ``expected`` bit for bit, whatever its
  summation order.
- ``methods/``: one tensor per compression method, encoded by deltahub from a seeded
  structured delta. Components without a matrix product decode bit for bit; the three
  low-rank methods (svd, deltacome, dqrelo) may differ by one unit in the last place of
  the bfloat16 result, since the spec leaves the product's summation order free.

Old vectors are never regenerated once released: they are what keeps old files readable.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from deltahub import __version__, encode_tensor  # noqa: E402
from deltahub.format import DeltaWriter, fingerprint, make_record  # noqa: E402
from deltahub.format.components import Component, Segment, encode_dense, encode_lossless, encode_lowrank, encode_sparse  # noqa: E402
from deltahub.format import bitpack, prng  # noqa: E402
from deltahub.format.dtypes import to_name  # noqa: E402
from deltahub.format.records import decode_record  # noqa: E402


def dyadic(gen: torch.Generator, shape: tuple[int, ...], lo: int = -8, hi: int = 8, scale: float = 1 / 16) -> torch.Tensor:
    """Small integers times a power of two: exact in every float format used here."""
    return torch.randint(lo, hi + 1, shape, generator=gen).to(torch.float32) * scale


def components_vector() -> tuple[dict, dict, dict]:
    """(base tensors, {name: (record, tensors)}, config extras) exercising every variant."""
    g = torch.Generator().manual_seed(1)
    base: dict[str, torch.Tensor] = {}
    out: dict[str, tuple[dict, dict]] = {}

    def add(name: str, kind: str, shape, dtype: torch.dtype, comps: list[Component] | None, **extra) -> None:
        out[name] = make_record(kind, tuple(shape), to_name(dtype), comps, **extra)

    # unchanged and removed
    base["unchanged.weight"] = dyadic(g, (4, 6)).bfloat16()
    add("unchanged.weight", "unchanged", (4, 6), torch.bfloat16, None)
    base["removed.weight"] = dyadic(g, (3, 5)).bfloat16()
    add("removed.weight", "removed", (3, 5), torch.bfloat16, None)
    # dense (1-D, bf16) and added
    base["norm.weight"] = dyadic(g, (7,), 8, 24).bfloat16()
    add("norm.weight", "dense", (7,), torch.bfloat16, [encode_dense(dyadic(g, (7,), scale=1 / 64), torch.bfloat16)])
    add("added.weight", "added", (5, 3), torch.float16, [encode_dense(dyadic(g, (5, 3)), torch.float16)])
    # sign, per tensor and per row (13 x 11: 143 bits, not a multiple of 8)
    for scale_kind in ("tensor", "row"):
        name = f"sign_{scale_kind}.weight"
        base[name] = dyadic(g, (13, 11)).bfloat16()
        bits = torch.randint(0, 2, (13 * 11,), generator=g).to(torch.uint8)
        scale = torch.tensor([0.125]) if scale_kind == "tensor" else dyadic(g, (13,), 1, 8, 1 / 32)
        comp = Component({"type": "sign", "scale": scale_kind}, {"bits": bitpack.pack(bits, 1), "scale": scale.float()})
        add(name, "compressed", (13, 11), torch.bfloat16, [comp], method="bitdelta")
    # lowrank, float factors (F16 and BF16 segments) and quantized mixed precision (8/3/2 bits)
    p, q = 9, 10
    base["lowrank_float.weight"] = dyadic(g, (p, q)).float()
    u, v = dyadic(g, (p, 3), -4, 4, 1 / 4), dyadic(g, (q, 3), -4, 4, 1 / 4)
    comp = encode_lowrank(u, torch.tensor([2.0, 1.0, 0.5]), v, [Segment(0, 2, dtype="F16"), Segment(2, 3, dtype="BF16")])
    add("lowrank_float.weight", "compressed", (p, q), torch.float32, [comp], method="svd")
    p, q, r = 21, 131, 37  # 131 > group size 128: two groups, the second of length 3
    base["lowrank_quant.weight"] = dyadic(g, (p, q)).bfloat16()
    segs = [Segment(0, 2, bits=8, group_size=128), Segment(2, 34, bits=3, group_size=128), Segment(34, r, bits=2, group_size=128)]
    meta: dict = {"type": "lowrank", "rank": r, "u": [], "v": []}
    tensors: dict[str, torch.Tensor] = {"s": torch.full((r,), 0.5)}
    for factor, length in (("u", p), ("v", q)):
        for j, seg in enumerate(segs):
            w, ng = seg.end - seg.start, -(-length // seg.group_size)
            sdt = torch.float32 if (factor, j) == ("v", 1) else torch.float16  # one segment with F32 scales
            meta[factor].append({"start": seg.start, "end": seg.end, "bits": seg.bits, "group_size": seg.group_size, "scale_dtype": to_name(sdt)})
            codes = torch.randint(0, 1 << seg.bits, (w * length,), generator=g)
            tensors[f"{factor}.{j}.codes"] = bitpack.pack(codes, seg.bits)
            tensors[f"{factor}.{j}.scale"] = torch.full((w, ng), 2.0**-6, dtype=sdt)
            tensors[f"{factor}.{j}.zero"] = torch.randint(0, 1 << seg.bits, (w, ng), generator=g).to(torch.uint8)
    add("lowrank_quant.weight", "compressed", (p, q), torch.bfloat16, [Component(meta, tensors)], method="deltacome")
    # sparse: CSR float, CSR quantized in two parts with offsets, seeded group mask, seeded bernoulli
    p, q = 6, 70
    base["sparse_csr.weight"] = dyadic(g, (p, q)).bfloat16()
    mask = torch.rand((p, q), generator=g) < 0.2
    comp = encode_sparse(mask, dyadic(g, (int(mask.sum()),)), index="csr", value_dtype=torch.float16)
    add("sparse_csr.weight", "compressed", (p, q), torch.bfloat16, [comp], method="magnitude")
    base["sparse_parts.weight"] = dyadic(g, (p, q)).bfloat16()
    order = torch.randperm(p * q, generator=g)
    comps = []
    for j, sel in enumerate((order[:40], order[40:75])):
        m = torch.zeros(p * q, dtype=torch.bool)
        m[sel] = True
        n = int(m.sum())
        comps.append(encode_sparse(m.view(p, q), None, index="csr", codes=torch.randint(0, 8, (n,), generator=g), bits=3, scale=0.0625, zero=7, offset=8 * j))
    add("sparse_parts.weight", "compressed", (p, q), torch.bfloat16, comps, method="deltadq")
    seed = 0x0123456789ABCDEF
    base["sparse_group.weight"] = dyadic(g, (p, q)).bfloat16()
    gm = prng.group_mask(seed, p, q, 16, 3)
    mask_meta = {"kind": "group", "group_size": 16, "keep": 3}
    n = int(gm.sum())
    comp = encode_sparse(gm, None, index="seeded", seed=seed, mask_meta=mask_meta, codes=torch.randint(0, 16, (n,), generator=g), bits=4, scale=0.03125, zero=8)
    add("sparse_group.weight", "compressed", (p, q), torch.bfloat16, [comp], method="deltadq")
    base["sparse_bernoulli.weight"] = dyadic(g, (p, q)).bfloat16()
    threshold = prng.keep_probability_threshold(0.3)
    bm = prng.bernoulli_mask(seed, p, q, threshold)
    comp = encode_sparse(bm, dyadic(g, (int(bm.sum()),)), index="seeded", seed=seed, mask_meta={"kind": "bernoulli", "threshold": threshold}, value_dtype=torch.bfloat16)
    add("sparse_bernoulli.weight", "compressed", (p, q), torch.bfloat16, [comp], method="dare")
    # grown vocabulary: base [10, 4] -> [13, 4]: sign over rows [0, 10), dense new rows [10, 13)
    base["embed.weight"] = dyadic(g, (10, 4)).bfloat16()
    s = Component({"type": "sign", "scale": "tensor", "rows": [0, 10]}, {"bits": bitpack.pack(torch.randint(0, 2, (40,), generator=g), 1), "scale": torch.tensor([0.25])})
    new = encode_dense(dyadic(g, (3, 4)), torch.bfloat16)
    new.meta["rows"] = [10, 13]
    add("embed.weight", "compressed", (13, 4), torch.bfloat16, [s, new], method="bitdelta", base_shape=[10, 4])
    # fused experts [3, 4, 6]: one lowrank per expert via rows, and a 4-d tensor with an explicit view
    base["experts.weight"] = dyadic(g, (3, 4, 6)).bfloat16()
    comps = []
    for e in range(3):
        c = encode_lowrank(dyadic(g, (4, 1), -4, 4, 1 / 4), torch.tensor([1.0]), dyadic(g, (6, 1), -4, 4, 1 / 4), [Segment(0, 1, dtype="F16")])
        c.meta["rows"] = [e, e + 1]
        comps.append(c)
    add("experts.weight", "compressed", (3, 4, 6), torch.bfloat16, comps, method="svd")
    base["conv.weight"] = dyadic(g, (4, 2, 3, 3)).bfloat16()
    c = encode_lowrank(dyadic(g, (4, 2), -4, 4, 1 / 4), torch.tensor([1.0, 0.5]), dyadic(g, (18, 2), -4, 4, 1 / 4), [Segment(0, 2, dtype="F16")])
    c.meta["view"] = [4, 18]
    add("conv.weight", "compressed", (4, 2, 3, 3), torch.bfloat16, [c], method="svd")
    # lossless against a base of the same dtype (bf16) and of another dtype (fp32 base, fp16 fine-tune)
    base["lossless_bf16.weight"] = torch.randn((8, 9), generator=g).bfloat16()
    ft = (base["lossless_bf16.weight"].float() + torch.randn((8, 9), generator=g) * 1e-3).bfloat16()
    add("lossless_bf16.weight", "compressed", (8, 9), torch.bfloat16, [encode_lossless(base["lossless_bf16.weight"], ft)], method="lossless")
    base["lossless_mixed.weight"] = torch.randn((5, 7), generator=g)
    ft = (base["lossless_mixed.weight"] + torch.randn((5, 7), generator=g) * 1e-3).half()
    add("lossless_mixed.weight", "compressed", (5, 7), torch.float16, [encode_lossless(base["lossless_mixed.weight"], ft)], method="lossless")
    return base, out, {}


def methods_vector() -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(2)
    p, q = 96, 160
    base: dict[str, torch.Tensor] = {}
    out: dict[str, tuple[dict, dict]] = {}
    settings = {
        "bitdelta": (None, {}),
        "svd": (1 / 4, {}),
        "deltacome": (1 / 4, {}),
        "dqrelo": (1 / 4, {}),
        "deltadq": (1 / 4, {}),
        "dare": (1 / 4, {}),
        "magnitude": (1 / 4, {}),
        "lossless": (None, {}),
        "dense": (None, {}),
    }
    for method, (ratio, params) in settings.items():
        name = f"{method}.weight"
        b = (torch.randn((p, q), generator=g) * 0.02).bfloat16()
        delta = (torch.randn((p, 12), generator=g) @ torch.randn((12, q), generator=g)) * 2e-4 + torch.randn((p, q), generator=g) * 5e-4
        ft = (b.float() + delta).bfloat16()
        base[name] = b
        enc = encode_tensor(name, b, ft, method, ratio, seed=0, **params)
        out[name] = (enc.record, enc.tensors)
    return base, out, {}


def write_vector(folder: str, base: dict, records: dict, method: str) -> None:
    path = HERE / folder
    if path.exists():
        shutil.rmtree(path)
    config = {
        "deltahub_version": __version__,
        "base": {"name_or_path": f"spec/vectors/{folder}/base.safetensors", "revision": None, "fingerprint": fingerprint((n, to_name(t.dtype), tuple(t.shape)) for n, t in base.items())},
        "finetuned": {"name_or_path": None, "revision": None, "dtype": "bfloat16"},
        "method": {"name": method, "ratio": None, "params": {}},
        "rules": [],
        "seed": 0,
    }
    with DeltaWriter(path, max_shard_size=4096) as w:
        for name, (record, tensors) in records.items():
            w.add(name, record, tensors)
        w.finish(config)
    save_file(base, str(path / "base.safetensors"))
    full = {n: records[n] for n in records}
    expected = {}
    for name, (record, tensors) in full.items():
        t = decode_record(name, record, lambda key, ts=tensors, n=name: ts[key[len(n) + 2 :]], base.get(name))
        if t is not None:
            expected[name] = t.contiguous()
    save_file(expected, str(path / "expected.safetensors"))


def check_components_exact(records: dict) -> None:
    """Every low-rank product of the components vector must be exact in float32: recompute it in
    float64 (exact for these few-bit values) and demand the same numbers."""
    from deltahub.format.components import LowRank, block_shape, matrix_view

    for name, (record, tensors) in records.items():
        for i, meta in enumerate(record.get("components") or []):
            if meta["type"] != "lowrank":
                continue
            fields = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == str(i)}
            blk = block_shape(tuple(record["shape"]), meta)
            p, q = matrix_view(blk, meta)
            ut, vt = LowRank.factor(meta, fields, "u", p), LowRank.factor(meta, fields, "v", q)
            exact = (ut.double().t() * fields["s"].double()) @ vt.double()
            got = LowRank.decode(meta, fields, blk).reshape(p, q).double()
            assert torch.equal(exact, got), f"{name}: component {i} is not exact in float32"


def chain_vector() -> None:
    """``chain/``: a keyframe (``keyframe/``, against ``base.safetensors``) and a version stored
    against it (``member/``, spec §4.4), each with its ``expected.safetensors``. The member's
    parent names a Hub repo that does not exist: a reader decodes it with ``keyframe/``'s decoded
    weights as the reference, and checks ``parent.weights`` against ``keyframe``'s
    ``finetuned.weights``. Dyadic values: every decode is exact."""
    from deltahub.chain import tensor_sha256, weights_digest

    root = HERE / "chain"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    g = torch.Generator().manual_seed(3)
    base = {"a.weight": dyadic(g, (4, 6)).bfloat16(), "b.weight": dyadic(g, (3, 5)).bfloat16(), "norm.weight": dyadic(g, (6,), 8, 24).bfloat16()}
    steps = [
        {"a.weight": (base["a.weight"].float() + dyadic(g, (4, 6), scale=1 / 64)).bfloat16(), "b.weight": base["b.weight"].clone(),
         "norm.weight": (base["norm.weight"].float() + 1 / 32).bfloat16()},
    ]
    prev = steps[0]
    changed = prev["a.weight"].clone()
    changed[1, 2] += 1 / 8  # a few values move, most stay: what a nearby checkpoint looks like
    changed[3, 0] -= 1 / 4
    steps.append({"a.weight": changed, "b.weight": prev["b.weight"].clone(), "norm.weight": (prev["norm.weight"].float() - 1 / 16).bfloat16()})
    fp = fingerprint((n, to_name(t.dtype), tuple(t.shape)) for n, t in base.items())
    parent = None
    for folder, ref, ft in (("keyframe", base, steps[0]), ("member", steps[0], steps[1])):
        records = {}
        for name, t in ft.items():
            if torch.equal(ref[name], t):
                rec, tensors = make_record("unchanged", tuple(t.shape), to_name(t.dtype))
            elif t.dim() == 1:
                rec, tensors = make_record("dense", tuple(t.shape), to_name(t.dtype), [encode_dense(t.float() - ref[name].float(), t.dtype)])
            else:
                rec, tensors = make_record("compressed", tuple(t.shape), to_name(t.dtype), [encode_lossless(ref[name], t)])
            got = decode_record(name, rec, lambda key, ts=tensors, n=name: ts[key[len(n) + 2:]], ref[name])
            assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name
            rec["sha256"] = tensor_sha256(got)
            records[name] = (rec, tensors)
        weights = weights_digest((n, r["dtype"], tuple(r["shape"]), r["sha256"]) for n, (r, _) in records.items())
        config = {
            "deltahub_version": __version__,
            "base": {"name_or_path": "spec/vectors/chain/base.safetensors", "revision": None, "fingerprint": fp},
            "finetuned": {"name_or_path": None, "revision": None, "dtype": "bfloat16", "weights": weights,
                          "fingerprint": fingerprint((n, to_name(t.dtype), tuple(t.shape)) for n, t in ft.items())},
            "method": {"name": "lossless", "ratio": None, "params": {}},
            "rules": [],
            "seed": 0,
        }
        if parent is not None:
            config.update({"requires": ["parent"], "parent": {"name_or_path": "deltahub-spec/chain-keyframe", "revision": "0" * 40, "weights": parent, "depth": 1}})
        with DeltaWriter(root / folder, max_shard_size=4096) as w:
            for name, (rec, tensors) in records.items():
                w.add(name, rec, tensors)
            w.finish(config)
        save_file({n: t.contiguous() for n, t in ft.items()}, str(root / folder / "expected.safetensors"))
        parent = weights
    save_file(base, str(root / "base.safetensors"))


def coded_vector() -> tuple[dict, dict, dict]:
    """``coded/`` (format 1.2): lowrank records whose quantized segments hold zstd-coded codes
    (spec §6.3), with dyadic values as ``components/`` so that every decode is exact. Codes are
    drawn skewed towards the middle codes, as round to nearest leaves them, so the frames are
    smaller than the packed codes; the 8-bit segments stay uncoded, as a writer leaves a plane
    that zstd does not shrink."""
    import zstandard

    g = torch.Generator().manual_seed(4)
    base: dict[str, torch.Tensor] = {}
    out: dict[str, tuple[dict, dict]] = {}
    coded: set[int] = set()
    for name, (p, q, r) in {"coded_a.weight": (21, 131, 37), "coded_b.weight": (64, 300, 12)}.items():
        base[name] = dyadic(g, (p, q)).bfloat16()
        segs = [Segment(0, 2, bits=8, group_size=128), Segment(2, r // 2, bits=3, group_size=64), Segment(r // 2, r, bits=2, group_size=128)]
        meta: dict = {"type": "lowrank", "rank": r, "u": [], "v": []}
        tensors: dict[str, torch.Tensor] = {"s": torch.full((r,), 0.5)}
        for factor, length in (("u", p), ("v", q)):
            for j, seg in enumerate(segs):
                w, ng = seg.end - seg.start, -(-length // seg.group_size)
                levels = 1 << seg.bits
                weights = torch.exp(-((torch.arange(levels) - (levels - 1) / 2) ** 2) / (levels / 8))
                codes = torch.multinomial(weights, w * length, replacement=True, generator=g)
                packed = bitpack.pack(codes, seg.bits)
                m = {"start": seg.start, "end": seg.end, "bits": seg.bits, "group_size": seg.group_size, "scale_dtype": "F16"}
                frame = zstandard.ZstdCompressor(level=3).compress(packed.numpy().tobytes())
                if seg.bits < 8 and len(frame) < packed.numel():  # coded where smaller, as writers do
                    coded.add(seg.bits)
                    m.update(coding="zstd", nbytes=len(frame))
                    packed = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
                meta[factor].append(m)
                tensors[f"{factor}.{j}.codes"] = packed
                tensors[f"{factor}.{j}.scale"] = torch.full((w, ng), 2.0**-6, dtype=torch.float16)
                tensors[f"{factor}.{j}.zero"] = torch.randint(0, levels, (w, ng), generator=g).to(torch.uint8)
        out[name] = make_record("compressed", (p, q), "BF16", [Component(meta, tensors)], method="auto")
    assert coded == {2, 3}, coded
    return base, out, {}


if __name__ == "__main__" and sys.argv[1:] == ["coded"]:
    b, r, _ = coded_vector()  # format 1.2's vector only: the older vectors are frozen
    check_components_exact(r)
    write_vector("coded", b, r, "auto")
    print("coded", sorted(p.name for p in (HERE / "coded").iterdir()))
elif __name__ == "__main__" and sys.argv[1:] == ["chain"]:
    chain_vector()  # format 1.1's vector only: the 1.0 vectors are frozen
    print("chain", sorted(str(p.relative_to(HERE)) for p in (HERE / "chain").rglob("*") if p.is_file()))
elif __name__ == "__main__":
    b, r, _ = components_vector()
    check_components_exact(r)
    write_vector("components", b, r, "mixed")
    b, r, _ = methods_vector()
    write_vector("methods", b, r, "mixed")
    for folder in ("components", "methods"):
        files = sorted(p.name for p in (HERE / folder).iterdir())
        print(folder, files)
