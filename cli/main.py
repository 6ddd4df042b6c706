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
"""

from __future__ import annotations

import json
import re
import math
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
except KeyboardInterrupt:
    sys.stderr.write("Error: interrupted\n")
    sys.exit(EXIT_INTERRUPTED)
except Exception as e:  # a broken installation
    if "--debug" in sys.argv:
        raise
    sys.stderr.write(f"Error: deltahub cannot start ({type(e).__name__}: {e}); rerun with --debug for the traceback\n")
    sys.exit(EXIT_INTERNAL)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False, help="Store, share and load fine-tuned models as compressed deltas.")
# Markup off: what is printed comes from files, the Hub and commit messages, and a "[/x]" in a
# commit message must print as itself, not be read as rich markup (or crash the command).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
_state = {"debug": False}

TOKEN_HELP = "Hub token (default: HF_TOKEN or the saved login). Never printed."


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """deltahub: compressed, versioned deltas of fine-tuned models."""
    _state["debug"] = debug


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
    err_console.print(Text.assemble(("Error:", "red"), " ", text), highlight=False, soft_wrap=True)


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
    try:
        return fn(*args, **kwargs)
    except (Exception, KeyboardInterrupt, Terminated) as e:
        _fail(e)


def _cell(text: str) -> Text:
    """Text from the Hub or a file as one table cell: control characters (line breaks, terminal
    escapes) become spaces."""
    return Text(re.sub(r"[\x00-\x1f\x7f]", " ", text))


def _ratio(text: str | None) -> float | None:
    """Accept ``1/8``, ``0.125`` or ``none``."""
    if text is None or text.lower() == "none":
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
        out[key] = _literal(value)
    return out


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@app.command()
def compress(
    base: str = typer.Argument(..., help="Base model: local folder or Hub id."),
    finetuned: str = typer.Argument(..., help="Fine-tuned model: local folder or Hub id."),
    out: Path = typer.Argument(..., help="Folder to write the delta repo to."),
    method: str = typer.Option("auto", "--method", "-m", help=f"One of: {', '.join(deltahub.list_methods())}."),
    ratio: str = typer.Option("1/8", "--ratio", "-r", help="Target stored bytes / dense delta bytes, e.g. 1/8; 'none' for methods without one."),
    param: List[str] = typer.Option([], "--param", "-p", help="Method parameter key=value (repeatable), e.g. rank=64."),
    rule: List[str] = typer.Option([], "--rule", help="PATTERN=METHOD[:k=v,...] for matching tensor names (repeatable), e.g. '*.mlp.*=svd:rank=64'."),
    device: str = typer.Option("cpu", help="Where SVDs run: cpu or cuda."),
    revision: Optional[str] = typer.Option(None, help="Revision of the fine-tune (Hub)."),
    base_revision: Optional[str] = typer.Option(None, help="Revision of the base (Hub)."),
    seed: int = typer.Option(0, help="Global seed of the random masks and rounding (auto, dare, deltadq)."),
    max_shard_size: str = typer.Option("5GB", help="Largest shard, e.g. 5GB or 500MB."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
    cache_dir: Optional[Path] = typer.Option(None, help="Hugging Face cache folder."),
    calibration: Optional[Path] = typer.Option(None, help="Plain-text file: auto measures errors on the base's activations over it (loads the base model once)."),
    calibration_tokens: int = typer.Option(2048, help="Tokens of the calibration text to use."),
) -> None:
    """Compress FINETUNED - BASE into a delta repo at OUT.

    Example: deltahub compress Qwen/Qwen2.5-0.5B Qwen/Qwen2.5-0.5B-Instruct qwen-delta --ratio 1/8
    """
    result = _run(
        deltahub.compress, base, finetuned, out, method, _ratio(ratio), params=_params(param), rules=rule, seed=seed, device=device,
        revision=revision, base_revision=base_revision, token=token, cache_dir=cache_dir, max_shard_size=max_shard_size, overwrite=overwrite,
        calibration=calibration, calibration_tokens=calibration_tokens,
    )
    console.print(str(result), highlight=False)
    if result.fallbacks:
        console.print(f"{len(result.fallbacks)} tensor(s) too small for the ratio were stored dense: {', '.join(result.fallbacks[:5])}", highlight=False)


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
) -> None:
    """Write the full fine-tuned checkpoint (base + delta) for transformers or vLLM.

    Example: deltahub apply user/qwen-delta -o qwen-instruct
    """
    path = _run(deltahub.apply, delta, out, base, revision=revision, base_revision=base_revision, verify_base=verify_base, max_shard_size=max_shard_size, overwrite=overwrite, token=token)
    console.print(f"wrote {path}", highlight=False)


@app.command()
def info(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id (only delta_config.json is read)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Show what a delta holds: base, method, ratio, sizes and, with --tensors, each tensor.

    Example: deltahub info user/qwen-delta --tensors
    """
    result = _run(deltahub.info, delta, revision=revision, token=token)
    if as_json:
        typer.echo(json.dumps(result.to_dict(with_tensors=tensors), indent=2))
        return
    cfg = result.config
    base, method, totals, summary = cfg.get("base", {}), cfg.get("method", {}), cfg.get("totals", {}), cfg.get("summary", {})
    console.print(Text.assemble((str(delta), "bold"), f"  deltahub format {cfg['format_version']}"), highlight=False)
    console.print(f"base:    {base.get('name_or_path')}" + (f" @ {base['revision']}" if base.get("revision") else ""), highlight=False)
    console.print(f"method:  {method.get('name')}  ratio {method.get('ratio')}  params {method.get('params')}", highlight=False)
    if totals.get("stored_bytes"):
        console.print(f"size:    {human_bytes(totals['stored_bytes'])} stored for {human_bytes(totals['dense_bytes'])} dense: ratio {totals['ratio']:.4f}", highlight=False)
    if summary.get("mean_rel_error") is not None:
        console.print(f"error:   mean {summary['mean_rel_error']:.4f}, worst {summary['max_rel_error']:.4f}", highlight=False)
    kinds: dict[str, int] = {}
    for t in result.tensors:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
    console.print("tensors: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())), highlight=False)
    if tensors:
        table = Table()
        for col in ("tensor", "kind", "method", "shape", "holds", "stored", "ratio"):
            table.add_column(col, justify="right" if col in ("stored", "ratio") else "left")
        for t in result.tensors:
            table.add_row(t.name, t.kind, t.method or "", "x".join(map(str, t.shape)), t.holds, human_bytes(t.stored_bytes), f"{t.ratio:.4f}")
        console.print(table)


@app.command()
def verify(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    base: Optional[str] = typer.Option(None, help="Also check this base against the recorded one."),
    check_base: bool = typer.Option(False, "--check-base", help="Also check the recorded base."),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Check a delta's integrity (shards, checksums, layouts, decoding) and, optionally, its base.

    Example: deltahub verify qwen-delta --base Qwen/Qwen2.5-0.5B
    """
    report = _run(deltahub.verify, delta, base, check_base=check_base, revision=revision, token=token)
    console.print(str(report), highlight=False)
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
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Upload a delta as a new version: one commit, one tag; unchanged shards are not re-uploaded.

    Example: deltahub push qwen-delta user/qwen-delta -m "3 epochs, lr 1e-5"
    """
    from deltahub.hub import push as _push

    result = _run(_push, delta, repo, tag=tag, message=message, private=private or None, branch=branch, create_pr=create_pr, token=token)
    console.print(str(result), highlight=False)


@app.command()
def pull(
    repo: str = typer.Argument(..., help="Hub repo id."),
    revision: Optional[str] = typer.Option(None, help="Version: tag, branch or commit (default: the head)."),
    local_dir: Optional[Path] = typer.Option(None, help="Copy into this folder instead of only the Hugging Face cache."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Download a version of a delta (cached; works offline from the cache with HF_HUB_OFFLINE=1).

    Example: deltahub pull user/qwen-delta --revision v2
    """
    from deltahub.hub import pull as _pull

    console.print(str(_run(_pull, repo, revision=revision, local_dir=local_dir, token=token)), highlight=False)


@app.command()
def log(
    repo: str = typer.Argument(..., help="Hub repo id."),
    branch: str = typer.Option("main", help="Branch to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
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
        rows = [{"tags": v.tags, "commit": v.commit, "date": v.date.isoformat() if v.date else None, "message": v.message, "method": v.method, "ratio": v.ratio, "stored_bytes": v.stored_bytes, "base": v.base, "problem": v.problem} for v in versions]
        typer.echo(json.dumps({"repo": repo, "versions": rows, "history_bytes": hist.stored_bytes, "full_model_bytes": hist.full_model_bytes}, indent=2))
        return
    table = Table(title=f"{repo} ({branch})")
    for col in ("version", "commit", "date", "message", "method", "ratio", "stored", "base"):
        table.add_column(col)
    for v in versions:
        if v.problem:
            table.add_row(_cell(", ".join(v.tags) or "-"), v.commit[:8], v.date.strftime("%Y-%m-%d %H:%M") if v.date else "", _cell(v.message), "unreadable", "", "", _cell(v.problem))
            continue
        table.add_row(_cell(", ".join(v.tags) or "-"), v.commit[:8], v.date.strftime("%Y-%m-%d %H:%M") if v.date else "", _cell(v.message), _cell(v.method or ""), f"{v.ratio:.4f}" if v.ratio else "", human_bytes(v.stored_bytes or 0), _cell(v.base or ""))
    console.print(table)
    console.print(hist.summary(), highlight=False)


@app.command()
def rollback(
    repo: str = typer.Argument(..., help="Hub repo id."),
    to: str = typer.Option(..., "--to", help="Version to restore: tag or commit."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    force: bool = typer.Option(False, help="Roll back even to a version made against another base."),
    branch: str = typer.Option("main", help="Branch to roll back."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Make the head equal to an earlier version with a new commit (server-side copies, no upload).

    Example: deltahub rollback user/qwen-delta --to v2
    """
    from deltahub.hub import rollback as _rollback

    result = _run(_rollback, repo, to, message=message, force=force, branch=branch, token=token)
    console.print(f"rolled back {repo} to {to}: new head {result.commit[:12]} tagged {result.tag}", highlight=False)


@app.command("eval")
def eval_(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    finetuned: str = typer.Option(..., "--finetuned", help="The true fine-tune, to compare against."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the one recorded in the delta)."),
    text: Optional[Path] = typer.Option(None, help="Text file for NLL/perplexity/retention (default: the Austen excerpt shipped with deltahub)."),
    max_tokens: int = typer.Option(4096, help="Tokens of the text to score."),
    tensors_only: bool = typer.Option(False, "--tensors-only", help="Only the per-tensor errors (no model is run)."),
    worst: int = typer.Option(10, help="How many of the worst tensors to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Measure what compression costs: per-tensor errors, and NLL, perplexity and retention on a text.

    Example: deltahub eval qwen-delta --finetuned Qwen/Qwen2.5-0.5B-Instruct --max-tokens 8192
    """
    from deltahub.evaluate import evaluate

    body = text.read_text() if text else None
    report = _run(evaluate, delta, finetuned, base, text=body, max_tokens=max_tokens, with_text=not tensors_only, progress=not as_json, token=token)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"worst {worst} tensors")
    for col in ("tensor", "kind", "method", "holds", "relative error"):
        table.add_column(col, justify="right" if col == "relative error" else "left")
    for t in report.worst(worst):
        table.add_row(t.name, t.kind, t.method or "", t.holds, f"{t.rel_error:.4f}")
    console.print(table)
    console.print(f"relative error of the whole delta: {report.total_rel_error:.4f} (mean over tensors {report.mean_rel_error:.4f})", highlight=False)
    if report.text is not None:
        s = report.text
        t2 = Table(title=f"held-out text, {s.tokens} tokens")
        for col in ("model", "NLL / token", "perplexity"):
            t2.add_column(col, justify="left" if col == "model" else "right")
        for label, nll in (("base", s.nll_base), ("fine-tune", s.nll_finetuned), ("base + delta", s.nll_delta)):
            t2.add_row(label, f"{nll:.4f}", f"{math.exp(nll):.3f}")
        console.print(t2)
        console.print(f"performance retention PR = {s.retention:.4f}", highlight=False)


@app.command()
def methods() -> None:
    """List the compression methods.

    Example: deltahub methods
    """
    for name in deltahub.list_methods():
        typer.echo(name)


@app.command()
def demo(
    ratio: str = typer.Option("1/8", help="Target ratio of the dense delta's bytes, e.g. 1/8."),
    work_dir: Optional[Path] = typer.Option(None, help="Keep the models and deltas here (default: a temporary folder)."),
) -> None:
    """Train a small model pair on Austen offline, compress it with every method, score and load it.

    Prints each method's honest ratio, relative error, performance retention (PR) on held-out
    text and compress time, then generates a line with the default delta.

    Example: deltahub demo --ratio 1/16
    """
    from deltahub.demo import run_demo

    result = _run(run_demo, _ratio(ratio), work_dir=work_dir)
    table = Table(title=f"deltahub on a small Austen fine-tune, target ratio {ratio} (NLL base {result.nll_base:.3f}, fine-tune {result.nll_finetuned:.3f})")
    for col in ("method", "honest ratio", "rel. error", "PR", "compress s", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in sorted(result.rows, key=lambda r: -r.retention if r.retention == r.retention else 1e9):
        table.add_row(r.method, f"{r.ratio:.4f}", f"{r.rel_error:.4f}", f"{r.retention:.3f}", f"{r.compress_s:.2f}", r.note[:50])
    console.print(table)
    console.print(f"DeltaModel.from_pretrained({str(result.work_dir / ('delta-' + result.sampled_from))!r}) says:\n  {result.sample}", highlight=False)


@app.command("export-lora")
def export_lora(
    delta: str = typer.Argument(..., help="Delta repo: local folder or Hub id."),
    out: Path = typer.Argument(..., help="Folder for the PEFT adapter (adapter_config.json, adapter_model.safetensors)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="LoRA rank (default: exact for svd deltas, else the rank whose bytes match the delta's)."),
    base: Optional[str] = typer.Option(None, help="Base model, read only for lossless tensors (default: the one recorded in the delta)."),
    dtype: str = typer.Option("float32", help="Adapter dtype; float32 keeps svd exports exact."),
    embeddings: bool = typer.Option(True, help="Export embeddings and tied LM heads too (--no-embeddings for loaders without embedding LoRA)."),
    revision: Optional[str] = typer.Option(None, help="Revision of the delta."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    token: Optional[str] = typer.Option(None, help=TOKEN_HELP, show_default=False),
) -> None:
    """Write a delta as a PEFT LoRA adapter, with each module's rank and relative error.

    Exact for deltas made with the svd method; a truncated SVD of the decoded delta otherwise.

    Example: deltahub export-lora user/qwen-delta qwen-lora --rank 64
    """
    report = _run(deltahub.export_lora, delta, out, base, rank, dtype=dtype, embeddings=embeddings, revision=revision, overwrite=overwrite, token=token, progress=False)
    console.print(str(report), highlight=False)


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
