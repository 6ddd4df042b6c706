"""``python -m deltahub`` runs the command line."""

from cli.main import run

run()
