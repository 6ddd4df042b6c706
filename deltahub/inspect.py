"""``deltahub info`` and ``deltahub verify``: what a delta holds, and whether it is intact."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DeltahubError, FormatError
from .format import CONFIG_NAME, INDEX_NAME
from .format.config import fingerprint, read_config
from .format.limits import confined_file
from .format.records import check_components, dense_nbytes, describe_record, record_layout, record_nbytes, validate_record
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
        cfg_path = confined_file(path, CONFIG_NAME, f"{path}: {CONFIG_NAME}")
        if not cfg_path.is_file():
            raise FormatError(f"{path} has no {CONFIG_NAME}: it is not a deltahub delta repo")
        return read_config(cfg_path, str(cfg_path))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        local = hf_hub_download(str(delta), CONFIG_NAME, revision=revision, **hub.kwargs())
    except EntryNotFoundError:
        raise FormatError(f"{delta} has no {CONFIG_NAME}: it is not a deltahub delta repo") from None
    except HfHubHTTPError as e:
        raise DeltahubError(f"cannot read {CONFIG_NAME} of {delta}: {e}") from None
    return read_config(local, f"{delta}/{CONFIG_NAME}")


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
    """Check integrity from the delta repo alone: every shard present (inside the repo) with its
    recorded SHA-256, every record well formed, every stored tensor where the index says with
    the dtype and shape the spec requires, every component decoding (a stretch at a time, never
    the record's full size) to finite values, at least one tensor in the decoded model, and the
    fine-tune's recorded fingerprint (when present) matching the records. With ``base`` (or
    ``check_base=True`` for the recorded one), also check that the base matches and that every
    base tensor has a record (spec §4).

    Example::

        report = deltahub.verify("my-delta", base="Qwen/Qwen2.5-0.5B")
        assert report.ok, report
    """
    hub = HubOptions(token, cache_dir, local_files_only)
    report = VerifyReport(ok=True)
    try:
        reader = open_delta(delta, revision, hub)
    except DeltahubError as e:
        return VerifyReport(False, 0, [str(e)])
    _check_shards(reader, report)
    expected_keys: set[str] = set()
    for name, rec in reader.records.items():
        try:
            validate_record(name, rec)
            layout = record_layout(name, rec)
            expected_keys.update(layout)
            with ExitStack() as borrowed:
                check_components(name, rec, lambda key: borrowed.enter_context(reader.borrow(key)))
            report.checked_tensors += 1
        except DeltahubError as e:
            report.problems.append(f"{name}: {e}")
    stray = sorted(set(reader.weight_map) - expected_keys)
    if stray:
        report.problems.append(f"{INDEX_NAME} lists {len(stray)} tensor(s) no record uses, e.g. {stray[0]!r}")
    if not report.problems:
        report.problems += _completeness(reader)
    if base is not None or check_base:
        try:
            base_ckpt = open_base(reader, base, base_revision, hub)
            report.problems += [f"base: {d}" for d in base_differences(reader, base_ckpt, limit=20)]
            missing = [n for n in base_ckpt.names() if n not in reader.records]
            if missing:
                report.problems.append(f"base: {len(missing)} base tensor(s) have no record in {CONFIG_NAME}, e.g. {missing[0]!r} (spec §4: every base tensor has one); the delta is incomplete or was edited")
            report.base_checked = True
        except DeltahubError as e:
            report.problems.append(f"base: {e}")
    report.ok = not report.problems
    return report


def _check_shards(reader, report: VerifyReport) -> None:
    """Every shard the index names exists inside the repo and has its recorded SHA-256."""
    checksums = reader.checksums()
    for shard in sorted(set(reader.weight_map.values())):
        try:
            path = reader.shard_path(shard)
        except DeltahubError as e:
            report.problems.append(str(e))
            continue
        if not path.is_file():
            report.problems.append(f"shard {shard} is missing")
            continue
        if shard in checksums and sha256_file(path) != checksums[shard]:
            report.problems.append(f"shard {shard} does not match its SHA-256 in {INDEX_NAME}: it is corrupted")


def _completeness(reader) -> list[str]:
    """The decoded model holds at least one tensor, and the records match the fine-tune's
    recorded fingerprint (``finetuned.fingerprint``, over the non-removed records' name, dtype
    and shape, spec §4.1) when the config has one: a truncated or edited tensors map is caught."""
    kept = [(n, r["dtype"], tuple(r["shape"])) for n, r in reader.records.items() if r["kind"] != "removed"]
    if not kept:
        return [f"{CONFIG_NAME} lists no tensor of the fine-tune ({len(reader.records)} record(s), none decodes to a tensor); the delta is empty or truncated"]
    recorded = (reader.config.get("finetuned") or {}).get("fingerprint")
    if recorded is not None and recorded != fingerprint(kept):
        return [f"{CONFIG_NAME}: the records' names, dtypes and shapes do not match finetuned.fingerprint {recorded[:20]}...; the tensors map was truncated or edited"]
    return []
