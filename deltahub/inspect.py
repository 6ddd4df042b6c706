"""``deltahub info`` and ``deltahub verify``: what a delta holds, and whether it is intact."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .format.components.lowrank import CODED_FEATURE
from .format.repo import has_coded_segment
from .errors import DeltahubError, FormatError
from .format import CONFIG_NAME, INDEX_NAME
from .format.config import SHARD_NAME, is_repo_file, read_config
from .format.limits import confined_file
from .format.records import check_components, dense_nbytes, describe_record, record_layout, record_nbytes, validate_record
from .format.repo import sha256_file
from .sources import HubOptions, base_differences, completeness_problems, open_base, open_delta, repo_file


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
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    text = str(delta)
    if path.exists() or text.count("/") > 1 or text.startswith((".", "/", "~")):
        # A path, not a Hub id: say so instead of passing it to the Hub's id validation.
        raise FormatError(f"{delta} is not a folder (and not a Hub repo id like 'user/my-delta'); check the path")
    try:
        local = hf_hub_download(text, CONFIG_NAME, revision=revision, **hub.kwargs())
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class: nothing was answered
        from huggingface_hub import constants

        why = "downloads are off" if hub.local_files_only or constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise DeltahubError(f"{delta} is not a local folder, and as a Hub id it is not in the cache and {why}; check the path or name, or the network") from None
    except EntryNotFoundError:
        raise FormatError(f"{delta} has no {CONFIG_NAME}: it is not a deltahub delta repo") from None
    except HFValidationError:
        raise FormatError(f"{delta} is neither a folder nor a Hub repo id like 'user/my-delta'") from None
    except RepositoryNotFoundError:
        raise DeltahubError(f"{delta} is not a local folder and no Hub repo of that name is visible (check the name, or log in for private repos)") from None
    except HfHubHTTPError as e:
        raise DeltahubError(f"cannot read {CONFIG_NAME} of {delta}: {str(e).splitlines()[0]}") from None
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
    decoded: bool = False  # every tensor decoded and equal to its record's digest (verify(decode=True))

    def __str__(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.checked_tensors} tensors checked" + (", base matches" if self.base_checked and self.ok else "")
        head += ", every tensor decoded to its recorded digest" if self.decoded and self.ok else ""
        return "\n".join([head] + [f"- {p}" for p in self.problems])


def verify(
    delta: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    check_base: bool = False,
    decode: bool = False,
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
    base tensor has a record (spec §4). For a version stored against its parent (spec §4.4),
    checking the base opens the chain down to its keyframe and checks each parent's weights
    digest. ``decode=True`` (CLI: ``--decode``) also decodes every tensor against the base (or
    parent) and compares its bits with the record's ``sha256``: the full check that the repo
    rebuilds exactly the weights it was made from.

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
    reader.check_shards = False  # verify hashes every shard itself and reports each problem
    _check_repo_files(reader, report)
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
    coded = [n for n, r in reader.records.items() if isinstance(r, dict) and has_coded_segment(r)]
    if coded and CODED_FEATURE not in (reader.config.get("requires") or []):
        report.problems.append(
            f"{CONFIG_NAME}: tensor {coded[0]!r} (and {len(coded) - 1} more) holds coded codes but 'requires' does not name "
            f"{CODED_FEATURE!r} (spec §6.3): a 1.0 or 1.1 reader would fail on it instead of naming the feature; the writer is non-conforming"
        )
    stray = sorted(set(reader.weight_map) - expected_keys)
    if stray:
        report.problems.append(f"{INDEX_NAME} lists {len(stray)} tensor(s) no record uses, e.g. {stray[0]!r}")
    if not report.problems:
        report.problems += _completeness(reader)
    chained = reader.config.get("parent") is not None
    if base is not None or check_base or decode or (chained and not report.problems):
        # A chain member is checked with its chain (each parent found and its digest matching),
        # and its keyframe's base when a base is to be checked: without them it is no model.
        try:
            base_ckpt = open_base(reader, base, base_revision, hub, verify=chained and (base is not None or check_base or decode))
            if not chained:  # a parent is checked by its weights digest as it opens
                report.problems += [f"base: {d}" for d in base_differences(reader, base_ckpt, limit=20)]
            missing = [n for n in base_ckpt.names() if n not in reader.records]
            if missing:
                report.problems.append(f"base: {len(missing)} base tensor(s) have no record in {CONFIG_NAME}, e.g. {missing[0]!r} (spec §4: every base tensor has one); the delta is incomplete or was edited")
            report.base_checked = base is not None or check_base or decode
            if decode and not report.problems:
                report.problems += _decode_problems(reader, base_ckpt)
                report.decoded = not report.problems
        except DeltahubError as e:
            if not any(p in str(e) for p in report.problems):  # the completeness check speaks once
                report.problems.append(f"{'chain' if chained else 'base'}: {e}")
    report.ok = not report.problems
    return report


def _decode_problems(reader, base_ckpt) -> list[str]:
    """Decode every tensor and compare its bits with its record's ``sha256`` (records without
    one, written before format 1.1, are decoded only)."""
    from .chain import tensor_sha256
    from .sources import decode_checked

    problems = []
    for name, rec in reader.records.items():
        if rec["kind"] == "removed":
            continue
        t = decode_checked(reader, base_ckpt, name)
        if "sha256" in rec and tensor_sha256(t) != rec["sha256"]:
            problems.append(f"{name}: decodes to other bits than its record's sha256; the delta or its base is corrupted")
        del t
    return problems


def _check_repo_files(reader, report: VerifyReport) -> None:
    """Every file of the repo's (FORMAT.md §3.1) at its top level is a regular file inside it:
    a FIFO or a folder named ``tokenizer.json`` would be skipped by a reader, or block it."""
    try:
        entries = sorted(os.listdir(reader.path))
    except OSError as e:
        report.problems.append(f"{reader.path} cannot be listed ({e.strerror or e})")
        return
    for name in entries:
        if is_repo_file(name) and not SHARD_NAME.match(name):  # shards: _check_shards
            try:
                repo_file(reader.path, name, "the delta repo")
            except DeltahubError as e:
                report.problems.append(str(e))


def _check_shards(reader, report: VerifyReport) -> None:
    """Every shard the index names exists inside the repo as a regular file, and has its
    recorded SHA-256. The cheap checks come first, so that a hostile file costs no hashing: each
    shard's header is read and its tensors must tile the file to its last byte
    (``MappedSafetensors``, which fails at once on a shard extended to 100 GB), and the shards'
    sizes must add up to the index's ``metadata.total_size`` (FORMAT.md §3.2) when it has one. A
    shard that fails them is not hashed (none is, when the total differs). Hashing then costs
    what the headers declare, which the records' layouts check next."""
    checksums = reader.checksums()
    sizes: dict[str, int] = {}
    for shard in sorted(set(reader.weight_map.values())):
        try:
            path = repo_file(reader.path, shard, f"{INDEX_NAME} entry")
            if path is None:
                report.problems.append(f"shard {shard} is missing")
                continue
            reader._handle(shard)  # the header, typed, its tensors tiling the file to its end
        except DeltahubError as e:
            report.problems.append(str(e))
            continue
        sizes[shard] = os.stat(path).st_size
    total = (reader.index.get("metadata") or {}).get("total_size")
    if isinstance(total, int) and not isinstance(total, bool) and sizes and len(sizes) == len(set(reader.weight_map.values())) and sum(sizes.values()) != total:
        report.problems.append(f"the shards hold {sum(sizes.values())} bytes, but {INDEX_NAME} says metadata.total_size {total}; the delta is corrupted, download it again")
        return
    for shard in sizes:
        if shard in checksums and sha256_file(reader.shard_path(shard)) != checksums[shard]:
            report.problems.append(f"shard {shard} does not match its SHA-256 in {INDEX_NAME}: it is corrupted")


def _completeness(reader) -> list[str]:
    """:func:`sources.completeness_problems`: at least one tensor, and the fine-tune's
    fingerprint when recorded (``apply`` and the loaders refuse what this reports)."""
    return completeness_problems(reader)
