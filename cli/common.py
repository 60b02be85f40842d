"""Shared CLI plumbing: one-line errors with a non-zero exit code instead of tracebacks, progress bars."""
from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

import typer

EXIT_USAGE = 2
EXIT_NONFINITE = 6  # the target model returned NaN/inf (specdit.samplers.common.NonFiniteTargetError)


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: msg`` (one line) to stderr and exit with ``code``."""
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the errors a user can cause (bad values, missing files) into one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            common = sys.modules.get("specdit.samplers.common")  # loaded if a sampler ran: no torch import here
            if common is not None and isinstance(e, common.NonFiniteTargetError):
                fail(str(e), EXIT_NONFINITE)
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper


@contextmanager
def one_line_warnings():
    """Show the library's warnings (e.g. replaced drafts) as one ``warning: ...`` line each on stderr."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for msg in dict.fromkeys(str(w.message) for w in caught):
        typer.secho(f"warning: {' '.join(msg.split())}", err=True, fg=typer.colors.YELLOW)


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
