"""Connections to Redis, and what their errors mean: a client that fails fast (the archiver's
loops own retries), and the errors that mean Redis cannot be used right now, with what to do.

Replies stay bytes (``decode_responses=False``): desto's values are text, but a hostile or broken
value must reach the quarantine byte for byte, and key names may be any bytes.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, NoPermissionError, ResponseError, TryAgainError
from redis.retry import Retry

from archiver.config import Settings
from archiver.log import get_logger

log = get_logger("archiver.redis_side.redis_client")

# Errors that mean "Redis cannot be used right now": not reachable, or a permission the user lacks
# (granted later, without a restart). Retried, never fatal: a daemon that exited on them would be
# restarted into the same error over and over. redis-py turns socket errors into its own; the
# subscription's raw reads do the same. Any other OSError (a file, a bug) is not Redis' and must
# not be retried as if it were.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    NoPermissionError,
)

# Replies with which Redis says it cannot serve for a moment: another client's script or function
# runs past busy-reply-threshold (BUSY), it loads its data set (LOADING: redis-py raises
# BusyLoadingError, a ConnectionError), a replica lost its master (MASTERDOWN), a cluster moves or
# lost a slot (TRYAGAIN, CLUSTERDOWN). Retried as an outage is, with backoff.
TRANSIENT_REPLIES = ("BUSY ", "LOADING ", "MASTERDOWN ", "TRYAGAIN ", "CLUSTERDOWN ")
# ... as redis-py raises those it knows, their code cut from the message (ClusterDownError: also
# MasterDownError).
_TRANSIENT_CLASSES = (ClusterDownError, TryAgainError)
# What a retry loop catches: these, and any reply error, of which ``retryable`` tells the transient.
REDIS_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, ResponseError)


def transient_reply(exc: BaseException) -> bool:
    """Redis answered with an error that says it cannot serve for now (TRANSIENT_REPLIES)."""
    return isinstance(exc, _TRANSIENT_CLASSES) or (
        isinstance(exc, ResponseError) and str(exc).startswith(TRANSIENT_REPLIES)
    )


def retryable(exc: BaseException) -> bool:
    """Redis cannot be used right now: retried with backoff, never fatal."""
    return isinstance(exc, CONNECTION_ERRORS) or transient_reply(exc)


def unreachable_advice(exc: BaseException, retried: bool = True) -> str:
    """What to do when Redis cannot be used, for people: a refused login is not a Redis that is down.
    ``retried``: the daemon tries again by itself; a command ends, and is run again by its user."""
    if isinstance(exc, redis.AuthenticationError):
        return (
            "Redis wants a password, or refused the one given: set REDIS_PASSWORD (and REDIS_USERNAME for an "
            "ACL user), or give them in REDIS_URL as redis://user:password@host:port/db"
        )
    if isinstance(exc, NoPermissionError) or "NOPERM" in str(exc):  # the listener's come as ConnectionError
        return "grant the Redis user what the archiver needs: docs/deployment.md, 'With a Redis ACL user'"
    if str(exc).startswith("BUSY "):
        return (
            "another client's script or function runs longer than Redis' busy-reply-threshold: "
            + ("retried until it ends" if retried else "run the command again once it ends")
            + " (SCRIPT KILL or FUNCTION KILL ends one that does not write)"
        )
    if transient_reply(exc) or isinstance(exc, redis.BusyLoadingError):
        return "Redis cannot serve for now (loading its data, or a replica without its master): " + (
            "retried until it can" if retried else "run the command again once it can"
        )
    return "is Redis running? Set REDIS_HOST/REDIS_PORT/REDIS_DB or REDIS_URL (or --redis-url)"


def log_unreachable(settings: Settings, exc: BaseException) -> None:
    """``redis.unreachable``: the first failure to reach Redis, with what to do about it."""
    log.warning("redis.unreachable", error=str(exc), address=settings.redis_address(), action=unreachable_advice(exc))


def make_client(settings: Settings, name: str) -> redis.Redis:
    """A client that fails fast (no hidden retries): the archiver's loops own retry and backoff."""
    kwargs = settings.redis_kwargs()
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "client_name": name,
        "decode_responses": False,
    }
    url = kwargs.pop("url", None)
    if url is None or not url.startswith("unix://"):
        options["socket_keepalive"] = True  # TCP only: redis-py's unix socket connection refuses it
    if url is not None:
        return redis.Redis.from_url(url, **kwargs, **options)
    return redis.Redis(**kwargs, **options)
