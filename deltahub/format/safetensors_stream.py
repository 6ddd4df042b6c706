"""A streaming writer of safetensors files.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard
of a 70B delta would then cost 5 GB of RAM. This writer takes one tensor at a time, so memory
stays at one tensor. The format is an 8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the data: when the tensors are not known in advance their
bytes wait in a spool file until the header can be written. Files are read back with the safetensors library,
through :func:`open_streaming`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .dtypes import itemsize, to_name

_COPY_CHUNK = 64 << 20


def open_streaming(path: str | os.PathLike):
    """``safe_open`` reading with pread where safetensors supports it.

    A memory map keeps every page it ever touched resident, so streaming a 70B checkpoint would
    show up as 140 GB of RSS, and a loaded delta model would carry its delta's pages on top of
    the model. With pread a tensor's memory goes when the tensor does.
    """
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument
        return safe_open(str(path), framework="pt")


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
