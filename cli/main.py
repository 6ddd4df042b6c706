"""The ``deltahub`` command line: a thin typer layer over deltahub's public API."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="Compressed deltas of fine-tuned models.")
console = Console()


def _ratio(text: str) -> float:
    """Accept ``1/8`` or ``0.125``."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a ratio; write it as 1/8 or 0.125") from None


@app.command()
def methods() -> None:
    """List the compression methods.

    Example: deltahub methods
    """
    import deltahub

    for name in deltahub.list_methods():
        typer.echo(name)


@app.command()
def demo(
    ratio: str = typer.Option("1/8", help="Target ratio of the dense delta's bytes, e.g. 1/8."),
    rows: int = typer.Option(512, help="Rows of the demo weight."),
    cols: int = typer.Option(1024, help="Columns of the demo weight."),
) -> None:
    """Compress one fine-tune-like delta with every method and print ratio, error and time.

    Example: deltahub demo --ratio 1/16
    """
    from deltahub.demo import run_demo

    rows_out = run_demo(_ratio(ratio), rows, cols)
    table = Table(title=f"deltahub methods on a {rows}x{cols} bf16 delta, target ratio {ratio}")
    for col in ("method", "honest ratio", "rel. error", "encode s", "decode s", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in rows_out:
        table.add_row(r.method, f"{r.ratio:.4f}", f"{r.rel_error:.4f}", f"{r.encode_s:.3f}", f"{r.decode_s:.3f}", r.note[:60])
    console.print(table)


if __name__ == "__main__":
    app()
