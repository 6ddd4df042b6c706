"""k-bit packing of unsigned codes into bytes (spec/FORMAT.md, "Bit packing").

Codes form one little-endian bit stream: code ``i`` of width ``k`` occupies stream bits
``[i*k, (i+1)*k)``, least significant bit first, and stream bit ``b`` is bit ``b % 8``
(value ``1 << (b % 8)``) of byte ``b // 8``. Unused high bits of the last byte are zero.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FormatError

# Work in slices so that unpacking bits never needs 8x the codes' memory at once.
_CHUNK = 1 << 22


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack(codes: np.ndarray | torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (each < 2**bits) into a uint8 tensor.

    >>> pack(np.array([1, 0, 3]), 2).tolist()
    [49]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 and codes.size and (int(codes.min()) < 0 or int(codes.max()) > 255):
        raise ValueError(f"a code does not fit in {bits} bits")  # checked before the uint8 cast wraps it
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    if bits == 1:
        return torch.from_numpy(np.packbits(flat, bitorder="little"))
    if bits in (2, 4):
        per = 8 // bits
        padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
        padded[: flat.size] = flat
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        return torch.from_numpy(np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8))
    out = np.empty(packed_nbytes(flat.size, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    # Each chunk of 8 codes is a whole number of bytes, so chunks pack independently.
    step = _CHUNK - _CHUNK % 8
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        stream = ((part[:, None] >> shifts) & 1).reshape(-1)
        packed = np.packbits(stream, bitorder="little")
        o = start * bits // 8
        out[o : o + packed.size] = packed
    return torch.from_numpy(out)


def _packed_bytes(data: torch.Tensor | np.ndarray, bits: int, count: int) -> np.ndarray:
    """The packed stream as flat uint8, checked to hold ``count`` codes of ``bits`` bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    raw = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    raw = raw.reshape(-1).view(np.uint8)
    need = packed_nbytes(count, bits)
    if raw.size != need:
        raise FormatError(f"packed data holds {raw.size} bytes, {need} expected for {count} {bits}-bit codes")
    return raw


def unpack(data: torch.Tensor | np.ndarray, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``count`` codes as a uint8 tensor.

    >>> unpack(pack(np.array([1, 0, 3]), 2), 2, 3).tolist()
    [1, 0, 3]
    """
    raw = _packed_bytes(data, bits, count)
    if bits == 8:
        return torch.from_numpy(raw.copy())
    if bits == 1:
        return torch.from_numpy(np.unpackbits(raw, bitorder="little", count=count))
    if bits in (2, 4):
        # A byte holds whole codes: code j of every byte is one shift (and mask) over all the
        # bytes, written into column j (one long pass per code, 3-4x faster than the general case).
        per = 8 // bits
        out = np.empty((raw.size, per), dtype=np.uint8)
        for j in range(per):
            col = out[:, j]
            np.right_shift(raw, np.uint8(j * bits), out=col)
            if j < per - 1:  # the last code is the byte's top bits: nothing above it to mask
                np.bitwise_and(col, np.uint8((1 << bits) - 1), out=col)
        return torch.from_numpy(out.reshape(-1)[:count])
    # Eight codes fill exactly ``bits`` bytes, and code j of every such period starts at the same
    # bit, (j * bits) % 8 of byte (j * bits) // 8, spanning at most two bytes: each of the eight
    # is one shift and mask of a 16-bit window, over all periods at once.
    periods = -(-count // 8)
    padded = np.zeros(periods * bits + 1, dtype=np.uint8)  # +1: the window of the last byte
    padded[: raw.size] = raw
    mask = np.uint16((1 << bits) - 1)
    out = np.empty((periods, 8), dtype=np.uint8)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        lo = padded[byte : byte + periods * bits : bits].astype(np.uint16)
        hi = padded[byte + 1 : byte + 1 + periods * bits : bits].astype(np.uint16)
        out[:, j] = ((lo | (hi << np.uint16(8))) >> np.uint16(shift)) & mask
    return torch.from_numpy(out.reshape(-1)[:count])


def codes_of_each_byte(bits: int) -> np.ndarray:
    """uint8 [256, 8 // bits]: row ``b`` holds the codes byte value ``b`` packs, in stream order
    (least significant bits first), for widths that divide 8.

    >>> codes_of_each_byte(4)[0x21].tolist()
    [1, 2]
    """
    if 8 % bits:
        raise ValueError(f"a byte holds whole codes of 1, 2, 4 or 8 bits, not {bits}")
    return (np.arange(256, dtype=np.uint8)[:, None] >> np.arange(0, 8, bits, dtype=np.uint8)) & np.uint8((1 << bits) - 1)


def lookup(data: torch.Tensor | np.ndarray, bits: int, count: int, table: torch.Tensor) -> torch.Tensor:
    """``table[code]`` for each of the ``count`` packed codes of 1, 2 or 4 bits, never unpacked:
    ``table`` holds the ``2**bits`` values the codes stand for (a CPU tensor), and each byte
    looks up the values of its codes at once, one gather (2.6-4.4x faster than unpacking and
    computing the values; for wider codes it is not faster, so they unpack).

    >>> lookup(pack(np.array([1, 0, 3]), 2), 2, 3, torch.tensor([0.0, 0.5, 1.0, 1.5])).tolist()
    [0.5, 0.0, 1.5]
    """
    if bits not in (1, 2, 4):
        raise ValueError(f"lookup takes 1-, 2- or 4-bit codes, got {bits}")
    if table.numel() != 1 << bits:
        raise ValueError(f"a table for {bits}-bit codes holds {1 << bits} values, got {table.numel()}")
    raw = _packed_bytes(data, bits, count)
    by_byte = table.numpy()[codes_of_each_byte(bits)]  # [256, 8 // bits]: the values of each byte's codes
    # np.take along axis 0 copies whole rows; fancy indexing (by_byte[raw]) was 10x slower.
    return torch.from_numpy(np.take(by_byte, raw, axis=0).reshape(-1)[:count])
