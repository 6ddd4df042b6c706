"""The ``deltahub`` command line: a thin typer layer over deltahub's public API.

No error prints a traceback unless ``--debug`` is given; each prints one line ``Error: ...`` on
stderr. Exit statuses:

- 0: success.
- 1: an error in the input or the environment (any ``DeltahubError``: malformed delta, wrong
  base, output refused...; ``OSError`` such as a missing file or a full disk; ``ValueError``),
  or ``verify`` found a problem.
- 2: the command line itself is wrong (unknown option, bad value: typer's usage errors).
- 3: an internal error, i.e. a bug in deltahub: the line names the exception; rerun with
  ``--debug`` for the traceback and report it.
- 130: interrupted (Ctrl-C); 143: terminated (SIGTERM). An output being written is removed.

The output contract (scripts rely on it):

- stdout carries the command's result, stderr everything else (progress bars, notes, errors).
- Piped or redirected, stdout is plain text: lines are never wrapped or cut, tables are plain
  columns with a header line, whole names and full commit ids, no colour. On a terminal, tables
  are rich tables that fold long cells instead of cutting them.
- ``--json`` (every command that reports something) prints one JSON document on stdout and
  nothing else; NaN and infinities are written as null. ``pull`` prints the path alone.
- ``--quiet``/``-q`` (before the command): no progress bars, no informational lines, no
  transformers/huggingface_hub log messages; errors still go to stderr; stdout is unchanged.
- Only deltahub's own progress bars are drawn (transformers' "Loading weights" and
  huggingface_hub's "Fetching N files" are silenced); ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides
  deltahub's as well.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import math
import os
import re
import warnings
import signal
import sys
from pathlib import Path
from typing import List, Optional

EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143

try:  # importing torch takes seconds: a Ctrl-C then must not print a traceback either
    import typer
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    import deltahub
    from deltahub.card import human_bytes
    from deltahub.policy import parse_value
    from deltahub.progress import quiet_third_party
except KeyboardInterrupt:
    sys.stderr.write("Error: interrupted\n")
    sys.exit(EXIT_INTERRUPTED)
except Exception as e:  # a broken installation
    if "--debug" in sys.argv:
        raise
    sys.stderr.write(f"Error: deltahub cannot start ({type(e).__name__}: {e}); rerun with --debug for the traceback\n")
    sys.exit(EXIT_INTERNAL)

EPILOG = (
    "Exit status: 0 ok; 1 error in the input or environment (and verify found a problem); 2 wrong command line; "
    "3 internal error (a bug: rerun with --debug); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). "
    "Output: results on stdout (plain text when piped, one JSON document with --json), progress and messages on stderr; "
    "HF_HUB_DISABLE_PROGRESS_BARS=1 hides every progress bar."
)

app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False, help="Store, share and load fine-tuned models as compressed deltas.",
    epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]},
)
# Markup off: what is printed comes from files, the Hub and commit messages, and a "[/x]" in a
# commit message must print as itself, not be read as rich markup (or crash the command).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
_state = {"debug": False, "quiet": False}

TOKEN_HELP = "Hub token (default: HF_TOKEN or the saved login). Never printed."


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"deltahub {deltahub.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, no informational lines (errors still go to stderr)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """deltahub: compressed, versioned deltas of fine-tuned models."""
    _state["debug"] = debug
    _state["quiet"] = quiet
    if quiet:
        _silence_all()


def _silence_all() -> None:
    """--quiet: every progress bar (deltahub's included) and the libraries' log lines off for
    this process."""
    import logging
    import warnings

    from huggingface_hub.utils import disable_progress_bars

    # transformers is imported later, lazily: it reads its verbosity from this variable and its
    # progress switch from huggingface_hub's at import.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS=0 overrides us, with a warning
        disable_progress_bars()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if "transformers.utils.logging" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()


def _progress() -> bool:
    """Whether deltahub's own progress bars are wanted (not with --quiet)."""
    return not _state["quiet"]


# Errors a user can cause and fix (exit 1); any other exception is a bug (exit 3).
EXPECTED_ERRORS = (deltahub.DeltahubError, OSError, ValueError)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that writers remove their partial output (they
    clean up on any BaseException) before the process exits with 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _close_progress_bars() -> None:
    # A bar left open by the failed call would share the error's line and be drawn again after
    # it when garbage-collected; closed now, it ends its own line first.
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _say(message: str) -> None:
    """One line on stderr: ``Error: message`` (newlines in the message folded, no markup parsed)."""
    _close_progress_bars()
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    # Messages may quote text from files or other libraries (a model_type with a NUL, a list of
    # every architecture): control characters become spaces, and the line stops at a length a
    # terminal shows.
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    err_console.print(Text.assemble(("Error:", "red"), " ", text), highlight=False, soft_wrap=True)


MAX_ERROR_CHARS = 2000


def _warn(caught: list) -> list[str]:
    """deltahub's warnings (e.g. a base id recorded without the Hub's check) as one
    ``Warning: ...`` line each on stderr; returned for --json."""
    lines = [str(w.message) for w in caught if issubclass(w.category, deltahub.BaseIdNotCheckedWarning)]
    for line in lines:
        err_console.print(Text.assemble(("Warning:", "yellow"), " ", re.sub(r"[\x00-\x1f\x7f]", " ", line)), highlight=False, soft_wrap=True)
    return lines


def _report(e: BaseException) -> int:
    """Print the one line for ``e`` and return its exit status (see the module docstring)."""
    if isinstance(e, Terminated):
        _say("terminated (SIGTERM); no unfinished output is left behind")
        return EXIT_TERMINATED
    if isinstance(e, KeyboardInterrupt):
        _say("interrupted; no unfinished output is left behind")
        return EXIT_INTERRUPTED
    if isinstance(e, EXPECTED_ERRORS):
        _say(str(e) or type(e).__name__)
        return EXIT_ERROR
    _say(f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback and report it")
    return EXIT_INTERNAL


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        raise e
    raise typer.Exit(_report(e))


def _run(fn, *args, **kwargs):
    """Call deltahub: errors become one line and an exit status, and only deltahub's progress
    bars are drawn (transformers' and huggingface_hub's are silenced for the call)."""
    try:
        with quiet_third_party():
            return fn(*args, **kwargs)
    except (Exception, KeyboardInterrupt, Terminated) as e:
        _fail(e)


# ------------------------------------------------------------------ output


def _clean(text: object) -> str:
    """Text from the Hub or a file as one table cell or line: control characters (line breaks,
    terminal escapes) become spaces."""
    return re.sub("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]", " ", str(text))


def _plain() -> bool:
    """True when stdout is not a terminal (a pipe, a file, ``$(...)``): print plain text."""
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return True


def _echo(line: str = "") -> None:
    """A line of the result on stdout, as is: never wrapped, cut, styled or parsed as markup."""
    typer.echo(line)


def _note(line: str) -> None:
    """An informational line on stderr (none with --quiet)."""
    if not _state["quiet"]:
        typer.echo(line, err=True)


def _table(columns: list[str], rows: list[list[str]], title: str | None = None, right: tuple[str, ...] = ()) -> None:
    """A table on stdout. Piped: an optional title line, then plain columns separated by two
    spaces, header first, every cell whole. On a terminal: a rich table whose long cells fold."""
    rows = [[_clean(cell) for cell in row] for row in rows]
    if _plain():
        if title:
            _echo(_clean(title))
        widths = [max([len(col)] + [len(row[i]) for row in rows]) for i, col in enumerate(columns)]
        for row in [columns, *rows]:
            cells = [cell.rjust(w) if col in right else cell.ljust(w) for col, cell, w in zip(columns, row, widths)]
            _echo("  ".join(cells).rstrip())
        return
    table = Table(title=_clean(title) if title else None)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


def _jsonable(obj: object) -> object:
    """``obj`` as JSON values: dataclasses as dicts of their fields and public properties, paths
    as strings, datetimes in ISO 8601, NaN and infinities as None (JSON has no such numbers)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name in dir(type(obj)):
            if not name.startswith("_") and isinstance(getattr(type(obj), name), property):
                out[name] = _jsonable(getattr(obj, name))
        return out
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value)
    return str(obj)  # Path, torch.dtype, ...


def _print_json(obj: object) -> None:
    """The one JSON document of a --json command, on stdout."""
    typer.echo(json.dumps(_jsonable(obj), indent=2, allow_nan=False))


JSON_HELP = "Print one JSON document on stdout (and nothing else)."
RAY_HELP = "Run the per-tensor work as Ray tasks (pip install 'deltahub\\[ray]'): on RAY_ADDRESS's cluster, or a new local one. Same output, byte for byte."
RAY_ADDRESS_HELP = ("The Ray cluster to run on: HEAD:6379, auto (the one `ray start` started on this machine), local (a new one), or "
                    "ray://HEAD:10001 (that one needs pip install 'ray\\[client]'); implies --ray. Default: RAY_ADDRESS, else local.")


def _ratio(text: str | None) -> float | None:
    """Accept ``1/8``, ``0.125``, or ``none``/``natural`` (the method's natural size)."""
    if text is None or text.lower() in ("none", "natural"):
        return None
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise typer.BadParameter(f"{text!r} is not a ratio; write it as 1/8 or 0.125") from None


def _params(items: List[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise typer.BadParameter(f"--param {item!r} must be key=value, e.g. --param rank=64")
        out[key] = parse_value(value)
    return out


@app.command()
def compress(
    base: str = typer.Argument(..., help="Base model: local folder or Hub id."),
    finetuned: str = typer.Argument(..., help="Fine-tuned model: local folder or Hub id."),
    out: Path = typer.Argument(..., help="Folder to write the delta repo to."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=f"One of: {', '.join(deltahub.list_methods())}. Default: auto (lossless with --parent).", show_default=False),
    ratio: Optional[str] = typer.Option(None, "--ratio", "-r", help="Target stored bytes / dense delta bytes of the whole repo, e.g. 1/8 (an unreachable target is an error naming the smallest reachable one); 'natural' (or 'none') for the method's natural size. Default: 1/8 (natural with --parent).", show_default=False),
    param: List[str] = typer.Option([], "--param", "-p", help="Method parameter key=value (repeatable), e.g. rank=64; auto takes lora=true (every matrix low rank, for export-lora), max_rank=N and noise_weight=W (0 < W <= 1; lower: more singular vectors at fewer bits). `deltahub methods` lists each method's parameters."),
    rule: List[str] = typer.Option([], "--rule", help="PATTERN=METHOD[:k=v,...] for matching tensor names (repeatable), e.g. '*.mlp.*=svd:rank=64'."),
    device: str = typer.Option("cpu", help="Where SVDs run: cpu or cuda."),
    revision: Optional[str] = typer.Option(None, help="Revision of the fine-tune (Hub)."),
    base_revision: Optional[str] = typer.Option(None, help="Revision of the base (Hub)."),
    seed: int = typer.Option(0, help="Global seed of the random masks and rounding (auto, dare, deltadq)."),
    max_shard_size: str = typer.Option("5GB", help="Largest shard, e.g. 5GB or 500MB."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    cache_dir: Optional[Path] = typer.Option(None, help="Hugging Face cache folder."),
    calibration: Optional[Path] = typer.Option(None, help="Plain-text file (the fine-tune's own training text): auto measures errors on the base's activations over it (loads the base model once). Keeps a skill or style better, learned facts worse."),
    calibration_tokens: int = typer.Option(2048, help="Tokens of the calibration text to use (the file is read no further than 64 bytes a token)."),
    base_id: Optional[str] = typer.Option(None, "--base-id", help="Record this Hub id (ORG/NAME or ORG/NAME@REV) as the base of a local base folder. Checked against the Hub's safetensors headers (no weights downloaded) where it answers; offline it is recorded unchecked (base.id_checked false). A base given as a Hugging Face cache snapshot is recorded as its repo id and commit without this."),
    parent: Optional[str] = typer.Option(None, "--parent", help="Store FINETUNED against this version (a delta folder, or a Hub repo id at --parent-revision) instead of BASE: bit-exact (lossless), and small when the two are a few training steps apart. BASE is then the base of the chain's keyframe."),
    parent_revision: Optional[str] = typer.Option(None, help="Revision (commit or tag) of a --parent on the Hub."),
    ray: bool = typer.Option(False, "--ray", help=RAY_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Compress FINETUNED - BASE into a delta repo at OUT.

    Example: deltahub compress Qwen/Qwen2.5-0.5B Qwen/Qwen2.5-0.5B-Instruct qwen-delta --ratio 1/8
    """
    method = method or ("lossless" if parent else "auto")
    if ratio is not None and ratio.strip().lower() not in ("natural", "none") and method in deltahub.list_methods() and not deltahub.get_method(method).takes_ratio:
        raise typer.BadParameter(f"{method} has only its natural size, so a target ratio ({ratio}) cannot apply; drop --ratio (or pass --ratio natural)", param_hint="--ratio")
    ratio = ratio or ("natural" if parent else "1/8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", deltahub.BaseIdNotCheckedWarning)
        result = _run(
            deltahub.compress, base, finetuned, out, method, _ratio(ratio), params=_params(param), rules=rule, seed=seed, device=device,
            revision=revision, base_revision=base_revision, token=token, cache_dir=cache_dir, max_shard_size=max_shard_size, overwrite=overwrite,
            calibration=calibration, calibration_tokens=calibration_tokens, progress=_progress(), base_id=base_id, parent=parent,
            parent_revision=parent_revision, executor="ray" if ray or ray_address is not None else "local", ray_address=ray_address,
        )
    warned = _warn(caught)
    if as_json:
        _print_json({**_jsonable(result), "warnings": warned})
        return
    _echo(str(result))
    if result.fallbacks:
        more = f" and {len(result.fallbacks) - 5} more" if len(result.fallbacks) > 5 else ""
        _echo(f"{len(result.fallbacks)} tensor(s) stored dense, where dense is smaller than the method's smallest record: {', '.join(result.fallbacks[:5])}{more}")


@app.command("compress-many")
def compress_many(
    jobs: Path = typer.Argument(..., help="A JSON or YAML list of jobs: base, finetuned, out, and optionally method, ratio, params, rules, seed, revision, base_revision, base_id, overwrite."),
    ray: bool = typer.Option(False, "--ray", help="Run the jobs side by side on a Ray cluster (RAY_ADDRESS's, or a new local one); without it, one after another here."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP, show_default=False),
    max_parallel: int = typer.Option(4, min=1, help="Jobs at once on the Ray cluster."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Compress many pairs; a failed job does not stop the others (exit 1 if any failed).

    Example: deltahub compress-many jobs.yaml --ray
    """
    outcomes = _run(deltahub.compress_many, jobs, executor="ray" if ray or ray_address is not None else "local", ray_address=ray_address,
                    max_parallel=max_parallel, progress=_progress())
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        _print_json({"jobs": [o.to_dict() for o in outcomes], "failed": len(failed)})
    else:
        rows = [[o.job.out, "ok" if o.ok else "failed", f"{o.ratio:.4f}" if o.ratio is not None else "", human_bytes(o.stored_bytes) if o.stored_bytes else "",
                 f"{o.seconds:.1f}", o.error or ""] for o in outcomes]
        _table(["out", "status", "ratio", "stored", "seconds", "error"], rows, title=f"{len(outcomes) - len(failed)} of {len(outcomes)} jobs done",
               right=("ratio", "stored", "seconds"))
    if failed:
        raise typer.Exit(1)


@app.command()
def apply(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the full checkpoint."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the one recorded in the delta)."),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta (tag, branch or commit)."),
    base_revision: Optional[str] = typer.Option(None, help="Revision of the base."),
    verify_base: bool = typer.Option(True, help="Refuse a base that differs from the recorded one."),
    max_shard_size: str = typer.Option("5GB", help="Largest shard of the output."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write the full fine-tuned checkpoint (base + delta) for transformers or vLLM.

    Example: deltahub apply user/qwen-delta -o qwen-instruct
    """
    path = _run(deltahub.apply, delta, out, base, revision=revision, base_revision=base_revision, verify_base=verify_base, max_shard_size=max_shard_size, overwrite=overwrite, token=token, progress=_progress())
    if as_json:
        _print_json({"path": path, "delta": delta, "revision": revision})
        return
    _echo(f"wrote {path}")


@app.command()
def info(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id (only delta_config.json is read)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Show what a delta holds: base, method, ratio, sizes and, with --tensors, each tensor.

    Example: deltahub info user/qwen-delta --tensors
    """
    result = _run(deltahub.info, delta, revision=revision, token=token)
    if as_json:
        _print_json(result.to_dict(with_tensors=tensors))
        return
    cfg = result.config
    base, method, totals, summary = cfg.get("base", {}), cfg.get("method", {}), cfg.get("totals", {}), cfg.get("summary", {})
    _echo(_clean(f"{delta}  deltahub format {cfg['format_version']}"))
    _echo(_clean(f"base:    {base.get('name_or_path')}" + (f" @ {base['revision']}" if base.get("revision") else "")))
    parent = cfg.get("parent")
    if isinstance(parent, dict):
        at = f" @ {parent['revision']}" if parent.get("revision") else ""
        _echo(_clean(f"parent:  {parent.get('name_or_path')}{at} (stored against it, lossless; {parent.get('depth')} version(s) down to its keyframe)"))
    _echo(_clean(f"method:  {method.get('name')}  ratio {method.get('ratio')}  params {method.get('params')}"))
    if totals.get("stored_bytes"):
        _echo(f"size:    {human_bytes(totals['stored_bytes'])} stored for {human_bytes(totals['dense_bytes'])} dense: ratio {totals['ratio']:.4f}")
    if summary.get("mean_rel_error") is not None:
        _echo(f"error:   mean {summary['mean_rel_error']:.4f}, worst {summary['max_rel_error']:.4f}")
    kinds: dict[str, int] = {}
    for t in result.tensors:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    _echo(_clean("tensors: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))))
    if tensors:
        rows = [[t.name, t.kind, t.method or "", "x".join(map(str, t.shape)), t.holds, human_bytes(t.stored_bytes), f"{t.ratio:.4f}"] for t in result.tensors]
        _table(["tensor", "kind", "method", "shape", "holds", "stored", "ratio"], rows, right=("stored", "ratio"))


@app.command()
def verify(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    base: Optional[str] = typer.Option(None, help="Also check this base against the recorded one."),
    check_base: bool = typer.Option(False, "--check-base", help="Also check the recorded base (for a version stored against its parent: the chain down to its keyframe)."),
    decode: bool = typer.Option(False, "--decode", help="Also decode every tensor and compare its bits with the digest its record holds (a full rebuild's work)."),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check a delta's integrity (shards, checksums, layouts, decoding) and, optionally, its base.

    Exits 1 when a problem is found (with --json too: the document says "ok": false).

    Example: deltahub verify qwen-delta --base Qwen/Qwen2.5-0.5B
    """
    report = _run(deltahub.verify, delta, base, check_base=check_base, decode=decode, revision=revision, token=token)
    if as_json:
        _print_json(report)
    else:
        for line in str(report).splitlines():
            _echo(_clean(line))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def push(
    delta: Path = typer.Argument(..., help="Local delta repo folder (from `deltahub compress`)."),
    repo: str = typer.Argument(..., help="Hub repo id, e.g. user/my-delta."),
    tag: Optional[str] = typer.Option(None, help="Version tag (default: the next vN)."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    private: bool = typer.Option(False, help="Create the repo private."),
    branch: Optional[str] = typer.Option(None, help="Branch to push to (default main)."),
    create_pr: bool = typer.Option(False, help="Open a pull request instead of committing to the branch."),
    allow_local_base: bool = typer.Option(False, "--allow-local-base", help="Push even though the delta's base is only a local folder (nobody who pulls it can load it). Better: record its Hub id with `deltahub set-base`."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Upload a delta as a new version: one commit, one tag; unchanged shards are not re-uploaded.

    Example: deltahub push qwen-delta user/qwen-delta -m "3 epochs, lr 1e-5"
    """
    from deltahub.hub import push as _push

    result = _run(_push, delta, repo, tag=tag, message=message, private=private or None, branch=branch, create_pr=create_pr, token=token, allow_local_base=allow_local_base)
    if as_json:
        _print_json(result)
        return
    _echo(_clean(str(result)))


@app.command()
def pull(
    repo: str = typer.Argument(..., help="Hub repo id."),
    revision: Optional[str] = typer.Option(None, help="Version: tag, branch or commit (default: the head)."),
    local_dir: Optional[Path] = typer.Option(None, help="Copy into this folder instead of only the Hugging Face cache."),
    no_base: bool = typer.Option(False, "--no-base", help="Do not download the base the version records (by default it goes into the cache, so the version loads offline)."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Download a version of a delta, its parents (for a version stored against one) and its base
    into the cache; then it loads offline (HF_HUB_OFFLINE=1).

    Prints the local path and nothing else, on one line: P=$(deltahub pull REPO --revision v2).

    Example: deltahub pull user/qwen-delta --revision v2
    """
    from deltahub.hub import pull as _pull

    path = _run(_pull, repo, revision=revision, local_dir=local_dir, token=token, base=not no_base)
    if as_json:
        _print_json({"repo": repo, "revision": revision, "path": path})
        return
    _echo(str(path))


@app.command()
def log(
    repo: str = typer.Argument(..., help="Hub repo id."),
    branch: str = typer.Option("main", help="Branch to list."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """List the versions of a delta repo, newest first, and what the history costs.

    Example: deltahub log user/qwen-delta
    """
    from deltahub.hub import history

    hist = _run(history, repo, branch=branch, token=token)
    # Unreadable versions (a malformed delta_config.json in history) are listed with the reason.
    versions = [v for v in hist.versions if v.method is not None or v.problem]
    if as_json:
        rows = [
            {"tags": v.tags, "commit": v.commit, "date": v.date, "message": v.message, "method": v.method, "ratio": v.ratio, "stored_bytes": v.stored_bytes,
             "dense_bytes": v.dense_bytes, "base": v.base, "base_fingerprint": v.base_fingerprint, "parent": v.parent,
             "parent_tags": _parent_tags(v, hist), "depth": v.depth, "problem": v.problem}
            for v in versions
        ]
        _print_json({"repo": repo, "branch": branch, "versions": rows, "history_bytes": hist.stored_bytes, "full_model_bytes": hist.full_model_bytes, "summary": hist.summary()})
        return
    # Piped: full commit ids (usable as --revision) and ISO dates; on a terminal, short ones.
    plain = _plain()
    rows = []
    for v in versions:
        commit = v.commit if plain else v.commit[:12]
        date = (v.date.isoformat() if plain else v.date.strftime("%Y-%m-%d %H:%M")) if v.date else ""
        tags = ", ".join(v.tags) or "-"
        if v.problem:
            rows.append([tags, commit, date, v.message, "unreadable", "", "", "", v.problem])
        else:
            parent = _parent_label(v, hist, plain)
            rows.append([tags, commit, date, v.message, v.method or "", f"{v.ratio:.4f}" if v.ratio else "", human_bytes(v.stored_bytes or 0), parent, v.base or ""])
    _table(["version", "commit", "date", "message", "method", "ratio", "stored", "parent", "base"], rows, title=f"{repo} ({branch})", right=("ratio", "stored"))
    _echo(_clean(hist.summary()))


def _parent_tags(v, hist) -> list[str] | None:
    """The tags of a version's parent when the parent is in this history (None otherwise)."""
    if v.parent is None:
        return None
    repo, _, commit = v.parent.partition("@")
    return next((p.tags for p in hist.versions if repo == hist.repo_id and p.commit == commit), None)


def _parent_label(v, hist, plain: bool) -> str:
    """What a version is stored against: "base" for a keyframe, else its parent's tag (or commit)
    when the parent is in this history, else the parent's REPO@COMMIT."""
    if v.parent is None:
        return "base"
    tags = _parent_tags(v, hist)
    repo, _, commit = v.parent.partition("@")
    if tags:
        return ", ".join(tags)
    if tags is not None:  # in this history, untagged
        return commit if plain else commit[:12]
    return v.parent if plain else v.parent[: len(repo) + 13]


@app.command()
def diff(
    a: str = typer.Argument(..., help="A: delta repo or model checkpoint; local folder, or Hub id (REPO or REPO@REV)."),
    b: str = typer.Argument(..., help="B: delta repo or model checkpoint; local folder, or Hub id (REPO or REPO@REV)."),
    revision_a: Optional[str] = typer.Option(None, "--revision-a", help="Revision of A (Hub): tag, branch or commit (or write A as REPO@REV)."),
    revision_b: Optional[str] = typer.Option(None, "--revision-b", help="Revision of B (Hub): tag, branch or commit (or write B as REPO@REV)."),
    base_a: Optional[str] = typer.Option(None, "--base-a", help="Base of delta A (default: the one recorded in it)."),
    base_b: Optional[str] = typer.Option(None, "--base-b", help="Base of delta B (default: the one recorded in it)."),
    verify_base: bool = typer.Option(True, help="Refuse a base that differs from the recorded one."),
    show_all: bool = typer.Option(False, "--all", help="List the identical tensors too."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Compare two decoded models (deltas or checkpoints): which tensors changed and by how much,
    which of B's files A already holds, and what B costs given A.

    Example: deltahub diff user/qwen-delta@v1 user/qwen-delta@v3
    """
    from deltahub.diff import diff as _diff

    report = _run(_diff, a, b, revision_a=revision_a, revision_b=revision_b, base_a=base_a, base_b=base_b, verify_base=verify_base, token=token, progress=_progress())
    if as_json:
        _print_json(report.to_dict())
        return
    _echo(_clean(f"A: {report.a}"))
    _echo(_clean(f"B: {report.b}"))

    def num(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    rows = [
        [t.name, {"only_a": "only-in-A", "only_b": "only-in-B"}.get(t.status, t.status), "x".join(map(str, t.shape_b or t.shape_a or [])),
         num(t.identical_share, ".4f"), num(t.rel_diff, ".4g"), num(t.max_abs_diff, ".4g"), human_bytes(t.delta_bytes)]
        for t in report.tensors if show_all or t.status != "identical"
    ]
    if rows:
        _table(["tensor", "status", "shape", "identical", "rel. diff", "max abs diff", "lossless delta"], rows, right=("identical", "rel. diff", "max abs diff", "lossless delta"))
    files = [[f.name, human_bytes(f.size), f.same_as or "-"] for f in report.files]
    _table(["file of B", "size", "same content in A"], files, right=("size",))
    for line in report.summary():
        _echo(_clean(line))


@app.command()
def rollback(
    repo: str = typer.Argument(..., help="Hub repo id."),
    to: str = typer.Option(..., "--to", help="Version to restore: tag or commit."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    force: bool = typer.Option(False, help="Roll back even to a version made against another base."),
    branch: str = typer.Option("main", help="Branch to roll back."),
    tag: Optional[str] = typer.Option(None, help="Tag of the new version (default: the next vN)."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Make the head equal to an earlier version with a new commit (server-side copies, no upload).

    Example: deltahub rollback user/qwen-delta --to v2
    """
    from deltahub.hub import rollback as _rollback

    result = _run(_rollback, repo, to, message=message, force=force, branch=branch, tag=tag, token=token)
    if as_json:
        _print_json({**_jsonable(result), "rolled_back_to": to})
        return
    _echo(_clean(f"rolled back {repo} to {to}: new head {result.commit[:12]} tagged {result.tag}"))


@app.command("set-base")
def set_base(
    delta: Path = typer.Argument(..., help="Local delta repo folder."),
    base_id: str = typer.Argument(..., help="The base's Hub id: ORG/NAME or ORG/NAME@REV."),
    no_check: bool = typer.Option(False, "--no-check", help="Record the id without comparing it with the Hub."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Record the Hub id of a delta's base without recompressing: rewrites delta_config.json
    (byte totals recounted) and README.md. Checked against the Hub's safetensors headers where it answers.

    Example: deltahub set-base qwen-delta Qwen/Qwen2.5-0.5B@main
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", deltahub.BaseIdNotCheckedWarning)
        result = _run(deltahub.set_base_id, delta, base_id, check=not no_check, token=token)
    warned = _warn(caught)
    if as_json:
        _print_json({"path": result.path, "base": result.base.entries(), "stored_bytes": result.stored_bytes, "ratio": result.ratio, "note": result.note, "warnings": warned})
        return
    _echo(_clean(str(result)))


@app.command("set-parent")
def set_parent(
    delta: Path = typer.Argument(..., help="Local delta repo folder: a version stored against its parent."),
    parent: str = typer.Argument(..., help="Where the parent version is now: a local folder, or ORG/NAME@REV on the Hub."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Record where a version's parent is (a folder that moved, or the same version pushed to the
    Hub) without recompressing; checked: the parent must decode to the weights the version was made against.

    Example: deltahub set-parent runs/v3 me/run-42@v2
    """
    from deltahub.chain import set_parent as _set_parent

    where, revision = parent, None
    if not Path(parent).expanduser().exists() and "@" in parent:
        where, _, revision = parent.rpartition("@")
    new = _run(_set_parent, delta, where, revision=revision, token=token)
    if as_json:
        _print_json({"path": delta, "parent": new})
        return
    at = f"@{new['revision']}" if new.get("revision") else ""
    _echo(_clean(f"{delta}: parent is now {new['name_or_path']}{at}"))


@app.command("eval")
def eval_(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    finetuned: Optional[str] = typer.Option(None, "--finetuned", help="The true fine-tune, to compare against (without it: base against base + delta on the text only)."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the one recorded in the delta)."),
    text: Optional[Path] = typer.Option(None, help="Text file for NLL/perplexity/retention (default: the Austen excerpt shipped with deltahub)."),
    max_tokens: int = typer.Option(4096, help="Tokens of the text to score."),
    tensors_only: bool = typer.Option(False, "--tensors-only", help="Only the per-tensor errors (no model is run; needs --finetuned)."),
    worst: int = typer.Option(10, help="How many of the worst tensors to list."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Measure what compression costs: per-tensor errors, and NLL, perplexity and retention on a text.

    With --finetuned, each tensor's error against the true fine-tune and the retention PR;
    without it (a delta you only pulled), the base against base + delta on the text.

    Example: deltahub eval qwen-delta --finetuned Qwen/Qwen2.5-0.5B-Instruct --max-tokens 8192
    """
    from deltahub.evaluate import evaluate

    if tensors_only and finetuned is None:
        raise typer.BadParameter("--tensors-only compares each tensor with the true fine-tune: pass --finetuned", param_hint="--tensors-only")
    body = text.read_text() if text else None
    # finetuned is passed only when given: evaluate() without it scores base against base + delta.
    compare = {} if finetuned is None else {"finetuned": finetuned}
    report = _run(evaluate, delta, base=base, text=body, max_tokens=max_tokens, with_text=not tensors_only, progress=_progress(), token=token, **compare)
    if as_json:
        _print_json(report.to_dict())
        return
    if report.tensors:
        rows = [[t.name, t.kind, t.method or "", t.holds, f"{t.rel_error:.4f}"] for t in report.worst(worst)]
        _table(["tensor", "kind", "method", "holds", "relative error"], rows, title=f"worst {worst} tensors", right=("relative error",))
        _echo(f"relative error of the whole delta: {report.total_rel_error:.4f} (mean over tensors {report.mean_rel_error:.4f})")
    elif finetuned is None:
        _echo("per-tensor errors and PR: not measured (they need the fine-tune: --finetuned)")
    if report.text is not None:
        s = report.text
        measured = (("base", s.nll_base), ("fine-tune", s.nll_finetuned), ("base + delta", s.nll_delta))
        rows = [[label, f"{nll:.4f}", f"{math.exp(nll):.3f}"] for label, nll in measured if nll is not None]
        _table(["model", "NLL / token", "perplexity"], rows, title=f"held-out text, {s.tokens} tokens", right=("NLL / token", "perplexity"))
        if s.retention is not None:
            _echo(f"performance retention PR = {s.retention:.4f}")


@app.command()
def methods(
    params: bool = typer.Option(False, "--params", help="Each method's parameters (for --param) with their defaults."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the compression methods, one per line (with --params, each with its parameters).

    Example: deltahub methods --params
    """
    names = deltahub.list_methods()
    defaults = {name: deltahub.get_method(name).params() for name in names} if params else {}
    if as_json:
        _print_json({"methods": names, **({"params": defaults} if params else {})})
        return
    for name in names:
        _echo(f"{name}  " + " ".join(f"{k}={v!r}" for k, v in defaults[name].items()) if params else name)


@app.command()
def demo(
    ratio: str = typer.Option("1/8", help="Target ratio of the dense delta's bytes, e.g. 1/8."),
    work_dir: Optional[Path] = typer.Option(None, help="Keep the models and deltas here (default: a temporary folder)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a small model pair on Austen offline, compress it with every method, score and load it.

    Prints each method's honest ratio, relative error, performance retention (PR) on held-out
    text and compress time, then generates a line with the default delta.

    Example: deltahub demo --ratio 1/16
    """
    from deltahub.demo import run_demo

    result = _run(run_demo, _ratio(ratio), work_dir=work_dir, progress=_progress())
    if as_json:
        _print_json(result)
        return
    rows = [
        [r.method, f"{r.ratio:.4f}", f"{r.rel_error:.4f}", f"{r.retention:.3f}", f"{r.compress_s:.2f}", r.note]
        for r in sorted(result.rows, key=lambda r: -r.retention if r.retention == r.retention else 1e9)
    ]
    title = f"deltahub on a small Austen fine-tune, target ratio {ratio} (NLL base {result.nll_base:.3f}, fine-tune {result.nll_finetuned:.3f})"
    _table(["method", "honest ratio", "rel. error", "PR", "compress s", "note"], rows, title=title, right=("honest ratio", "rel. error", "PR", "compress s"))
    # What a newcomer needs to read the table (PR, natural-size rows), then the fine-tune's effect
    # against the base's on one line of the fine-tune's text.
    for line in ["", *result.notes(), "", *result.comparison()]:
        _echo(_clean(line))
    _echo(f"models and deltas: {result.work_dir}")


@app.command("export-lora")
def export_lora(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    out: Path = typer.Argument(..., help="Folder for the PEFT adapter (adapter_config.json, adapter_model.safetensors)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="LoRA rank (default: the stored rank of low-rank records, exact; else the rank whose bytes match the record's)."),
    base: Optional[str] = typer.Option(None, help="Base model, read only for lossless tensors (default: the one recorded in the delta)."),
    dtype: str = typer.Option("float32", help="Adapter dtype; float32 keeps exports of low-rank records exact (bfloat16 halves the files)."),
    embeddings: bool = typer.Option(True, help="Export embeddings and tied LM heads too (--no-embeddings for loaders without embedding LoRA)."),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write a delta as a PEFT LoRA adapter, with each module's rank and relative error.

    Exact for low-rank records (svd, deltacome, auto with -p lora=true, which stores every matrix
    low rank for this); a truncated SVD of the decoded delta otherwise. The report names the
    --max-lora-rank vLLM needs.

    Example: deltahub export-lora user/qwen-delta qwen-lora --rank 64
    """
    report = _run(deltahub.export_lora, delta, out, base, rank, dtype=dtype, embeddings=embeddings, revision=revision, overwrite=overwrite, token=token, progress=_progress())
    if as_json:
        _print_json(report.to_dict())
        return
    for line in str(report).splitlines():
        _echo(_clean(line))


def run() -> None:
    """Entry point of the ``deltahub`` script (and ``python -m deltahub``): exits with the status
    of :func:`status`."""
    sys.exit(status())


def status() -> int:
    """Run the command line of ``sys.argv`` and return its exit status (module docstring).

    Errors raised outside a command's main call (while printing its result, say) get the same
    one-line treatment as those inside it (``_run``); ``--debug`` lets them through.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(prog_name="deltahub")  # standalone: exits through SystemExit (usage errors: 2)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except (Exception, KeyboardInterrupt, Terminated) as e:
        if _state["debug"]:
            raise
        return _report(e)
    return 0


if __name__ == "__main__":
    sys.exit(run())
