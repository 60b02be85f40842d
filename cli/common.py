"""Shared CLI plumbing: one-line errors with a non-zero exit code instead of tracebacks, progress bars."""
from __future__ import annotations

import functools
from contextlib import contextmanager

import typer

EXIT_USAGE = 2


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: msg`` (one line, control characters replaced) to stderr and exit with ``code``."""
    from cli.render import plain

    typer.secho(f"error: {plain(msg)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the errors a user can cause (bad values, missing files) into one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper


@contextmanager
def step_progress(total: int, description: str, enabled: bool = True):
    """A rich progress bar over ``total`` chain-steps; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
