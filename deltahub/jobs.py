"""Many compressions at once: ``deltahub compress-many JOBS`` / :func:`compress_many`.

A job file is JSON or YAML: a list of rows (or ``{"jobs": [...]}``), each with ``base``,
``finetuned`` and ``out``, and optionally ``method``, ``ratio`` (a number, ``"1/16"`` or
``"natural"``), ``params``, ``rules``, ``seed``, ``revision``, ``base_revision``, ``base_id``,
``overwrite``. A string in ``params`` reads as it would after ``-p`` on the command line
(``"1/4"``, ``"true"``, ``"8"``), and every job's method, params and rules are checked before the
first job runs::

    - {base: HuggingFaceTB/SmolLM2-135M, finetuned: org/sft-a, out: deltas/sft-a, ratio: 1/16}
    - {base: HuggingFaceTB/SmolLM2-135M, finetuned: org/sft-b, out: deltas/sft-b, method: dqrelo}

Each job writes its repo atomically, as ``compress`` does; a job that fails is reported and the
others go on. With ``executor="ray"`` the jobs run side by side on the cluster, their tensors
sharing its workers; locally they run one after another.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import DeltahubError
from .format.limits import read_json
from .policy import Rule, parse_value

# A job file larger than this is not a job list (1 MiB holds thousands of rows).
MAX_JOB_FILE_BYTES = 1 << 20
MAX_JOBS = 10_000
FIELDS = {"base", "finetuned", "out", "method", "ratio", "params", "rules", "seed", "revision", "base_revision", "base_id", "overwrite"}


class JobFileError(DeltahubError, ValueError):
    """A job file that cannot be read as a list of compress jobs."""


@dataclass
class Job:
    """One row of a job file: the arguments of one :func:`deltahub.compress` call."""

    base: str
    finetuned: str
    out: str
    method: str | None = None
    ratio: float | None = 1 / 8
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    seed: int = 0
    revision: str | None = None
    base_revision: str | None = None
    base_id: str | None = None
    overwrite: bool = False


@dataclass
class JobOutcome:
    """How one job went: its result, or the error that stopped it."""

    job: Job
    ok: bool
    seconds: float
    ratio: float | None = None
    stored_bytes: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"out": self.job.out, "base": self.job.base, "finetuned": self.job.finetuned, "method": self.job.method or "auto", "ok": self.ok, "seconds": round(self.seconds, 2), "ratio": self.ratio,
                "stored_bytes": self.stored_bytes, "error": self.error}


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of a JSON or YAML job file, every field checked (a :class:`JobFileError` names
    the row and field)."""
    path = Path(path)
    where = str(path)
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise JobFileError(f"{where} is not a regular file; give a JSON or YAML job file")
    except OSError as e:
        raise JobFileError(f"{where} cannot be read ({e.strerror or e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_JOB_FILE_BYTES + 1)
            if len(raw) > MAX_JOB_FILE_BYTES:
                raise JobFileError(f"{where}: over the {MAX_JOB_FILE_BYTES} bytes a job file may have")
            data = yaml.load(raw.decode("utf-8"), Loader=_unique_key_loader())
        except RecursionError:
            raise JobFileError(f"{where}: YAML nested too deep to be a job file") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise JobFileError(f"{where}: not a readable YAML job file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    else:
        data = read_json(path, where, max_bytes=MAX_JOB_FILE_BYTES)
    rows = data.get("jobs") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise JobFileError(f"{where}: a job file holds a non-empty list of jobs (or {{\"jobs\": [...]}}), each with base, finetuned and out")
    if len(rows) > MAX_JOBS:
        raise JobFileError(f"{where}: {len(rows)} jobs, over the {MAX_JOBS} one file may hold; split it")
    return [_job(row, f"{where}: job {i + 1}") for i, row in enumerate(rows)]


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last silently,
    so a row with two ``out`` keys would write where its author did not look)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=True) for k, _ in node.value]
            for i, key in enumerate(keys):
                if key in keys[:i]:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {str(key)[:80]!r} appears twice in one mapping", node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _job(row: Any, where: str) -> Job:
    if not isinstance(row, dict):
        raise JobFileError(f"{where} must be a mapping with base, finetuned and out, got {type(row).__name__}")
    unknown = sorted(set(map(str, row)) - FIELDS)
    if unknown:
        raise JobFileError(f"{where}: unknown field(s) {unknown}; a job takes {sorted(FIELDS)}")
    for key in ("base", "finetuned", "out"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise JobFileError(f"{where}: '{key}' must be a non-empty string (a folder or Hub id)")
    for key in ("method", "revision", "base_revision", "base_id"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise JobFileError(f"{where}: '{key}' must be a string")
    ratio = row.get("ratio", 1 / 8)
    if isinstance(ratio, str):
        ratio = None if ratio.strip().lower() in ("natural", "none") else parse_value(ratio)
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise JobFileError(f"{where}: 'ratio' must be a number in (0, 1], a fraction like 1/16, or natural; got {row.get('ratio')!r}")
    for key in ("base", "finetuned", "out"):
        if "\x00" in row[key]:
            raise JobFileError(f"{where}: '{key}' holds a NUL character; the file is corrupted or hostile")
    params = row.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise JobFileError(f"{where}: 'params' must be a mapping of parameter names to values")
    for key, value in params.items():
        if value is not None and not isinstance(value, (bool, int, float, str)) or (isinstance(value, (int, str)) and len(str(value)) > 200):
            raise JobFileError(f"{where}: params.{key[:40]} must be a number, true/false, null or a short string")
    rules = row.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise JobFileError(f"{where}: 'rules' must be a list of PATTERN=METHOD[:k=v,...] strings")
    seed = row.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise JobFileError(f"{where}: 'seed' must be a non-negative integer")
    if not isinstance(row.get("overwrite", False), bool):
        raise JobFileError(f"{where}: 'overwrite' must be true or false")
    # String values read as on the command line (-p noise_weight=1/10): "1/10", "true", "4".
    params = {k: parse_value(v) if isinstance(v, str) else v for k, v in params.items()}
    return Job(row["base"], row["finetuned"], row["out"], row.get("method"), ratio, params, list(rules), seed, row.get("revision"),
               row.get("base_revision"), row.get("base_id"), row.get("overwrite", False))


def compress_many(
    jobs: Iterable[Job | Mapping[str, Any]] | str | os.PathLike,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    max_parallel: int = 4,
    progress: bool = True,
) -> list[JobOutcome]:
    """Run every job (a job file's path, or rows as :class:`Job` or dicts); a failed job does not
    stop the others. ``executor="ray"``: up to ``max_parallel`` jobs at once on one cluster.

    Example::

        outcomes = deltahub.compress_many("jobs.yaml", executor="ray")
        failed = [o for o in outcomes if not o.ok]
    """
    from .compress import compress

    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if isinstance(jobs, (str, os.PathLike)):
        todo = read_jobs(jobs)
    else:
        todo = [j if isinstance(j, Job) else _job(dict(j), f"job {i + 1}") for i, j in enumerate(jobs)]
    from .methods import get_method

    for k, job in enumerate(todo):  # a typo in the last job is found before the first one runs
        try:
            get_method(job.method or "auto", **job.params)
            for rule in job.rules:
                Rule.parse(rule)
        except (DeltahubError, ValueError, TypeError, KeyError) as e:
            raise JobFileError(f"job {k + 1} ({job.out}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    outs = [Path(j.out).resolve() for j in todo]
    for k, out in enumerate(outs):
        for i, other in enumerate(outs[:k]):
            if out == other or out in other.parents or other in out.parents:
                raise JobFileError(f"jobs {i + 1} and {k + 1} write {todo[i].out} and {todo[k].out}, the same folder or one inside the other: give each its own 'out'")
    # Jobs run side by side: no job may write where another reads (each compress checks its own inputs).
    # Inputs that do not exist yet count too: a job reading another's output would race it (and
    # a Hub id spelled like a job's output folder would be read from that folder).
    inputs = [(i, Path(p).resolve()) for i, j in enumerate(todo) for p in (j.base, j.finetuned)]
    for k, out in enumerate(outs):
        for i, src in inputs:
            if i != k and (out == src or out in src.parents or src in out.parents):
                raise JobFileError(f"job {k + 1} writes {todo[k].out}, where job {i + 1} reads {src}: give it another 'out'")

    def run(job: Job) -> JobOutcome:
        t0 = time.perf_counter()
        try:
            result = compress(job.base, job.finetuned, job.out, job.method, job.ratio, params=job.params, rules=job.rules, seed=job.seed,
                              revision=job.revision, base_revision=job.base_revision, base_id=job.base_id, overwrite=job.overwrite,
                              executor=executor, ray_address=ray_address, progress=progress and executor == "local")
        except (DeltahubError, OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # one job's failure, reported
            return JobOutcome(job, False, time.perf_counter() - t0, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return JobOutcome(job, True, time.perf_counter() - t0, result.ratio, result.stored_bytes)

    if executor == "local":
        return [run(job) for job in todo]
    from .distributed import STOP, ray_session

    STOP.clear()
    try:
        with ray_session(ray_address), ThreadPoolExecutor(max(1, max_parallel)) as pool:
            futures = [pool.submit(run, job) for job in todo]
            try:
                return [f.result() for f in futures]
            except BaseException:  # Ctrl-C or SIGTERM here: every running job stops and removes its partial output
                STOP.set()
                for f in futures:
                    f.cancel()
                raise
    finally:
        STOP.clear()  # the jobs have stopped: later runs of this process go on
