"""Shared CLI plumbing: one-line errors with a documented exit code instead of tracebacks, progress bars.

Exit codes (the same table is in the README):

====  ==========================================================================================
code  cause
====  ==========================================================================================
0     success
1     anything else: a failed or cancelled job, an internal error (``SPECDIT_DEBUG=1`` shows the traceback)
2     invalid input: a bad option or value, an invalid job spec, an unusable file or path
3     Redis unreachable or authentication failed
4     no such job
5     a worker bound to a job (``--job``) cannot load that job's model
6     the target model returned NaN or inf (the message names the step and the sample)
130   interrupted (Ctrl-C)
====  ==========================================================================================
"""
from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

# typer ships its own copy of click: take click's exception classes from typer's public ones.
UsageError = typer.BadParameter.__mro__[1]  # click's UsageError: bad option, value or missing argument
ClickException = UsageError.__mro__[1]

EXIT_OK, EXIT_OTHER, EXIT_USAGE, EXIT_REDIS, EXIT_NO_JOB, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_NONFINITE = 6  # the target model returned NaN/inf (specdit.samplers.common.NonFiniteTargetError)


# Options shared by `generate` and `bench` (one definition, one help text).
CFG_CHANNELS_OPTION = typer.Option("all", "--cfg-channels",
                                   help="Guided channels: all | 3 (3: the original DiT's forward_with_cfg).")
NUM_HEADS_OPTION = typer.Option(None, "--num-heads", help="Attention heads of an original DiT .pt (default: DiT's table).")
WEIGHTS_OPTION = typer.Option(None, "--weights", help="ema | model: weights of a DiT train.py checkpoint (default: ema).")


def _error_line(msg: str) -> None:
    from cli.render import plain

    typer.secho(f"error: {plain(msg)}", err=True, fg=typer.colors.RED)


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: msg`` (one line, control characters replaced) to stderr and exit with ``code``."""
    _error_line(msg)
    raise typer.Exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def user_errors(fn):
    """Every failure of a command as one line: errors a user can cause (bad values, unusable files or paths:
    ``ValueError``, ``OSError``) exit 2; anything else is an internal error (exit 1, traceback only with
    ``SPECDIT_DEBUG=1``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except OSError as e:  # "Not a directory: 'x/y'" rather than "[Errno 20] Not a directory: 'x/y'"
            fail(f"{e.strerror}: {e.filename}" if e.strerror and e.filename else _first_line(e))
        except ValueError as e:
            common = sys.modules.get("specdit.samplers.common")  # loaded if a sampler ran: no torch import here
            if common is not None and isinstance(e, common.NonFiniteTargetError):
                fail(_first_line(e), EXIT_NONFINITE)
            fail(_first_line(e))
        except Exception as e:  # noqa: BLE001 - no traceback for a user, ever
            if os.environ.get("SPECDIT_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {_first_line(e)} (set SPECDIT_DEBUG=1 for a traceback)",
                 EXIT_OTHER)

    return wrapper


def number_parse_error(e) -> str | None:
    """For an option that wants a number and got text (``--relax abc``): the message the shared rules give for
    the same value in a spec file (``specdit.settings_rules``), spelled with the option; else None. (Typer
    parses options with pydantic: the raw value is in the cause's error.)"""
    cause, param = e.__cause__, getattr(e, "param", None)
    try:
        err = cause.errors()[0]
        kind, raw, opts = err["type"].split("_")[0], err["input"], param.opts
    except Exception:  # noqa: BLE001 - not a number option's parse error: the usual message
        return None
    if kind not in ("float", "int") or not opts or not isinstance(raw, str):
        return None
    from specdit import settings_rules as rules

    try:
        value = float(raw)  # "1.5" for an integer option: the number, as a spec file would give it
    except ValueError:
        value = raw
    try:
        (rules.check_float if kind == "float" else rules.check_int)(max(opts, key=len), value)
    except ValueError as exc:
        return str(exc)
    return None


class OneLineErrors(TyperGroup):
    """The command group of ``specdit``: usage errors (unknown option, bad value, missing argument) are one
    ``error:`` line and exit code 2, like every other user mistake, instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare 'specdit': the help text
                e.show()
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "specdit")
            typed = number_parse_error(e)
            if typed is not None:  # the message of the shared rules (specdit.settings_rules), as in spec files
                _error_line(typed)
                sys.exit(EXIT_USAGE)
            _error_line(f"{where}: {e.format_message()} (see '{where} --help')")
            sys.exit(EXIT_USAGE)
        except ClickException as e:
            _error_line(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            _error_line("aborted")
            sys.exit(EXIT_OTHER)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def check_output_file(path, what: str = "output file") -> None:
    """Refuse (ValueError, before any work) an output file that is a directory or whose parent is a file."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {p}: {parent} is not a directory")
            break


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
    """A rich progress bar over ``total`` chain-steps; yields ``advance(n)``. If the body raises, the bar is
    erased, so that a failed command prints its one ``error:`` line and nothing else."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        try:
            yield lambda n: bar.advance(task, n)
        except BaseException:
            bar.update(task, visible=False)  # the final render (on exit) then draws no bar
            raise
