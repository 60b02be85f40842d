"""Connecting to Redis: URL from a flag or ``SPECDIT_REDIS_URL``, password from ``SPECDIT_REDIS_PASSWORD``
(or inside the URL). Defaults to localhost."""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import redis

from cluster.errors import RedisRefused, RedisUnavailable

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get("SPECDIT_REDIS_URL") or DEFAULT_URL


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


def connect(url: str | None = None, *, check: bool = True, timeout: float = 5.0) -> redis.Redis:
    """A client with decoded responses. ``check`` pings once and turns failure into one clear line."""
    url = resolve_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise RedisUnavailable(f"invalid Redis URL {redact(url)!r}: scheme must be redis://, rediss:// or unix://")
    kwargs: dict = dict(decode_responses=True, socket_connect_timeout=timeout, socket_timeout=max(timeout, 30.0),
                        health_check_interval=15)
    password = os.environ.get("SPECDIT_REDIS_PASSWORD")
    if password and not parts.password:
        kwargs["password"] = password
    try:
        client = redis.Redis.from_url(url, **kwargs)
    except ValueError as e:
        raise RedisUnavailable(f"invalid Redis URL {redact(url)!r}: {e}") from None
    if check:
        try:
            client.ping()
        except redis.AuthenticationError as e:
            raise RedisUnavailable(f"Redis at {redact(url)} refused authentication: {e} "
                                   "(set SPECDIT_REDIS_PASSWORD)") from None
        except redis.ResponseError as e:
            if refusal_code(e):
                raise RedisRefused(f"Redis at {redact(url)} {refusal_line(e)}") from None
            raise RedisUnavailable(f"Redis at {redact(url)} answered with an error: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            if refusal_code(e):  # LOADING is a ConnectionError in redis-py
                raise RedisRefused(f"Redis at {redact(url)} {refusal_line(e)}") from None
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {_short(e)}") from None
    return client


# Error codes a Redis server answers while the data is safe: it refuses the command for now (memory limit
# with noeviction, a replica after failover, a failed snapshot, a long script, loading its data set, a replica
# cut from its master, too few replicas). Retried like a lost connection; any other error is a real one.
REFUSALS = {
    "OOM": "is out of memory (maxmemory with noeviction)",
    "READONLY": "is a read-only replica",
    "MISCONF": "stopped writes after a failed snapshot (MISCONF)",
    "BUSY": "is busy running a script",
    "LOADING": "is loading its data set",
    "MASTERDOWN": "is a replica whose master link is down",
    "NOREPLICAS": "has too few replicas to accept writes",
}


def refusal_code(e: BaseException) -> str | None:
    """The code (``"OOM"``, ``"READONLY"``, ...) of a refusal in :data:`REFUSALS`, else None.

    Dispatches on the server's error code: redis-py gives it as ``status_code`` (and strips it from the
    message) for the codes it knows, some as their own classes (OutOfMemoryError, ReadOnlyError, LOADING as a
    ConnectionError), others as a plain ``ResponseError`` whose message starts with the code; a transaction
    refused at queue time arrives as EXECABORT naming the first error."""
    if not isinstance(e, redis.RedisError):
        return None
    code = getattr(e, "status_code", None)
    words = str(e).split(maxsplit=1)
    first = words[0] if words else ""
    if code in REFUSALS:
        return code
    if first in REFUSALS and isinstance(e, redis.ResponseError):
        return first
    names = {redis.exceptions.OutOfMemoryError: "OOM", redis.exceptions.ReadOnlyError: "READONLY",
             redis.exceptions.BusyLoadingError: "LOADING"}
    for cls, name in names.items():
        if isinstance(e, cls):
            return name
    if isinstance(e, redis.exceptions.ExecAbortError) or code == "EXECABORT":
        for word in str(e).replace(":", " ").split():
            if word.strip(".-") in REFUSALS:
                return word.strip(".-")
    return None


def refusal_line(e: BaseException) -> str:
    """``"is out of memory (...): <server text>"`` for a refusal."""
    code = refusal_code(e)
    return f"{REFUSALS.get(code, 'refused the command')}: {code} {_short(e).removeprefix(code or '').strip()}"


def is_transient(e: BaseException) -> bool:
    """A lost connection, a timeout or a refusal (:func:`refusal_code`): retry. False for real errors
    (WRONGTYPE, syntax, NOSCRIPT ...), which must surface."""
    if refusal_code(e):
        return True
    if isinstance(e, redis.ResponseError):
        return False
    return isinstance(e, (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError))


def transient_line(e: BaseException) -> str:
    """One line naming a transient failure: ``refused (OOM ...)`` or ``unreachable (...)``."""
    return f"refused the command ({refusal_line(e)})" if refusal_code(e) else f"unreachable ({_short(e)})"


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s or type(e).__name__
