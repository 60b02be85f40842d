"""The ``specdit`` command line. Each command group lives in its own module exposing
``register(app)``; commands parse arguments and call one library/cluster function."""
from __future__ import annotations

import importlib

import typer

from cli.common import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    name="specdit",
    help="Fast, exact sampling for Diffusion Transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Command-group modules under cli/ (each defines register(app)).
_GROUPS = ["generate", "bench", "fid", "jobs", "train", "pool"]

for _name in _GROUPS:
    importlib.import_module(f"cli.{_name}").register(app)

if __name__ == "__main__":
    app()
