"""What a reader accepts from a delta repo before it reads, allocates or writes anything
(spec/SECURITY.md). A delta downloaded from the Hub is untrusted input: every size that comes
from a file is checked against these bounds first, and every file is opened through
:func:`confined_file`, which keeps reads inside the repo.

>>> loads_json(b'{"a": [1, 2]}', "x.json")
{'a': [1, 2]}
>>> loads_json(b"[" * 100 + b"]" * 100, "x.json")
Traceback (most recent call last):
...
deltahub.errors.FormatError: x.json: JSON nested 100 deep, deeper than the 64 levels deltahub reads; the file is corrupted or hostile
>>> loads_json(b'{"a": 1, "a": 2}', "x.json")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
deltahub.errors.FormatError: x.json: the key 'a' appears twice in one object; ...
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import FormatError

# ---------------------------------------------------------------------------------- bounds
# A safetensors header (safetensors itself refuses headers above 100 MB).
MAX_HEADER_BYTES = 100 << 20
# delta_config.json and the index: one line per tensor; a 1T-parameter MoE checkpoint has a few
# 10^5 tensors at a few hundred bytes each.
MAX_CONFIG_BYTES = 256 << 20
MAX_INDEX_BYTES = 256 << 20
# finetuned_config.json, generation_config.json and other small JSON files deltahub parses.
MAX_SMALL_JSON_BYTES = 16 << 20
# Other files a delta repo carries and deltahub copies without parsing (tokenizer files, the
# card): a tokenizer.json of a 262k-token vocabulary is about 33 MB.
MAX_REPO_FILE_BYTES = 256 << 20
# Nesting of any JSON deltahub parses: records are 5 levels deep, model configs rarely 6.
MAX_JSON_DEPTH = 64
# Dimensions of a tensor, and elements of one tensor (2^36 = 64G elements: 8x the largest
# tensors of today's largest open checkpoints).
MAX_NDIM = 8
MAX_TENSOR_ELEMENTS = 1 << 36
# A record may grow dimension 0 of its base tensor (a resized vocabulary) to at most this
# multiple of the base's rows plus MAX_ADDED_ROWS.
MAX_ROW_GROWTH = 2
MAX_ADDED_ROWS = 1 << 16
# The decoded model may hold at most this multiple of the base's bytes (a float32 fine-tune of a
# bfloat16 base doubles them), plus the bytes the delta stores itself (added tensors).
MAX_DECODED_FACTOR = 2
# A model built from a fine-tune's config may hold at most MAX_DECODED_FACTOR x the records'
# decoded bytes plus this much more, in parameters and buffers, checked on the meta device before
# anything is allocated: room for buffers no record stores (rotary tables, causal masks: a
# 2048-position GPT-Neo-2.7B's masks are 134 MB), not for a config that asks for 30000^2 masks.
MAX_MODEL_SLACK_BYTES = 256 << 20
# Layers a fine-tune's config may declare beyond the blocks its records name.
LAYER_FIELDS = re.compile(r"^(num_hidden_layers|num_layers|n_layer|n_layers|num_decoder_layers|num_encoder_layers)$")

# --------------------------------------------------------------------------------- JSON
def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON text, strings left out (a linear scan,
    so that a hostile file is measured before the recursive parser sees it)."""
    # Escapes first: an escaped backslash, then an escaped quote; every quote left delimits a string.
    raw = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    outside = np.cumsum(raw == ord('"')) % 2 == 0
    step = np.zeros(raw.shape, dtype=np.int32)
    step[((raw == ord("[")) | (raw == ord("{"))) & outside] = 1
    step[((raw == ord("]")) | (raw == ord("}"))) & outside] = -1
    return int(np.cumsum(step).max(initial=0))


def loads_json(data: bytes | str, where: str, *, max_bytes: int = MAX_SMALL_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON from an untrusted file, size and nesting bounded first; errors name ``where``."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise FormatError(f"{where} holds {len(raw)} bytes, more than the {max_bytes} deltahub reads; the file is corrupted or hostile")
    # UTF-8 only (the spec's encoding). json.loads(bytes) would also take UTF-16 and UTF-32, whose
    # code units may hold a 0x22 byte that the scan below would read as a quote; in UTF-8 no byte
    # of a multi-byte character is ASCII, so the byte scan sees exactly the JSON's structure.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); the file is corrupted or hostile") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise FormatError(f"{where}: JSON nested {depth} deep, deeper than the {max_depth} levels deltahub reads; the file is corrupted or hostile")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{where}: the key {e.args[0][:80]!r} appears twice in one object; readers that keep the first and readers "
                          "that keep the last would see different files, so deltahub reads neither: the file is corrupted or hostile") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{where} is not valid JSON ({e}); the file is truncated or corrupted") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # Python keeps the last of two equal keys; other parsers (a safetensors header read by another
    # library) may keep the first: a key given twice is refused.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def read_json(path: str | os.PathLike, where: str | None = None, *, max_bytes: int = MAX_SMALL_JSON_BYTES):
    """:func:`loads_json` of a file, its size checked before it is read."""
    where = where or str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise FormatError(f"{where} holds {size} bytes, more than the {max_bytes} deltahub reads; the file is corrupted or hostile")
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise FormatError(f"{where} cannot be read ({e.strerror or e})") from None
    return loads_json(data, where, max_bytes=max_bytes)


# --------------------------------------------------------------------------------- paths
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


_CACHE_REPO = re.compile(r"^(models|datasets|spaces)--.+")


def roots_of(folder: str | os.PathLike) -> list[Path]:
    """The folders a repo's files may resolve into: the folder itself and, for a snapshot in a
    Hugging Face cache (``.../models--ORG--NAME/snapshots/<commit>``), whose files are links into
    the cached repo's ``blobs/``, that folder too. ``blobs`` counts only as the real folder beside
    the real ``snapshots`` folder of a cache repo, never through a link: a folder laid out like a
    snapshot whose ``blobs`` is a link to ``/`` would otherwise open the whole disk."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    blobs = real.parent.parent / "blobs"
    if real.parent.name == "snapshots" and _CACHE_REPO.match(real.parent.parent.name) and blobs.is_dir() and not blobs.is_symlink():
        roots.append(blobs)
    return roots


def confined_file(folder: str | os.PathLike, relpath: str, where: str) -> Path:
    """``folder/relpath``, refused unless ``relpath`` is a plain relative name (no ``..``, no
    absolute path, no dotfile) and the file, links followed, lies inside the repo
    (:func:`roots_of`). The answer does not depend on whether a target outside exists, so an
    error says nothing about files outside the repo. Existence inside is the caller's check.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> confined_file(d, "../etc/passwd", "the index")
    Traceback (most recent call last):
    ...
    deltahub.errors.FormatError: the index names '../etc/passwd', which is not a file name inside the delta repo; the repo is corrupted or hostile
    """
    if not isinstance(relpath, str) or not _PLAIN_NAME.match(relpath) or any(part.startswith(".") for part in relpath.split("/")):
        raise FormatError(f"{where} names {relpath!r}, which is not a file name inside the delta repo; the repo is corrupted or hostile")
    path = Path(folder) / relpath
    real = Path(os.path.realpath(path))
    if not any(real == root or root in real.parents for root in roots_of(folder)):
        raise FormatError(f"{where}: {relpath} is a link that leads outside the delta repo, which deltahub does not follow; the repo is corrupted or hostile")
    return path
