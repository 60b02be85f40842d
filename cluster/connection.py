"""Connecting to Redis: URL from a flag or ``SPECDIT_REDIS_URL``, password from ``SPECDIT_REDIS_PASSWORD``
(or inside the URL). Defaults to localhost."""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import redis

from cluster.errors import RedisUnavailable

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
            raise RedisUnavailable(f"Redis at {redact(url)} answered with an error: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {_short(e)}") from None
    return client


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s or type(e).__name__
