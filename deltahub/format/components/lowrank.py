"""``lowrank``: U diag(S) V^T with factors stored float or k-bit quantized in rank segments.

Factors are stored vector-major: row ``j`` of a segment ``[start, end)`` of factor U is the
singular vector ``start + j`` (a column of U, length p); likewise for V (length q).
Segments carry their own precision, which is how Delta-CoMe's mixed precision is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import zstandard

from ...errors import FormatError
from .. import bitpack
from ..dtypes import FLOAT_NAMES, itemsize, to_name, to_torch
from ..limits import MAX_TENSOR_ELEMENTS
from ..quant import GroupQuant, dequantize_groups, quantize_groups
from .lossless import decompress_planes
from .base import Component, ComponentType, Layout, RowAdder, check_int, is_int, matrix_view, register_component


def _ngroups(length: int, group_size: int) -> int:
    return -(-length // group_size)


# Upper bound of a quantization group: groups longer than a vector are one group over the
# vector (quant.dequantize_groups never allocates by group_size), so any bound is only sanity.
MAX_GROUP_SIZE = MAX_TENSOR_ELEMENTS


def _segment_layout(prefix: str, seg: Mapping, length: int) -> Layout:
    start, end = seg["start"], seg["end"]  # typed by _check_segments
    width = end - start
    if "bits" in seg:
        bits = check_int(f"{prefix}.bits", seg["bits"], 1, 8)
        g = check_int(f"{prefix}.group_size", seg.get("group_size"), 1, MAX_GROUP_SIZE)
        sdt = seg.get("scale_dtype", "F16")
        if not isinstance(sdt, str) or sdt not in ("F16", "F32"):
            raise FormatError(f"field '{prefix}.scale_dtype' must be 'F16' or 'F32', got {str(sdt)[:40]!r}")
        ng = _ngroups(length, g)
        return {
            f"{prefix}.codes": ("U8", (_codes_nbytes(prefix, seg, bitpack.packed_nbytes(width * length, bits)),)),
            f"{prefix}.scale": (sdt, (width, ng)),
            f"{prefix}.zero": ("U8", (width, ng)),
        }
    if "coding" in seg or "nbytes" in seg:
        raise FormatError(f"field '{prefix}.coding': only a quantized segment (with 'bits') has coded codes; this one stores float values")
    dt = seg.get("dtype")
    if not isinstance(dt, str) or dt not in FLOAT_NAMES:
        raise FormatError(f"lowrank segment {prefix} needs 'bits' or a float 'dtype' ({list(FLOAT_NAMES)}), got dtype {str(dt)[:40]!r}")
    return {f"{prefix}.values": (dt, (width, length))}


# Codings of a quantized segment's codes (spec §6.3, format 1.2): "zstd" holds the packed codes
# as one zstd frame, whose size the segment's "nbytes" gives.
CODINGS = ("zstd",)
CODED_FEATURE = "zstd-codes"  # what a repo with coded segments lists in `requires` (spec §1.7)


# A coded plane decompresses to at most this many times its stored bytes (spec §6.3): real codes
# shrink to 0.8-0.9, and the bound keeps what a reader allocates proportional to the file, not to
# a shape the record declares (a 9-byte frame may not stand for a gigabyte of codes).
MAX_CODED_EXPANSION = 64


def _codes_nbytes(prefix: str, seg: Mapping, packed: int) -> int:
    """Stored bytes of a segment's codes: the packed size, or a coded segment's ``nbytes``."""
    if "coding" not in seg:
        return packed
    coding = seg["coding"]
    if coding not in CODINGS:
        raise FormatError(f"field '{prefix}.coding' is {str(coding)[:40]!r}, which this deltahub does not read (it reads {list(CODINGS)}); upgrade: pip install -U deltahub")
    # A frame of at least one byte; a coded plane never needs to be larger than its packed size
    # plus a frame's overhead, so anything beyond that is refused before it is read.
    n = check_int(f"{prefix}.nbytes", seg.get("nbytes"), 1, packed + 64)
    if packed > MAX_CODED_EXPANSION * n:
        raise FormatError(
            f"field '{prefix}.nbytes' is {n}: a coded plane holds at most {MAX_CODED_EXPANSION}x its stored bytes, "
            f"and this segment's packed codes are {packed} bytes (spec §6.3); the delta is corrupted or hostile"
        )
    return n


def _decoded_codes(frame: torch.Tensor, packed: int, field: str) -> torch.Tensor:
    """A coded segment's packed codes: its zstd frame decompressed to exactly ``packed`` bytes
    (a frame for an empty segment too must decompress to nothing)."""
    raw = decompress_planes(frame.cpu().numpy().tobytes(), packed, field=field)
    return torch.frombuffer(raw, dtype=torch.uint8) if packed else torch.zeros(0, dtype=torch.uint8)


def _check_segments(factor: str, segs: Sequence[Mapping], rank: int) -> None:
    pos = 0
    for j, seg in enumerate(segs):
        if not isinstance(seg, Mapping):
            raise FormatError(f"lowrank segment {factor}.{j} must be an object, got {str(seg)[:60]}")
        start, end = seg.get("start"), seg.get("end")
        if not (is_int(start) and is_int(end)) or start != pos or end <= pos:
            raise FormatError(f"lowrank {factor} segments must tile [0, {rank}) in order with integer 'start' and 'end'; segment {j} is [{str(start)[:20]}, {str(end)[:20]})")
        pos = end
    if pos != rank:
        raise FormatError(f"lowrank {factor} segments cover [0, {pos}), rank is {rank}")


@register_component
class LowRank(ComponentType):
    name = "lowrank"

    @classmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        p, q = matrix_view(block, meta)
        # Not bounded by min(p, q): the spec allows more (spec/vectors has rank 37 on a 21x131
        # view) and the field `s` stores 4 bytes per rank, so the file's size bounds it.
        rank = check_int("rank", meta.get("rank"), 1, MAX_TENSOR_ELEMENTS)
        out: Layout = {"s": ("F32", (rank,))}
        for factor, length in (("u", p), ("v", q)):
            segs = meta.get(factor)
            if not isinstance(segs, list):
                raise FormatError(f"lowrank needs a segment list {factor!r}, got {type(segs).__name__}")
            _check_segments(factor, segs, rank)
            for j, seg in enumerate(segs):
                out.update(_segment_layout(f"{factor}.{j}", seg, length))
        return out

    @classmethod
    def uncoded(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], p: int, q: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """The same component with every coded segment's codes decompressed to their packed form
        and its ``coding`` dropped (for decoders that read the codes many times, e.g. per forward)."""
        meta, tensors = dict(meta), dict(tensors)
        for factor, length in (("u", p), ("v", q)):
            segs = [dict(seg) for seg in meta[factor]]
            for j, seg in enumerate(segs):
                if "coding" in seg and "bits" in seg:  # layout() refused coding on a float segment
                    packed = bitpack.packed_nbytes((seg["end"] - seg["start"]) * length, seg["bits"])
                    key = f"{factor}.{j}.codes"
                    tensors[key] = _decoded_codes(tensors[key], packed, key)
                    del seg["coding"], seg["nbytes"]
            meta[factor] = segs
        return meta, tensors

    @classmethod
    def factor(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], factor: str, length: int) -> torch.Tensor:
        """The factor decoded vector-major, float32 [rank, length]."""
        parts = []
        for j, seg in enumerate(meta[factor]):
            key = f"{factor}.{j}"
            width = seg["end"] - seg["start"]
            if "bits" in seg:
                data = tensors[f"{key}.codes"]
                if "coding" in seg:  # zstd: exactly the packed bytes, bounded before and while decompressing
                    data = _decoded_codes(data, bitpack.packed_nbytes(width * length, seg["bits"]), f"{key}.codes")
                codes = bitpack.unpack(data, seg["bits"], width * length).view(width, length)
                parts.append(dequantize_groups(codes, tensors[f"{key}.scale"], tensors[f"{key}.zero"], seg["group_size"]))
            else:
                parts.append(tensors[f"{key}.values"].to(torch.float32))
        return torch.cat(parts, dim=0)

    @classmethod
    def row_adder(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> RowAdder:
        p, q = matrix_view(block, meta)
        us = cls.factor(meta, tensors, "u", p).t() * tensors["s"].to(torch.float32)  # [p, r], rounded to float32 before the product
        return _LowRankRows(us, cls.factor(meta, tensors, "v", q))


class _LowRankRows(RowAdder):
    def __init__(self, us: torch.Tensor, vt: torch.Tensor) -> None:
        self.us, self.vt = us, vt

    def add(self, out: torch.Tensor, r0: int, r1: int) -> None:
        out.addmm_(self.us[r0:r1], self.vt)


@dataclass(frozen=True)
class Segment:
    """Precision of the rank range ``[start, end)`` of one factor: ``bits`` (quantized) or a float ``dtype``."""

    start: int
    end: int
    bits: int | None = None
    group_size: int = 128
    dtype: str = "F16"

    def width(self) -> int:
        return self.end - self.start

    def nbytes(self, length: int, scale_dtype: str = "F16") -> int:
        if self.bits is None:
            return self.width() * length * itemsize(self.dtype)
        ng = _ngroups(length, self.group_size)
        return bitpack.packed_nbytes(self.width() * length, self.bits) + self.width() * ng * (itemsize(scale_dtype) + 1)


def segments_nbytes(segs: Sequence[Segment], p: int, q: int) -> int:
    """Data bytes of U and V stored with the same segments, plus S (float32)."""
    rank = segs[-1].end if segs else 0
    return 4 * rank + sum(s.nbytes(p) + s.nbytes(q) for s in segs)


def segment_meta(seg: Segment, scale_dtype: str = "F16") -> dict:
    """The JSON of one segment as the spec writes it."""
    if seg.bits is None:
        return {"start": seg.start, "end": seg.end, "dtype": seg.dtype}
    return {"start": seg.start, "end": seg.end, "bits": seg.bits, "group_size": seg.group_size, "scale_dtype": scale_dtype}


def lowrank_meta(segs: Sequence[Segment], v_segs: Sequence[Segment] | None = None) -> dict:
    """Meta of a lowrank component with these segments (float16 scales assumed), for planning budgets."""
    rank = segs[-1].end
    return {"type": "lowrank", "rank": rank, "u": [segment_meta(s) for s in segs], "v": [segment_meta(s) for s in (v_segs or segs)]}


# quantizer(vectors [w, length], bits, group_size) -> GroupQuant; quantize_groups (round to nearest) by default.
Quantizer = Callable[[torch.Tensor, int, int], GroupQuant]


# zstd level of coded codes: level 3 codes 2-bit planes to 0.809 of their bytes, level 19 to
# 0.807 at 20x the time (an auto delta of the heavy Austen pair at 1/64).
ZSTD_LEVEL = 3


def code_zstd(packed: torch.Tensor) -> torch.Tensor | None:
    """The packed codes as one zstd frame, or ``None`` where that is not smaller, counting the
    segment's two more JSON fields (``,"coding":"zstd","nbytes":N`` in the record's compact JSON,
    spec §11.1): a small plane can save fewer bytes than the fields cost."""
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(packed.numpy().tobytes())
    fields = len(f',"coding":"zstd","nbytes":{len(frame)}')
    if len(frame) + fields >= packed.numel() or packed.numel() > MAX_CODED_EXPANSION * len(frame):
        return None  # not smaller, or smaller than readers accept (a constant plane: store it packed)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8)


def _encode_factor(prefix: str, vectors: torch.Tensor, segs: Sequence[Segment], quantizer: Quantizer = quantize_groups, coded: bool = False) -> tuple[list[dict], dict[str, torch.Tensor]]:
    metas: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for j, seg in enumerate(segs):
        block = vectors[seg.start : seg.end]
        key = f"{prefix}.{j}"
        if seg.bits is None:
            metas.append(segment_meta(seg))
            tensors[f"{key}.values"] = block.to(to_torch(seg.dtype)).contiguous()
        else:
            gq = quantizer(block, seg.bits, seg.group_size)
            meta = segment_meta(seg, to_name(gq.scale.dtype))
            tensors[f"{key}.codes"] = bitpack.pack(gq.codes, seg.bits)
            frame = code_zstd(tensors[f"{key}.codes"]) if coded else None
            if frame is not None:
                meta.update(coding="zstd", nbytes=frame.numel())
                tensors[f"{key}.codes"] = frame
            metas.append(meta)
            tensors[f"{key}.scale"] = gq.scale.contiguous()
            tensors[f"{key}.zero"] = gq.zero.contiguous()
    return metas, tensors


def encode_lowrank(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, segs: Sequence[Segment], v_segs: Sequence[Segment] | None = None,
    v_quantizer: Quantizer = quantize_groups, coded: bool = False,
) -> Component:
    """Encode U [p, r], S [r], V [q, r] (so the block is U diag(S) V^T) with the given segments.

    ``v_quantizer`` quantizes V's quantized segments (e.g. GPTQ against input activations).
    ``coded``: each quantized segment's codes are stored as a zstd frame where that is smaller
    (format 1.2, spec §6.3; the repo then requires ``zstd-codes``).
    """
    rank = s.numel()
    if rank < 1:
        raise ValueError("a lowrank component needs rank >= 1")
    um, ut = _encode_factor("u", u.t().contiguous().to(torch.float32), segs, coded=coded)
    vm, vt = _encode_factor("v", v.t().contiguous().to(torch.float32), v_segs or segs, v_quantizer, coded=coded)
    meta = {"type": "lowrank", "rank": rank, "u": um, "v": vm}
    return Component(meta, {"s": s.to(torch.float32).contiguous(), **ut, **vt})
