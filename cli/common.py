"""Shared CLI plumbing: one-line errors with a documented exit code instead of tracebacks, progress bars.

Exit codes (the same table is in the README):

====  ==========================================================================================
code  cause
====  ==========================================================================================
0     success
1     anything else: a failed or cancelled job, an internal error (``SPECDIT_DEBUG=1`` shows the traceback)
2     invalid input: a bad option or value, an invalid job spec, an unusable file or path
3     Redis unreachable or authentication failed (a worker: unreachable for longer than its retry bound)
4     no such job
5     a worker bound to a job (``--job``) cannot load that job's model
6     the target model returned NaN or inf (the message names the step and the sample)
7     Redis refused the command while its data is safe (OOM, READONLY, MISCONF, BUSY, LOADING, MASTERDOWN,
      NOREPLICAS); a worker exits so only after retrying for its bound, leaving finished shard files in place
8     a worker's engine (its Ray pool) stayed unavailable for many shards in a row (none was charged)
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
EXIT_REDIS_REFUSED = 7  # Redis refused the command (cluster.connection.REFUSALS; cluster.errors.RedisRefused)
EXIT_ENGINE_DOWN = 8  # a worker's Ray pool stayed unavailable (cluster.errors.EngineDown)


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


def _service_error_line(e: BaseException, redis_url: str | None) -> tuple[str, int] | None:
    """(message, exit code) of a job-service failure (``cluster.errors.ServiceError``: its own code; a lost
    Redis connection: EXIT_REDIS; a refusal (OOM, READONLY, ...): EXIT_REDIS_REFUSED; a Ray pool error: EXIT_USAGE or EXIT_OTHER), or None. Looks only at modules already loaded: no import cost here."""
    errors, redis = sys.modules.get("cluster.errors"), sys.modules.get("redis")
    if errors is not None and isinstance(e, errors.ServiceError):
        return str(e), e.exit_code
    actors = sys.modules.get("workers.ray_pool.actors")
    if actors is not None and isinstance(e, actors.PoolError):  # Ray pool: a bad address is the user's
        return _first_line(e), EXIT_USAGE if isinstance(e, ValueError) else EXIT_OTHER
    if redis is not None and isinstance(e, redis.RedisError):
        from cluster.connection import redact, refusal_code, refusal_line, resolve_url

        if refusal_code(e):  # the server answered, refusing for now: retry later
            return f"Redis at {redact(resolve_url(redis_url))} {refusal_line(e)}", EXIT_REDIS_REFUSED
    if redis is not None and isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        from cluster.connection import redact, resolve_url

        return (f"lost connection to Redis at {redact(resolve_url(redis_url))}: {' '.join(str(e).split())}",
                EXIT_REDIS)
    return None


def user_errors(fn):
    """The one error wrapper of every command: each failure is one line and a named exit code (see the
    table above). Refused settings (``specdit.config.SettingError``) name their flag; other errors a user
    can cause (bad values, unusable files or paths: ``ValueError``, ``OSError``) exit 2; job-service errors
    carry their own code; anything else is an internal error (exit 1, traceback only with ``SPECDIT_DEBUG=1``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001 - no traceback for a user, ever
            msg, code = error_line(e, kwargs.get("redis_url"))
            if code == EXIT_OTHER and os.environ.get("SPECDIT_DEBUG"):
                raise
            fail(msg, code)

    return wrapper


def error_line(e: Exception, redis_url: str | None = None) -> tuple[str, int]:
    """(one-line message, exit code) for any exception a command raised."""
    from specdit.config import SettingError

    service = _service_error_line(e, redis_url)
    if service is not None:
        return service
    if isinstance(e, SettingError):
        from cli.options import setting_error_line

        return setting_error_line(e), EXIT_USAGE
    if isinstance(e, OSError):  # "Not a directory: 'x/y'" rather than "[Errno 20] Not a directory: 'x/y'"
        return (f"{e.strerror}: {e.filename}" if e.strerror and e.filename else _first_line(e)), EXIT_USAGE
    if isinstance(e, ValueError):
        common = sys.modules.get("specdit.samplers.common")  # loaded if a sampler ran: no torch import here
        if common is not None and isinstance(e, common.NonFiniteTargetError):
            return _first_line(e), EXIT_NONFINITE
        return _first_line(e), EXIT_USAGE
    return (f"internal error: {type(e).__name__}: {_first_line(e)} (set SPECDIT_DEBUG=1 for a traceback)",
            EXIT_OTHER)


def hide_flag_types(command, ctx) -> None:
    """Give every on/off flag of ``command`` and of its subcommands (``--help`` included) an empty metavar.

    typer's rich help prints a type column (``<bool>``) even for an option that takes no value; a flag shows
    none. Options with a metavar of their own are left alone."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        hide_flag_types(sub, ctx)


def number_parse_error(e: UsageError) -> str | None:
    """For a number option given text (``--relax abc``): the message ``specdit.config`` gives the same value
    in a spec file, naming the option's setting; None for any other usage error. (Typer parses numbers with
    pydantic: the raw text is in the cause's first error.)"""
    param, cause = getattr(e, "param", None), e.__cause__
    try:
        err = cause.errors()[0]
        kind, raw = err["type"].split("_")[0], err["input"]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    if param is None or kind not in ("float", "int") or not isinstance(raw, str):
        return None
    from cli.options import as_spec_value
    from specdit.config import SettingError, as_float, as_int  # torch-free

    try:
        (as_float if kind == "float" else as_int)(max(param.opts, key=len), as_spec_value(raw))
    except SettingError as exc:
        return str(exc)
    return None


class OneLineErrors(TyperGroup):
    """The command group of ``specdit``: usage errors (unknown option, bad value, missing argument) are one
    ``error:`` line and exit code 2, like every other user mistake, instead of a usage box. Flags show no
    ``<bool>`` type in help (:func:`hide_flag_types`)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        if not getattr(self, "flag_types_hidden", False):
            self.flag_types_hidden = True  # before the walk, which asks this group for its params again
            hide_flag_types(self, ctx)
        return params

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
            if typed is not None:  # worded as the shared rules word the same value in a spec file
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
    """Refuse (ValueError, before any work) an output file that is a directory, whose parent is a file, that
    exists and is not writable, or whose nearest existing folder is not writable (missing folders below it are
    made when the file is written)."""
    import os
    from pathlib import Path

    from specdit.outputs import nearest_folder

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory")
    if p.exists():  # an existing file (or /dev/null): its own permission decides
        if not os.access(p, os.W_OK):
            raise ValueError(f"{what} {p} is not writable")
        return
    parent = nearest_folder(p, what)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p}: {parent} is not writable")


_LIVE_BARS: list = []  # the step_progress bars on screen now: warnings print above the newest


@contextmanager
def one_line_warnings():
    """Show the library's warnings (e.g. replaced drafts, a calibration made now) as one ``warning: ...`` line each
    on stderr, when they happen (above a live progress bar, not into its line; a message repeated later is not
    printed again)."""
    import warnings

    seen: set[str] = set()

    def show(message, *_args, **_kwargs) -> None:
        text = " ".join(str(message).split())
        if text in seen:
            return
        seen.add(text)
        if _LIVE_BARS:
            from rich.text import Text

            _LIVE_BARS[-1].console.print(Text(f"warning: {text}", style="yellow"), soft_wrap=True)  # not wrapped
        else:
            typer.secho(f"warning: {text}", err=True, fg=typer.colors.YELLOW)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


@contextmanager
def step_progress(total: int, description: str, enabled: bool = True):
    """A rich progress bar on stderr over ``total`` chain-steps; yields ``advance(n)``. If the body raises, the bar
    is erased, so that a failed command prints its one ``error:`` line and nothing else."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        _LIVE_BARS.append(bar)
        try:
            yield lambda n: bar.advance(task, n)
        except BaseException:
            bar.update(task, visible=False)  # the final render (on exit) then draws no bar
            raise
        finally:
            _LIVE_BARS.remove(bar)
