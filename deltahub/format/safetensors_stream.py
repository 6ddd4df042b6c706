"""A streaming writer of safetensors files.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard
of a 70B delta would then cost 5 GB of RAM. This writer appends each tensor's bytes to a
spool file as it comes and writes the header (the format is an 8-byte little-endian header
length, a JSON header padded with spaces to a multiple of 8, then the data) when the file is
closed, so memory stays at one tensor. Files are read back with the safetensors library,
through :func:`open_streaming`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .dtypes import to_name

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

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> w = SafetensorsStreamWriter(f"{d}/x.safetensors"); w.add("a", torch.ones(2)); _ = w.close()
    >>> from safetensors.torch import load_file; load_file(f"{d}/x.safetensors")["a"].tolist()
    [1.0, 1.0]
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._metadata = dict(metadata or {})

    @property
    def nbytes(self) -> int:
        return self._offset

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._entries:
            raise ValueError(f"duplicate tensor key {key!r}")
        t = tensor.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._spool.write(data)
        self._entries[key] = {"dtype": to_name(t.dtype), "shape": list(t.shape), "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)

    def close(self) -> str:
        """Write the file; return the SHA-256 hex digest of its bytes."""
        self._spool.close()
        header = dict(self._entries)
        if self._metadata:
            header["__metadata__"] = self._metadata
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        h = hashlib.sha256()
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            head = struct.pack("<Q", len(raw)) + raw
            out.write(head)
            h.update(head)
            while chunk := spool.read(_COPY_CHUNK):
                out.write(chunk)
                h.update(chunk)
        os.unlink(self._spool_path)
        return h.hexdigest()

    def abort(self) -> None:
        self._spool.close()
        for p in (self._spool_path, self.path):
            if p.exists():
                os.unlink(p)


