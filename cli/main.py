"""The ``deltahub`` command line: a thin typer layer over deltahub's public API."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="Compressed deltas of fine-tuned models.")


@app.command()
def methods() -> None:
    """List the compression methods.

    Example: deltahub methods
    """
    import deltahub

    for name in deltahub.list_methods():
        typer.echo(name)


if __name__ == "__main__":
    app()
