"""``lossless``: the fine-tuned tensor bit for bit, as zstd of the byte planes of ``ft XOR base``.

The element bits of the fine-tune and of the base (cast to the fine-tune's dtype, round to
nearest even) are XORed as little-endian unsigned integers of the dtype's width w; the XOR's
bytes are regrouped into w planes (plane j holds byte j of every element, in element order),
the planes are concatenated and the result is one zstd frame. Planes help because the high
bytes (sign, exponent) of a fine-tune rarely differ from the base's, so they compress well.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import zstandard

from ...errors import FormatError
from .base import Component, ComponentType, Layout, RowAdder, check_int, register_component

CODEC = "xor-byteplanes-zstd"
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@register_component
class Lossless(ComponentType):
    name = "lossless"
    needs_base = True

    @classmethod
    def layout(cls, meta: Mapping, block: tuple[int, ...]) -> Layout:
        if meta.get("codec") != CODEC:
            raise FormatError(f"lossless codec must be {CODEC!r}, got {str(meta.get('codec'))[:40]!r}")
        if "rows" in meta:
            raise FormatError("a lossless component covers the whole tensor and cannot have 'rows'")
        n = check_int("nbytes", meta.get("nbytes"), 0)
        return {"data": ("U8", (n,))}

    @classmethod
    def decode_exact(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fine-tuned tensor, exactly, given the base already shaped like it."""
        w = dtype.itemsize
        numel = base.numel()
        try:
            raw = zstandard.ZstdDecompressor().decompress(tensors["data"].numpy().tobytes(), max_output_size=numel * w)
        except zstandard.ZstdError as e:
            raise FormatError(f"lossless data does not decompress ({e}); the file is corrupted") from None
        if len(raw) != numel * w:
            raise FormatError(f"lossless data holds {len(raw)} bytes, {numel * w} expected")
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(w, numel)
        xor = np.ascontiguousarray(planes.T).view(f"<u{w}").reshape(-1)
        base_bits = base.to(dtype).contiguous().view(-1).view(_torch_uint(w)).numpy().astype(f"<u{w}")
        out = np.bitwise_xor(base_bits, xor).astype(_UINT[w])
        return torch.from_numpy(out).view(dtype).reshape(base.shape)

    @classmethod
    def row_adder(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> RowAdder:
        raise FormatError("lossless decodes against the base; use records.decode_record")


def _torch_uint(w: int) -> torch.dtype:
    return {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}[w]


def encode_lossless(base: torch.Tensor, finetuned: torch.Tensor, level: int = 3) -> Component:
    """Exact encoding of ``finetuned`` against ``base`` (same shape; base cast to the fine-tune's dtype)."""
    dtype = finetuned.dtype
    w = dtype.itemsize
    a = finetuned.contiguous().view(-1).view(_torch_uint(w)).numpy().astype(f"<u{w}")
    b = base.to(dtype).contiguous().view(-1).view(_torch_uint(w)).numpy().astype(f"<u{w}")
    xor = np.bitwise_xor(a, b)
    planes = xor.view(np.uint8).reshape(-1, w).T.tobytes()
    data = zstandard.ZstdCompressor(level=level).compress(planes)
    meta = {"type": "lossless", "codec": CODEC, "nbytes": len(data)}
    return Component(meta, {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)})


