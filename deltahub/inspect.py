"""``deltahub info`` and ``deltahub verify``: what a delta holds, and whether it is intact."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DeltahubError, FormatError
from .format import CONFIG_NAME, INDEX_NAME
from .format.config import loads_config
from .format.records import dense_nbytes, describe_record, record_layout, record_nbytes, validate_record
from .format.dtypes import to_name
from .sources import HubOptions, base_differences, open_base, open_delta, sha256_file


@dataclass
class TensorRow:
    name: str
    kind: str
    method: str | None
    shape: list[int]
    dtype: str
    components: list[str]
    stored_bytes: int
    dense_bytes: int
    holds: str = ""  # what the record stores: rank and bit widths, keep rate and value bits, ...

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 0.0


@dataclass
class DeltaInfo:
    """The config of a delta and a row per tensor, read from ``delta_config.json`` alone."""

    source: str
    config: dict
    tensors: list[TensorRow] = field(default_factory=list)

    def to_dict(self, with_tensors: bool = True) -> dict:
        cfg = {k: v for k, v in self.config.items() if k != "tensors"}
        out = {"source": self.source, **cfg}
        if with_tensors:
            out["tensors"] = [{**asdict(t), "ratio": round(t.ratio, 6)} for t in self.tensors]
        return out


def _load_config(delta: str | os.PathLike, revision: str | None, hub: HubOptions) -> dict:
    path = Path(delta)
    if path.is_dir():
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file():
            raise FormatError(f"{path} has no {CONFIG_NAME}: it is not a deltahub delta repo")
        return loads_config(cfg_path.read_text(), str(cfg_path))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        local = hf_hub_download(str(delta), CONFIG_NAME, revision=revision, **hub.kwargs())
    except EntryNotFoundError:
        raise FormatError(f"{delta} has no {CONFIG_NAME}: it is not a deltahub delta repo") from None
    except HfHubHTTPError as e:
        raise DeltahubError(f"cannot read {CONFIG_NAME} of {delta}: {e}") from None
    return loads_config(Path(local).read_text(), f"{delta}/{CONFIG_NAME}")


def info(delta: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None, cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> DeltaInfo:
    """Describe a delta from its config only: on a Hub id, no shard is downloaded.

    Example::

        print(deltahub.info("user/my-delta").config["totals"])
    """
    cfg = _load_config(delta, revision, HubOptions(token, cache_dir, local_files_only))
    rows = []
    for name, rec in cfg["tensors"].items():
        validate_record(name, rec)
        comps = [c["type"] for c in rec.get("components") or []]
        stored = 0 if rec["kind"] in ("unchanged", "removed") else record_nbytes(name, rec)
        dense = 0 if rec["kind"] == "removed" else dense_nbytes(rec)
        rows.append(TensorRow(name, rec["kind"], rec.get("method"), rec["shape"], rec["dtype"], comps, stored, dense, describe_record(rec)))
    return DeltaInfo(str(delta), cfg, rows)


@dataclass
class VerifyReport:
    ok: bool
    checked_tensors: int = 0
    problems: list[str] = field(default_factory=list)
    base_checked: bool = False

    def __str__(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.checked_tensors} tensors checked" + (", base matches" if self.base_checked and self.ok else "")
        return "\n".join([head] + [f"- {p}" for p in self.problems])


def verify(
    delta: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    check_base: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> VerifyReport:
    """Check integrity: every shard present with its recorded SHA-256, every stored tensor where
    the index says with the dtype and shape the spec requires, and every component decoding to
    its declared shape. With ``base`` (or ``check_base=True`` for the recorded one), also check
    that the base matches.

    Example::

        report = deltahub.verify("my-delta", base="Qwen/Qwen2.5-0.5B")
        assert report.ok, report
    """
    from .format.components import component_type, block_shape

    hub = HubOptions(token, cache_dir, local_files_only)
    report = VerifyReport(ok=True)
    try:
        reader = open_delta(delta, revision, hub)
    except DeltahubError as e:
        return VerifyReport(False, 0, [str(e)])
    checksums = reader.index.get("metadata", {}).get("sha256", {})
    for shard in sorted(set(reader.weight_map.values())):
        path = reader.path / shard
        if not path.is_file():
            report.problems.append(f"shard {shard} is missing")
            continue
        if shard in checksums and sha256_file(path) != checksums[shard]:
            report.problems.append(f"shard {shard} does not match its SHA-256 in {INDEX_NAME}: it is corrupted")
    expected_keys: set[str] = set()
    for name, rec in reader.records.items():
        try:
            validate_record(name, rec)
            layout = record_layout(name, rec)
            expected_keys.update(layout)
            fetched = {}
            for key, (dt, shape) in layout.items():
                t = reader.get(key)
                if to_name(t.dtype) != dt or tuple(t.shape) != tuple(shape):
                    raise FormatError(f"stored tensor {key!r} is {to_name(t.dtype)} {list(t.shape)}, expected {dt} {list(shape)}")
                fetched[key] = t
            shape = tuple(rec["shape"])
            for i, meta in enumerate(rec.get("components") or []):
                ctype = component_type(meta["type"])
                if ctype.needs_base:
                    continue
                fields = {k.rsplit("::", 1)[1].split(".", 1)[1]: t for k, t in fetched.items() if k.rsplit("::", 1)[1].split(".", 1)[0] == str(i)}
                blk = block_shape(shape, meta)
                part = ctype.decode(meta, fields, blk)
                if part.numel() != math.prod(blk):
                    raise FormatError(f"component {i} decodes to {part.numel()} values, its block holds {math.prod(blk)}")
            report.checked_tensors += 1
        except DeltahubError as e:
            report.problems.append(f"{name}: {e}")
    stray = sorted(set(reader.weight_map) - expected_keys)
    if stray:
        report.problems.append(f"{INDEX_NAME} lists {len(stray)} tensor(s) no record uses, e.g. {stray[0]!r}")
    if base is not None or check_base:
        try:
            base_ckpt = open_base(reader, base, base_revision, hub)
            report.problems += [f"base: {d}" for d in base_differences(reader, base_ckpt, limit=20)]
            report.base_checked = True
        except DeltahubError as e:
            report.problems.append(f"base: {e}")
    report.ok = not report.problems
    return report



