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
        """The fine-tuned tensor, exactly, given the base already shaped like it. The zstd data is
        bounded before and while it is decompressed (:func:`decompress_planes`)."""
        w = dtype.itemsize
        numel = base.numel()
        raw = decompress_planes(tensors["data"].numpy().tobytes(), numel * w)
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(w, numel)
        xor = np.ascontiguousarray(planes.T).view(f"<u{w}").reshape(-1)
        base_bits = base.to(dtype).contiguous().view(-1).view(_torch_uint(w)).numpy().astype(f"<u{w}")
        out = np.bitwise_xor(base_bits, xor).astype(_UINT[w])
        return torch.from_numpy(out).view(dtype).reshape(base.shape)

    @classmethod
    def check_exact(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], nbytes: int) -> None:
        """``verify``'s check without the base: the zstd data decompresses to exactly ``nbytes``
        (the record's elements x its dtype's width), a stretch at a time, never holding more
        than 1 MiB of output (:func:`decompress_planes` with ``keep=False``)."""
        decompress_planes(tensors["data"].numpy().tobytes(), nbytes, keep=False)

    @classmethod
    def row_adder(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor], block: tuple[int, ...]) -> RowAdder:
        raise FormatError("lossless decodes against the base; use records.decode_record")


MAX_WINDOW_FLOOR = 1 << 23

# What verify decompresses at a time: output is counted, not kept.
_CHECK_CHUNK = 1 << 20


def decompress_planes(data: bytes, expected: int, keep: bool = True, field: str = "data") -> bytearray:
    """The bytes a zstd-coded field holds (a lossless component's ``data``, a coded segment's
    ``codes``), which must be exactly ``expected`` bytes; :class:`FormatError` naming ``field`` otherwise.

    A zstd frame may declare its content size, and a one-shot decompress allocates that size
    whatever it is told (python-zstandard ignores ``max_output_size`` then): a 17-byte frame can
    ask for a terabyte. So the declared size is compared first (it must be absent or at most
    ``expected``), and the data is decompressed as a stream of at most ``expected + 1`` output
    bytes. The writer stores one frame; frames concatenated after it are decoded as their
    concatenation (as ``zstd -d`` does), within the same bound, and anything else after the
    frame is an error. With ``keep=False`` the output is counted in 1 MiB pieces and dropped
    (for ``verify``, which has no base)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise FormatError(f"field '{field}' is not a zstd frame ({len(data)} bytes, no valid frame header); the file is corrupted") from None
    if declared > expected:  # -1: the frame does not say
        raise FormatError(
            f"field '{field}': its zstd frame declares {declared} bytes, but {expected} bytes are expected (the field's shape from the record's meta); "
            "the delta is corrupted or hostile"
        )
    # A frame's header may ask for a window of up to 2 GiB, which the decoder reserves whatever
    # the content: capped at what standard levels use (8 MiB at level 19) or the output's size.
    window = max(MAX_WINDOW_FLOOR, 1 << max(expected - 1, 1).bit_length())
    reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(data, read_across_frames=True)
    try:
        if keep:
            out = bytearray(expected)
            view = memoryview(out)
            got = 0
            while got < expected and (n := reader.readinto(view[got:])):
                got += n
            extra = len(reader.read(1))
        else:
            out, got, extra = bytearray(), 0, 0
            while chunk := reader.read(min(_CHECK_CHUNK, expected + 1 - got)):
                got += len(chunk)
                if got > expected:
                    extra, got = got - expected, expected
                    break
    except zstandard.ZstdError as e:
        raise FormatError(f"field '{field}' does not decompress ({e}); the file is corrupted") from None
    if got != expected or extra:
        held = f"more than {expected}" if extra else str(got)
        raise FormatError(f"field '{field}' decompresses to {held} bytes, {expected} expected (from the record's meta); the file is corrupted")
    return out


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


