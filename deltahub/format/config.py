"""``delta_config.json`` (spec/FORMAT.md, "delta_config.json"): reading, writing, version checks."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable, Mapping

from ..errors import FormatError, UnsupportedFormatVersionError

FORMAT_NAME = "deltahub"
FORMAT_VERSION = "1.2"
# Features of a minor version that change how a repo decodes (spec §1, ``requires``): a reader
# refuses a repo that requires one it does not know instead of decoding it wrongly.
KNOWN_REQUIREMENTS = ("parent", "zstd-codes")
MAX_CHAIN_DEPTH = 64  # parents a version may stand on (spec §4.4): bounds the work of one load
CONFIG_NAME = "delta_config.json"
INDEX_NAME = "delta.safetensors.index.json"
FINETUNED_CONFIG_NAME = "finetuned_config.json"
CARD_NAME = "README.md"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SHARD_NAME = re.compile(r"^delta-(\d{5})-of-(\d{5})\.safetensors$")


def is_repo_file(relpath: str) -> bool:
    """Whether ``relpath`` is one of the files a delta repo consists of (spec §3.1): the config,
    the index, shards, the fine-tune's config, generation config and tokenizer files, the card.
    ``push`` uploads these and nothing else.

    >>> [is_repo_file(p) for p in ("delta-00001-of-00002.safetensors", "tokenizer.json", ".env", "notes.txt", "../x")]
    [True, True, False, False, False]
    """
    fixed = {CONFIG_NAME, INDEX_NAME, FINETUNED_CONFIG_NAME, GENERATION_CONFIG_NAME, CARD_NAME, *TOKENIZER_FILES}
    return relpath in fixed or bool(SHARD_NAME.match(relpath))


def shard_name(index: int, total: int) -> str:
    """``delta-00001-of-00003.safetensors`` (1-based)."""
    return f"delta-{index:05d}-of-{total:05d}.safetensors"


def check_version(version: object) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"`` and refuse majors this deltahub does not read."""
    if not isinstance(version, str) or not re.fullmatch(r"[0-9]+\.[0-9]+", version):
        raise FormatError(f"format_version must look like '1.0', got {version!r}")
    major, minor = (int(p) for p in version.split("."))
    ours = int(FORMAT_VERSION.split(".")[0])
    if major != ours:
        hint = "upgrade with `pip install -U deltahub`" if major > ours else "read it with the older deltahub that wrote it, or re-compress it"
        raise UnsupportedFormatVersionError(
            f"this delta uses format {version}; this deltahub reads format {ours}.x only: {hint}"
        )
    return major, minor


def fingerprint(entries: Iterable[tuple[str, str, tuple[int, ...]]]) -> str:
    """``"sha256:<hex>"`` of the sorted lines ``name\\tDTYPE\\t[d0,d1,...]\\n`` of a checkpoint's tensors.

    >>> fingerprint([("w", "BF16", (2, 3))])[:15]
    'sha256:bbf99fbd'
    """
    h = hashlib.sha256()
    for name, dtype, shape in sorted(entries):
        h.update(f"{name}\t{dtype}\t[{','.join(str(d) for d in shape)}]\n".encode())
    return "sha256:" + h.hexdigest()


def validate_config(cfg: Mapping) -> None:
    """Top-level checks of a parsed ``delta_config.json``: the three fields readers need
    (``format``, ``format_version``, ``tensors``), and the type of each optional provenance
    field when present, so that code reading ``cfg["base"]["fingerprint"]`` never meets a
    string or ``null`` where the spec has an object. Records are checked by
    :func:`records.validate_record`."""
    if cfg.get("format") != FORMAT_NAME:
        raise FormatError(f"{CONFIG_NAME} has format {str(cfg.get('format'))[:60]!r}, expected {FORMAT_NAME!r}: this is not a deltahub delta")
    check_version(cfg.get("format_version"))
    if not isinstance(cfg.get("tensors"), Mapping):
        raise FormatError(f"{CONFIG_NAME} has no 'tensors' object")
    for field, kind in _OPTIONAL_FIELDS.items():
        if field in cfg and not isinstance(cfg[field], kind):
            raise FormatError(f"{CONFIG_NAME}: field {field!r} must be {_TYPE_WORDS[kind]}, got {type(cfg[field]).__name__}; the file is corrupted or hostile")
    for field in ("base", "finetuned"):
        for sub, value in (cfg.get(field) or {}).items():
            if sub in ("name_or_path", "revision", "fingerprint", "dtype") and value is not None and not isinstance(value, str):
                raise FormatError(f"{CONFIG_NAME}: field '{field}.{sub}' must be a string or null, got {type(value).__name__}; the file is corrupted or hostile")
    checked = (cfg.get("base") or {}).get("id_checked")
    if checked is not None and not isinstance(checked, bool):
        raise FormatError(f"{CONFIG_NAME}: field 'base.id_checked' must be true, false or absent, got {type(checked).__name__}; the file is corrupted or hostile")
    _validate_chain(cfg)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise FormatError(f"{CONFIG_NAME}: field 'seed' must be an integer >= 0, got {str(seed)[:40]}; the file is corrupted or hostile")
    samples = (cfg.get("base") or {}).get("samples")
    if samples is not None and not (isinstance(samples, dict) and all(isinstance(v, str) for v in samples.values())):
        raise FormatError(f"{CONFIG_NAME}: field 'base.samples' must be an object of strings; the file is corrupted or hostile")
    for field in ("name", "params"):
        value = (cfg.get("method") or {}).get(field)
        if value is not None and not isinstance(value, str if field == "name" else dict):
            raise FormatError(f"{CONFIG_NAME}: field 'method.{field}' must be {'a string' if field == 'name' else 'an object'}; the file is corrupted or hostile")


