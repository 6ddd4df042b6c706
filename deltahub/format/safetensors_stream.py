"""Safetensors files one tensor at a time: a mapped reader and a streaming writer.

The format is an 8-byte little-endian header length, a JSON header (padded with spaces to a
multiple of 8) giving each tensor's dtype, shape and data offsets, then the data.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard
of a 70B delta would then cost 5 GB of RAM. :class:`SafetensorsStreamWriter` takes one tensor
at a time, so memory stays at one tensor. :class:`MappedSafetensors` reads a tensor as a view of
the page cache and gives its pages back afterwards, so reading costs neither a copy nor memory
that outlives the use.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import FormatError
from .dtypes import KNOWN_DTYPES, itemsize, to_name, to_torch
from .limits import MAX_HEADER_BYTES, MAX_NDIM, loads_json

_COPY_CHUNK = 64 << 20


# Pages given back to the kernel after a borrow; without madvise (Windows) they stay mapped.
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class MappedSafetensors:
    """A safetensors file mapped into memory, read one tensor at a time.

    ``borrow(key)`` yields the tensor as a view of the page cache (no copy, no new memory),
    then gives its pages back to the kernel: mapped pages otherwise stay counted in the
    process's memory for as long as the map lives, so streaming a 140 GB checkpoint would look
    like 140 GB of RSS. ``get(key)`` is an owned copy. The map is private: a write to a view
    would change this process's pages only, and is undone when they are given back, so views
    are for reading.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> from safetensors.torch import save_file; save_file({"a": torch.ones(2, 3)}, f"{d}/x.safetensors")
    >>> f = MappedSafetensors(f"{d}/x.safetensors")
    >>> f.keys(), f.info("a")
    (['a'], ('F32', (2, 3)))
    >>> with f.borrow("a") as t: float(t.sum())
    6.0
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        name = self.path.name
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise FormatError(f"{name} is not a safetensors file (bad header length); the file is truncated or corrupted")
            # Size and nesting are checked before json parses (a header nested 200,000 deep
            # would otherwise end in a RecursionError).
            header = loads_json(fh.read(n), f"{name} (malformed safetensors header)", max_bytes=MAX_HEADER_BYTES)
            self._check_header(name, header, n, size)
            # Mapped only once the header is known to tile the file: a shard padded to 100 GB is
            # refused for its trailing bytes, not by the kernel's answer to mapping it. An empty
            # map cannot be made; a file of no data needs none.
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None

    def _check_header(self, name: str, header: object, n: int, size: int) -> None:
        """Type-check every entry, each inside the file, and the entries tiling its data."""
        if not isinstance(header, dict):
            raise FormatError(f"{name}: the safetensors header is not a JSON object; the file is corrupted")
        self.metadata: dict[str, str] = _header_metadata(name, header.pop("__metadata__", None))
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            dtype, shape, a, b = _header_entry(name, key, e)
            if b > size - 8 - n:
                raise FormatError(f"{name}: tensor {key!r} lies past the end of the file; the file is truncated, download it again")
            if b - a != math.prod(shape) * itemsize(dtype):
                raise FormatError(f"{name}: tensor {key!r} holds {b - a} bytes, {dtype} {list(shape)} needs {math.prod(shape) * itemsize(dtype)}; the file is corrupted")
            self._entries[key] = (dtype, shape, 8 + n + a, b - a)
        _check_tiling(name, self._entries, 8 + n, size)

    def keys(self) -> list[str]:
        """Tensor keys in file order (by data offset), which keeps reads sequential."""
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype name, shape)`` of a tensor."""
        dtype, shape, _, _ = self._entries[key]
        return dtype, shape

    @contextmanager
    def borrow(self, key: str) -> Iterator[torch.Tensor]:
        """The tensor as a view of the file's pages, for the ``with`` block; read it, do not keep it."""
        dtype, shape, start, nbytes = self._entries[key]
        t = to_torch(dtype)
        if nbytes == 0:
            yield torch.empty(shape, dtype=t)
            return
        if start % t.itemsize:
            # Delta shards pack tensors without padding, so a small tensor (scales after codes)
            # may start off its dtype's alignment: it is copied, not viewed.
            yield torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=start).clone().view(t).view(shape)
            return
        view = torch.frombuffer(self._map, dtype=t, count=nbytes // t.itemsize, offset=start).view(shape)
        try:
            yield view
        finally:
            del view
            self._release(start, nbytes)

    def get(self, key: str) -> torch.Tensor:
        """The tensor, copied into memory of its own."""
        with self.borrow(key) as view:
            return view.clone()

    def _release(self, start: int, nbytes: int) -> None:
        # Only pages wholly inside the tensor: a page shared with a neighbour may be in use.
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and _DONTNEED is not None:
            self._map.madvise(_DONTNEED, first, last - first)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_metadata(name: str, meta: object) -> dict[str, str]:
    """``__metadata__``: absent, or an object of strings (safetensors' own rule)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{name}: the header's __metadata__ must be an object of strings, got {str(meta)[:100]}; the file is corrupted")
    return meta


def _header_entry(name: str, key: str, e: object) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, start, end)`` of one header entry, every field type-checked."""
    bad = f"{name}: malformed header entry for tensor {key!r}"
    if not isinstance(e, dict):
        raise FormatError(f"{bad}: not an object; the file is corrupted")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in KNOWN_DTYPES:
        raise FormatError(f"{bad}: field 'dtype' is {str(dtype)[:40]!r}, not one of {list(KNOWN_DTYPES)}; the file is corrupted")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{bad}: field 'shape' must be a list of at most {MAX_NDIM} non-negative integers, got {str(shape)[:100]}; the file is corrupted")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
        raise FormatError(f"{bad}: field 'data_offsets' must be two integers 0 <= begin <= end, got {str(offsets)[:100]}; the file is corrupted")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_tiling(name: str, entries: dict[str, tuple[str, tuple[int, ...], int, int]], data_start: int, size: int) -> None:
    """safetensors' own rule: the tensors' bytes tile the data region in order, without gaps
    or overlaps, up to the end of the file, so no two tensors alias the same bytes."""
    pos = data_start
    for key, (_, _, start, nbytes) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != pos:
            what = "overlaps the tensor before it" if start < pos else "leaves a gap before it"
            raise FormatError(f"{name}: tensor {key!r} {what} (data_offsets begin {start - data_start}, expected {pos - data_start}); the file is corrupted or hostile")
        pos += nbytes
    if pos != size:
        raise FormatError(f"{name}: {size - pos} bytes after the last tensor's data; the file is corrupted or hostile")


class SafetensorsStreamWriter:
    """Append tensors one at a time, then :meth:`close` to produce ``path``.

    Without ``layout``, each tensor's bytes go to a spool file and the header is written when
    the file is closed: a delta's stored tensors are sized only once encoded. With ``layout``
    (every key, dtype and shape, in order, known in advance, as ``apply`` knows them) the header
    is written first and each tensor straight after it, which saves writing the file twice.
    ``checksum=False`` skips the SHA-256 (then :meth:`close` returns ``None``).

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> w = SafetensorsStreamWriter(f"{d}/x.safetensors"); w.add("a", torch.ones(2)); _ = w.close()
    >>> from safetensors.torch import load_file; load_file(f"{d}/x.safetensors")["a"].tolist()
    [1.0, 1.0]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: dict[str, str] | None = None,
        layout: Sequence[tuple[str, torch.dtype, Sequence[int]]] | None = None,
        checksum: bool = True,
    ) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._metadata = dict(metadata or {})
        self._sha = hashlib.sha256() if checksum else None
        self._layout = None if layout is None else [(key, to_name(dt), [int(n) for n in shape]) for key, dt, shape in layout]
        if self._layout is None:
            self._spool_path: Path | None = self.path.with_name(self.path.name + ".spool")
            self._file = open(self._spool_path, "wb")
            return
        self._spool_path = None
        planned, offset = {}, 0
        for key, dt, shape in self._layout:
            if key in planned:
                raise ValueError(f"duplicate tensor key {key!r}")
            end = offset + math.prod(shape) * itemsize(dt)
            planned[key] = {"dtype": dt, "shape": shape, "data_offsets": [offset, end]}
            offset = end
        self._file = open(self.path, "wb")
        self._write(self._header(planned))

    @property
    def nbytes(self) -> int:
        return self._offset

    def _header(self, entries: dict[str, dict]) -> bytes:
        header = dict(entries)
        if self._metadata:
            header["__metadata__"] = self._metadata
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _write(self, data) -> None:
        self._file.write(data)
        if self._sha is not None and self._spool_path is None:
            self._sha.update(data)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._entries:
            raise ValueError(f"duplicate tensor key {key!r}")
        t = tensor.detach().cpu().contiguous()
        entry = (key, to_name(t.dtype), list(t.shape))
        if self._layout is not None:
            want = self._layout[len(self._entries)] if len(self._entries) < len(self._layout) else None
            if entry != want:
                raise ValueError(f"tensor {key!r} ({entry[1]} {entry[2]}) is not the next one the layout plans ({want})")
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""  # written from torch's memory, no copy
        self._write(data)
        self._entries[key] = {"dtype": entry[1], "shape": entry[2], "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)

    def close(self) -> str | None:
        """Write the file; return the SHA-256 hex digest of its bytes (``None`` without ``checksum``)."""
        self._file.close()
        if self._layout is not None:
            if len(self._entries) != len(self._layout):
                missing = [k for k, _, _ in self._layout[len(self._entries) :]]
                self.abort()
                raise ValueError(f"{self.path.name}: {len(missing)} planned tensor(s) never added, e.g. {missing[0]!r}")
            return self._sha.hexdigest() if self._sha is not None else None
        head = self._header(self._entries)
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(head)
            if self._sha is not None:
                self._sha.update(head)
            while chunk := spool.read(_COPY_CHUNK):
                out.write(chunk)
                if self._sha is not None:
                    self._sha.update(chunk)
        os.unlink(self._spool_path)
        return self._sha.hexdigest() if self._sha is not None else None

    def abort(self) -> None:
        self._file.close()
        for p in (self._spool_path, self.path):
            if p is not None and p.exists():
                os.unlink(p)
