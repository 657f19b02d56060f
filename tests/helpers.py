"""Helpers shared by the tests: waiting with a deadline, a daemon in a thread or a process,
desto-shaped records, and reading the archive back."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from archiver.config import Settings, load_settings
from archiver.daemon.pipeline import Daemon
from archiver.kinds import RECORD_TABLES

REPO = Path(__file__).resolve().parent.parent


def script(name: str) -> ModuleType:
    """One of scripts/*.py, imported as a module (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_files() -> list[str]:
    """The project's own files, as a clone holds them: tracked, or new and not ignored (no .venv,
    no archive, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return [os.fsdecode(name) for name in listed if name]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (sqlite3.OperationalError, FileNotFoundError) as exc:  # the file may not exist yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what or predicate}"
        + (f" (last error: {last_error})" if last_error else "")
    )


def settings_for(server, db_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": server.url,
        "sqlite_db_path": db_path,
        "flush_interval": 0.02,
        "heartbeat_interval": 0.2,
        "health_check_interval": 2,
        "socket_timeout": 3,
        "reconnect_max_backoff": 0.5,
        "shutdown_timeout": 5,
        "log_format": "json",
    }
    values.update(overrides)
    return load_settings(**values)


@contextmanager
def daemon_thread(settings: Settings, ready_timeout: float = 15.0) -> Iterator[Daemon]:
    """Run the daemon in a thread; wait until it has subscribed and reconciled once."""
    daemon = Daemon(settings)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=target, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_for(lambda: daemon.ready.is_set() or errors, ready_timeout, what="daemon ready")
        if errors:
            raise errors[0]
        yield daemon
    finally:
        daemon.request_stop()
        thread.join(timeout=20)
        assert not thread.is_alive(), "daemon did not stop"
    if errors:
        raise errors[0]


def daemon_env(server, db_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "ARCHIVER_", "SQLITE_", "DESTO_"))}
    env.update(
        REDIS_URL=server.url,
        SQLITE_DB_PATH=str(db_path),
        ARCHIVER_FLUSH_INTERVAL="0.02",
        ARCHIVER_HEARTBEAT_INTERVAL="0.2",
        ARCHIVER_HEALTH_CHECK_INTERVAL="2",
        ARCHIVER_SOCKET_TIMEOUT="3",
        ARCHIVER_RECONNECT_MAX_BACKOFF="0.5",
        ARCHIVER_LOG_FORMAT="json",
        # the test machine may run the suite as root, which the daemon refuses unless told
        ARCHIVER_ALLOW_ROOT="true",
    )
    env.update(extra)
    return env


def log_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in log_path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def write_lock_holder(db_path: Path) -> int | None:
    """The pid holding SQLite's WAL write lock on ``db_path`` (byte 120 of the ``-shm`` file, taken
    by BEGIN IMMEDIATE and released at COMMIT or ROLLBACK), or None. Takes no lock itself, and
    opens no descriptor of the file: /proc/locks tells (closing a descriptor of the -shm would drop
    every POSIX lock this process's own SQLite connections hold on it)."""
    try:
        inode = os.stat(f"{db_path}-shm").st_ino
    except FileNotFoundError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _write_lock_holder_fcntl(db_path)
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[1] != "POSIX" or fields[3] != "WRITE":
            continue  # a lock of another kind, or a waiter ("->")
        start, end = int(fields[6]), fields[7]
        if int(fields[5].rsplit(":", 1)[1]) == inode and start <= 120 and (end == "EOF" or int(end) >= 120):
            return int(fields[4])
    return None


def _write_lock_holder_fcntl(db_path: Path) -> int | None:
    """Where there is no /proc/locks: a probe with F_GETLK (only from a process without SQLite
    connections to the file)."""
    try:
        fd = os.open(f"{db_path}-shm", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 120, 1, 0)
        lock_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    finally:
        os.close(fd)
    return None if lock_type == fcntl.F_UNLCK else pid


_LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
hold, gap = float(sys.argv[2]), float(sys.argv[3])
while True:
    conn.execute("BEGIN IMMEDIATE")
    time.sleep(hold)
    conn.execute("COMMIT")
    time.sleep(gap)
"""


@contextmanager
def lock_holder(db_path: Path, hold_s: float, gap_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """Another process taking the archive's write lock, holding it ``hold_s``, letting go of it
    for ``gap_s``, over and over; yielded once it holds the lock."""
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(db_path), str(hold_s), str(gap_s)])
    try:
        wait_for(lambda: write_lock_holder(db_path) == holder.pid, 10, interval=0.001, what="the lock holder")
        yield holder
        assert holder.poll() is None, "the lock holder stopped"
    finally:
        holder.kill()
        holder.wait(timeout=10)


# ─── desto-shaped records (desto 0.7.0's to_dict forms) ──────────────────────────────────────────


def now_iso() -> str:
    return datetime.now().isoformat()


def session_hash(session_id: str | None = None, **fields: str) -> dict[str, str]:
    sid = session_id or str(uuid.uuid4())
    record = {
        "session_id": sid,
        "session_name": f"s-{sid[:8]}",
        "tmux_session_name": f"s-{sid[:8]}",
        "status": "running",
        "start_time": now_iso(),
        "end_time": "",
        "last_heartbeat": now_iso(),
        "job_ids": "",
        "tmux_active": "True",
        "at_job_id": "",
    }
    record.update(fields)
    return record


def job_hash(job_id: str | None = None, session_id: str = "", **fields: str) -> dict[str, str]:
    jid = job_id or str(uuid.uuid4())
    record = {
        "job_id": jid,
        "session_id": session_id or str(uuid.uuid4()),
        "command": "bash run.sh",
        "script_path": "/app/desto_scripts/run.sh",
        "status": "running",
        "start_time": now_iso(),
        "end_time": "",
        "exit_code": "",
        "error_message": "",
    }
    record.update(fields)
    return record


def favorite_hash(favorite_id: str | None = None, **fields: str) -> dict[str, str]:
    fid = favorite_id or str(uuid.uuid4())
    record = {
        "favorite_id": fid,
        "name": f"fav-{fid[:8]}",
        "command": "ls -la",
        "created_at": now_iso(),
        "last_used_at": "",
        "use_count": "0",
    }
    record.update(fields)
    return record


def atjob_hash(number: str = "7", **fields: str) -> dict[str, str]:
    record = {
        "job_id": number,
        "command": "tmux new-session -d -s nightly 'bash nightly.sh'",
        "request_time": now_iso(),
        "scheduled_time": "2026-12-01T03:00:00",
        "user": "desto",
        "status": "scheduled",
        "creation_time": now_iso(),
        "queue": "a",
        "session_name": "nightly",
        "script_path": json.dumps(["/app/desto_scripts/nightly.sh"]),
        "arguments": "",
        "error_message": "",
        "execution_result": "",
    }
    record.update(fields)
    return record


# ─── reading the archive back ────────────────────────────────────────────────────────────────────


def integrity(db_path: Path) -> str:
    """``PRAGMA integrity_check`` of the archive: ``ok`` when it is whole."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def row(db_path: Path, table: str, id_col: str, record_id: str) -> sqlite3.Row | None:
    rows = query(db_path, f"SELECT * FROM {table} WHERE {id_col} = ?", (record_id,))
    return rows[0] if rows else None


def count(db_path: Path, table: str, where: str = "1", params: tuple[Any, ...] = ()) -> int:
    return int(query(db_path, f"SELECT count(*) FROM {table} WHERE {where}", params)[0][0])


def move_versions_ahead(db_path: Path, seconds: int) -> None:
    """Move every archived read's version, and the file's note of the newest, ``seconds`` ahead:
    the file as reads made while Redis' clock ran that much fast leave it. Nothing may be writing it."""
    conn = sqlite3.connect(db_path)
    try:
        for table in RECORD_TABLES:
            conn.execute(
                f"UPDATE {table} SET read_at_us = read_at_us + ? WHERE read_at_us IS NOT NULL", (seconds * 10**6,)
            )
        moved = conn.execute(
            "UPDATE archiver_state SET value = CAST(value AS INTEGER) + ? WHERE name = 'newest_read_us'",
            (seconds * 10**6,),
        ).rowcount
        assert moved == 1, "the file has no note of its newest version"
        conn.commit()
    finally:
        conn.close()


def damage_pages(db_path: Path, first: int, count: int = 1) -> None:
    """Overwrite ``count`` pages of the file from page ``first`` (1-based) with garbage, as a failing
    disk or a stray write would. Nothing may have the file open."""
    page_size = int(query(db_path, "PRAGMA page_size")[0][0])
    with open(db_path, "r+b") as f:
        f.seek((first - 1) * page_size)
        f.write(b"\xde\xad\xbe\xef" * (page_size // 4) * count)
