"""Safe printing of user-controlled text (job names, models, errors, paths) on a terminal.

Anything a user (or whoever can write to Redis) controls is hostile: Rich markup such as ``[/bold]`` or
``[red]...[/]`` must print literally, and control characters (ESC sequences, carriage returns, bidi overrides)
must never reach the terminal. :func:`plain` is for ``typer.echo`` / one-line errors; :func:`markup` for
strings embedded in Rich markup (tables, ``Console.print``).
"""
from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, zero-width and bidirectional formatting characters.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


def plain(text: object, *, one_line: bool = True) -> str:
    """``text`` with every control character replaced (newlines and tabs too when ``one_line``: a space)."""
    s = str(text)
    if one_line:
        s = re.sub(r"[\r\n\t]+", " ", s)
    else:
        s = s.replace("\r", " ").replace("\t", " ")
        return "\n".join(_CONTROL.sub(REPLACEMENT, line) for line in s.split("\n"))
    return _CONTROL.sub(REPLACEMENT, s)


class SafeFormatter:
    """A ``logging.Formatter`` wrapper whose output has control characters replaced (newlines kept: tracebacks
    stay readable), for log records that carry job names, models or errors."""

    def __init__(self, fmt: str):
        import logging

        self._inner = logging.Formatter(fmt)

    def format(self, record) -> str:
        return plain(self._inner.format(record), one_line=False)


def markup(text: object) -> str:
    """``text`` made safe to embed in Rich markup: control characters replaced, markup escaped."""
    from rich.markup import escape

    return escape(plain(text))  # also doubles a trailing backslash, which would escape the next tag
