"""Liveness for supervisors: ``desto-archiver health`` (Docker's HEALTHCHECK) and the systemd
notify protocol (``Type=notify``: READY, WATCHDOG, STATUS, STOPPING)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from archiver.archive.reader import Reader
from archiver.config import Settings
from archiver.redis_side.read_clock import now_us
from archiver.redis_side.redis_client import CONNECTION_ERRORS
from archiver.redis_side.source import Source


def health(settings: Settings) -> tuple[bool, str]:
    """Healthy when the daemon writing the file is alive (a recent heartbeat, connected to Redis,
    not failing) and Redis answers this process too. Returns (healthy, one-line reason)."""
    try:
        reader = Reader.open(settings.db_path)
    except Exception as exc:
        return False, str(exc)
    with reader:
        state = reader.state()
    beat: dict[str, Any] | None = json.loads(state.get("heartbeat") or "null")
    if not beat:
        return False, f"no daemon has written a heartbeat in {settings.db_path}"
    at_us = int(beat["at_us"])
    age = (now_us() - at_us) / 1e6
    limit = max(3 * settings.heartbeat_interval, 15.0)
    if int(state.get("stopped_at") or 0) > at_us:
        return False, "the daemon has stopped"
    if age > limit:
        return False, f"no heartbeat for {age:.0f} s (limit {limit:.0f} s): the daemon is not running or is stuck"
    if not beat.get("subscribed"):
        return False, "the daemon is not connected to Redis"
    if beat.get("failing"):
        return False, f"the daemon's {beat['failing']} operations are failing: see its log"
    source = Source(settings)
    try:
        source.ping()
    except CONNECTION_ERRORS as exc:
        return False, f"Redis at {settings.redis_address()} does not answer: {exc}"
    finally:
        source.close()
    return True, f"ok: pid {beat.get('pid')}, heartbeat {age:.1f} s ago, {beat.get('pending', 0)} pending"


class Notifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET; a no-op when it is unset."""

    def __init__(self, address: str | None = None, watchdog_usec: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = ("\0" + address[1:]) if address and address.startswith("@") else address
        usec = watchdog_usec if watchdog_usec is not None else os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        # systemd advises pinging at half the interval
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() and mine else None
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None or self._address is None:
            return
        # the supervisor gone or busy must never stop the archiving
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: flushing pending changes")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
