"""desto-shaped records as raw RESP commands, and a bare Redis connection that pipelines them.

The shapes come from ``tests.helpers`` (desto 0.7.0's ``to_dict`` forms). Building each hash
through redis-py costs several microseconds per command, which would make the load generator
the bottleneck at tens of thousands of changes per second; instead each kind is packed once
into a RESP template whose variable parts (ids, times) have a fixed length and are filled in
with one bytes ``%`` per command.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from datetime import datetime

from tests.helpers import job_hash, session_hash

DESTO_TTL_SECONDS = 7 * 86400
_ID = "I" * 36  # placeholder of a uuid4-long id
_OTHER_ID = "O" * 36
_TIME = "T" * 26  # placeholder of datetime.isoformat(timespec="microseconds")


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _hset(key: str, mapping: dict[str, str]) -> bytes:
    args = [b"HSET", key.encode()]
    for name, value in mapping.items():
        args += [name.encode(), value.encode()]
    return _resp(*args)


def _template(packed: bytes) -> bytes:
    out = packed.replace(b"%", b"%%").replace(_ID.encode(), b"%(id)b").replace(_OTHER_ID.encode(), b"%(other)b")
    return out.replace(_ID[:8].encode(), b"%(short)b").replace(_TIME.encode(), b"%(ts)b")


SESSION_TEMPLATE = _template(_hset(f"desto:session:{_ID}", session_hash(_ID, start_time=_TIME, last_heartbeat=_TIME)))
JOB_TEMPLATE = _template(_hset(f"desto:job:{_ID}", job_hash(_ID, session_id=_OTHER_ID, start_time=_TIME)))
_EXPIRE = b"*3\r\n$6\r\nEXPIRE\r\n$%d\r\n%b\r\n$6\r\n" + str(DESTO_TTL_SECONDS).encode() + b"\r\n"


def record_id(i: int, tag: str) -> bytes:
    """A uuid4-shaped id, distinct per ``i`` and per ``tag`` (4 hex digits). Its first group is
    ``i`` scrambled by a bijection of 32 bits, so ids sort in a pseudo-random order, as desto's
    uuid4 ids do: consecutive records land at random places of SQLite's indexes, not at their end."""
    return b"%08x-%b-4000-8000-%012x" % ((i * 0x9E3779B1) & 0xFFFFFFFF, tag.encode(), i)


def iso_now(wall: float | None = None) -> bytes:
    """desto's time form (naive local ISO), always with microseconds so its length is fixed."""
    return datetime.fromtimestamp(time.time() if wall is None else wall).isoformat(timespec="microseconds").encode()


def session_command(rid: bytes, ts: bytes) -> bytes:
    return SESSION_TEMPLATE % {b"id": rid, b"short": rid[:8], b"ts": ts}


def job_command(rid: bytes, session_rid: bytes, ts: bytes) -> bytes:
    return JOB_TEMPLATE % {b"id": rid, b"other": session_rid, b"short": rid[:8], b"ts": ts}


def session_key(rid: bytes) -> bytes:
    return b"desto:session:" + rid


def job_key(rid: bytes) -> bytes:
    return b"desto:job:" + rid


def expire_command(key: bytes) -> bytes:
    return _EXPIRE % (len(key), key)


class RawRedis:
    """One plain TCP connection: send a pipeline of packed commands, count the replies."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pipeline(self, commands: Iterable[bytes], count: int) -> None:
        """Send ``count`` commands at once and wait for their replies (integer or status replies
        only: every command used here answers on one line). Raises on an error reply."""
        self.sock.sendall(b"".join(commands))
        lines = 0
        while lines < count:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            if b"-" in chunk:
                raise RuntimeError(f"Redis answered with an error: {chunk[:200]!r}")
            lines += chunk.count(b"\r\n")


def load_records(port: int, start: int, count: int, tag: str, *, jobs: bool, ttl: bool, batch: int = 1000) -> None:
    """Write ``count`` records numbered from ``start``: sessions, or alternately sessions and jobs
    (``jobs``), each with desto's 7-day TTL when ``ttl``."""
    ts = iso_now()
    with RawRedis(port) as conn:
        for first in range(start, start + count, batch):
            commands = []
            for i in range(first, min(first + batch, start + count)):
                rid = record_id(i, tag)
                if jobs and i % 2:
                    commands.append(job_command(rid, record_id(i - 1, tag), ts))
                    key = job_key(rid)
                else:
                    commands.append(session_command(rid, ts))
                    key = session_key(rid)
                if ttl:
                    commands.append(expire_command(key))
            conn.pipeline(commands, len(commands))