_WEIGHTS = re.compile(r"sha256:[0-9a-f]{64}")  # always used with fullmatch: "$" would let a newline through
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A Hub repo id as huggingface_hub accepts it: each part starts and ends with a letter or digit
# (no "--" or ".." anywhere, checked beside it); no "datasets/" or "spaces/" prefix (a model repo).
_HUB_ID = re.compile(r"(?!datasets/|spaces/)[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?")


def _validate_chain(cfg: Mapping) -> None:
    """``requires``, ``parent`` and ``finetuned.weights`` (spec §1, §4.4): typed and bounded, and
    a requirement this reader does not know refused (a reader that ignored ``parent`` would decode
    the records against the wrong weights)."""
    requires = cfg.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise FormatError(f"{CONFIG_NAME}: field 'requires' must be a list of strings; the file is corrupted or hostile")
    if len(set(requires)) != len(requires):
        raise FormatError(f"{CONFIG_NAME}: field 'requires' lists a feature twice; the file is corrupted or hostile")
    unknown = [r for r in requires if r not in KNOWN_REQUIREMENTS]
    if unknown:
        raise UnsupportedFormatVersionError(
            f"{CONFIG_NAME} requires {str(unknown[0])[:40]!r}, which this deltahub does not implement (it knows {list(KNOWN_REQUIREMENTS)}): "
            "upgrade with `pip install -U deltahub`"
        )
    weights = (cfg.get("finetuned") or {}).get("weights")
    if weights is not None and not (isinstance(weights, str) and _WEIGHTS.fullmatch(weights)):
        raise FormatError(f"{CONFIG_NAME}: field 'finetuned.weights' must be 'sha256:' and 64 lowercase hex digits; the file is corrupted or hostile")
    parent = cfg.get("parent")
    if parent is None:
        if "parent" in requires:
            raise FormatError(f"{CONFIG_NAME} requires 'parent' but has no 'parent' object; the file is corrupted or hostile")
        return
    if "parent" not in requires:
        raise FormatError(f"{CONFIG_NAME} has a 'parent' but does not list it in 'requires' (spec §4.4); the file is corrupted or hostile")
    if not isinstance(parent, dict):
        raise FormatError(f"{CONFIG_NAME}: field 'parent' must be an object; the file is corrupted or hostile")
    name, revision = parent.get("name_or_path"), parent.get("revision")
    if not isinstance(name, str) or not name or len(name) > 4096 or re.search(r"[\x00-\x1f\x7f-\x9f]", name):
        raise FormatError(f"{CONFIG_NAME}: field 'parent.name_or_path' must be a non-empty string without control characters; the file is corrupted or hostile")
    local = name.startswith(("/", "./", "../"))
    if local and revision is not None:
        raise FormatError(f"{CONFIG_NAME}: 'parent.revision' must be null for a local parent folder ({name[:80]!r}); the file is corrupted or hostile")
    if not local and not (_HUB_ID.fullmatch(name) and "--" not in name and ".." not in name and isinstance(revision, str) and _COMMIT.fullmatch(revision)):
        raise FormatError(
            f"{CONFIG_NAME}: field 'parent' must name a Hub repo id ('org/name') at a commit (40 lowercase hex digits in 'parent.revision'), "
            f"or a local folder ('/...', './...', '../...'), got {name[:80]!r} at {str(revision)[:60]!r} (spec §4.4); the file is corrupted or hostile"
        )
    if not (isinstance(parent.get("weights"), str) and _WEIGHTS.fullmatch(parent["weights"])):
        raise FormatError(f"{CONFIG_NAME}: field 'parent.weights' must be 'sha256:' and 64 lowercase hex digits; the file is corrupted or hostile")
    depth = parent.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_CHAIN_DEPTH:
        raise FormatError(
            f"{CONFIG_NAME}: field 'parent.depth' must be an integer from 1 to {MAX_CHAIN_DEPTH} (a chain deeper than that is refused), "
            f"got {str(depth)[:40]}; re-compress the version against the base (a keyframe)"
        )


# Optional top-level fields (spec §4) and the JSON type each must have when present.
_OPTIONAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "deltahub_version": str, "base": dict, "finetuned": dict, "method": dict, "rules": list, "totals": dict, "summary": dict,
}
_TYPE_WORDS = {str: "a string", dict: "an object", list: "a list"}


def dumps_config(cfg: Mapping) -> str:
    """Serialize with readable top-level fields and one line per tensor record (deterministic)."""
    top = {k: v for k, v in cfg.items() if k != "tensors"}
    text = json.dumps(top, indent=2, sort_keys=True, ensure_ascii=False)
    from .records import config_line

    lines = [config_line(n, r) for n, r in cfg.get("tensors", {}).items()]
    body = "{\n" + "".join(lines)[:-2] + "\n  }" if lines else "{}"
    return text[:-2] + f',\n  "tensors": {body}\n}}\n' if top else f'{{\n  "tensors": {body}\n}}\n'


def loads_config(text: str | bytes, where: str = CONFIG_NAME) -> dict:
    """Parse and check ``delta_config.json`` (size and nesting bounded before parsing)."""
    from .limits import MAX_CONFIG_BYTES, loads_json

    cfg = loads_json(text, where, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict):
        raise FormatError(f"{where} must hold a JSON object")
    validate_config(cfg)
    return cfg


def read_config(path, where: str = CONFIG_NAME) -> dict:
    """:func:`loads_config` of a file, its size checked (MAX_CONFIG_BYTES) before it is read.
    The caller confines ``path`` to the repo (:func:`limits.confined_file`)."""
    from .limits import MAX_CONFIG_BYTES, read_json

    cfg = read_json(path, where, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict):
        raise FormatError(f"{where} must hold a JSON object")
    validate_config(cfg)
    return cfg
