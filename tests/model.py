"""The world the model-based test drives, and the model it keeps: what desto wrote, what a person
erased, which states of each record the archive may hold.

The world is real: a redis-server of its own (with its append-only file, so it can restart with or
without its data), the daemon as a process, desto 0.7.0's own managers writing Redis and its own
``SQLiteStore`` deleting from the archive (as its History tab does), the commands as a user runs
them, and PostgreSQL behind a proxy that can go away. The model is the oracle: it is built from
what the test did and what it read back from Redis, never from the code under test.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fault_helpers import DaemonProcess, entities, spawn_daemon
from tests.helpers import REPO, daemon_env, query, wait_for, write_lock_holder
from tests.redis_server import RedisServer

SOURCE = "model-host"
NEIGHBOUR = "neighbour-host"  # another host shipping into the same central database
SCHEMA = "desto_archiver"
TABLE_OF = {"session": "sessions", "job": "jobs", "favorite": "favorites", "atjob": "at_jobs"}
ID_OF = {"sessions": "session_id", "jobs": "job_id", "favorites": "favorite_id", "at_jobs": "at_job_id"}
PREFIX_OF = {"session": "desto:session:", "job": "desto:job:", "favorite": "desto:favorite:", "atjob": "desto:atjob:"}
CENTRAL_TABLES = ("sessions", "jobs", "favorites", "at_jobs", "status_history", "quarantine")


def marker() -> str:
    """A unique text put in one record's command line: the secret the test looks for everywhere."""
    return f"MARK{uuid.uuid4().hex[:16]}"


# ─── the model ───────────────────────────────────────────────────────────────────────────────────


@dataclass
class Record:
    """One record desto wrote, as the test knows it."""

    kind: str
    id: str
    marker: str | None = None  # the secret in its command line
    session: str | None = None  # a job's session
    name: str | None = None  # a session's or favorite's name
    states: list[Any] = field(default_factory=list)  # desto views the archive may hold (since the last settle)
    statuses: set[str] = field(default_factory=set)  # every status it ever had in Redis
    required: bool = False  # it was in Redis at a settle: the archive must keep it
    live: bool = True  # in Redis now
    bad: bool = False  # Redis holds a value desto cannot read: it belongs in quarantine

    @property
    def key(self) -> str:
        return PREFIX_OF[self.kind] + self.id

    @property
    def table(self) -> str:
        return TABLE_OF[self.kind]


@dataclass
class Erasure:
    at: float  # time.time() of the erasure
    how: str
    markers: set[str]


@dataclass
class Model:
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    erased: dict[tuple[str, str], Erasure] = field(default_factory=dict)

    def of(self, kind: str, *, live: bool | None = None, good: bool = True) -> list[Record]:
        """Records of ``kind`` not erased (live or not, as asked; readable by desto, unless not ``good``)."""
        return [
            r
            for (k, _), r in self.records.items()
            if k == kind
            and (k, r.id) not in self.erased
            and (live is None or r.live == live)
            and (not good or not r.bad)
        ]

    def jobs_of(self, session_id: str) -> list[Record]:
        return [r for (k, _), r in self.records.items() if k == "job" and r.session == session_id]

    def erase(self, records: list[Record], how: str) -> None:
        at = time.time()
        for rec in records:
            if (rec.kind, rec.id) not in self.erased:
                self.erased[(rec.kind, rec.id)] = Erasure(at, how, {rec.marker} if rec.marker else set())

    def lift(self, kind: str, record_id: str, noted_jobs: set[str]) -> None:
        """desto saved an erased record again: its erasure is lifted. A session's takes with it the
        erasures of those of its jobs the file has not noted on their own (``noted_jobs``: the
        file's notes of erased jobs): jobs the file never met (written after the session's
        erasure, or before it but not read yet), which the file erased only as the session's."""
        del self.erased[(kind, record_id)]
        if kind == "session":
            for job in self.jobs_of(record_id):
                if ("job", job.id) in self.erased and job.id not in noted_jobs:
                    del self.erased[("job", job.id)]

    def erase_session(self, session: Record, how: str) -> None:
        """A session erased by desto's delete or forget takes its jobs with it, also those the file
        never held (quarantined, or not read yet)."""
        self.erase([session, *self.jobs_of(session.id)], how)

    def session_erased(self, session_id: str | None) -> bool:
        return session_id is not None and ("session", session_id) in self.erased

    def markers_erased(self, before: float | None = None) -> set[str]:
        return {m for e in self.erased.values() if before is None or e.at < before for m in e.markers}

    def snapshot(self) -> Model:
        return copy.deepcopy(self)


def desto_view(kind: str, fields: dict[str, str]) -> Any:
    """desto's object from a hash (None: desto cannot read it)."""
    entity = next(e for e in entities() if e.prefix == PREFIX_OF[kind])
    try:
        return entity.from_redis(fields)
    except Exception:  # desto's from_dict raises on a value it cannot parse
        return None


def archived_view(kind: str, found: sqlite3.Row) -> Any:
    entity = next(e for e in entities() if e.prefix == PREFIX_OF[kind])
    return entity.from_row(found)


# ─── the world ───────────────────────────────────────────────────────────────────────────────────


class World:
    """The processes and files of one run; everything is stopped and removed by :meth:`close`."""

    def __init__(self, *, notifications: bool, postgres_url: str | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="archiver-model-"))
        self.db = self.dir / "desto_data" / "desto.db"
        self.db.parent.mkdir()
        self.notifications = notifications
        extra = [] if notifications else ["--rename-command", "CONFIG", ""]
        self.redis = RedisServer(self.dir / "redis", appendonly=True, extra=extra).start()
        self.client = self.redis.client()
        self.postgres_url = postgres_url  # through the proxy: PostgreSQL can go away
        self.shipping = False
        self.daemon: DaemonProcess | None = None
        self.daemons = 0
        self.backups: list[tuple[Path, float, Model]] = []

    # ─── the daemon ──────────────────────────────────────────────────────────────────────────

    def env(self) -> dict[str, str]:
        env = {
            "ARCHIVER_SOURCE_NAME": SOURCE,
            "ARCHIVER_SOCKET_TIMEOUT": "1",
            "ARCHIVER_RECONCILE_INTERVAL": "20",
            "ARCHIVER_FALLBACK_RECONCILE_INTERVAL": "1",
            "ARCHIVER_SHIP_INTERVAL": "0.1",
            "ARCHIVER_SHUTDOWN_TIMEOUT": "5",
            # A settle gives the daemon SETTLE_S once Redis and PostgreSQL are back: its longest wait
            # between two tries (30 s by default, reached after a minute of PostgreSQL away) must fit in it.
            "ARCHIVER_RECONNECT_MAX_BACKOFF": "5",
            "PYTHONFAULTHANDLER": "1",  # a crash (SIGSEGV, SIGBUS) prints every thread's stack into the log
        }
        if self.shipping and self.postgres_url is not None:
            env["ARCHIVER_POSTGRES_URL"] = self.postgres_url
        return env

    @property
    def running(self) -> bool:
        return self.daemon is not None and self.daemon.proc.poll() is None

    def start_daemon(self) -> None:
        assert self.daemon is None
        self.daemons += 1
        self.daemon = spawn_daemon(self.redis, self.db, self.dir / f"daemon-{self.daemons}.log", **self.env())
        try:
            self.daemon.wait_reconcile("start", timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- the daemons' logs ---\n{self.daemon_log()}") from None

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.close()  # SIGKILL
        self.daemon = None

    def stop_daemon(self) -> None:
        """SIGTERM: a clean stop (flush, commit, exit 0)."""
        assert self.daemon is not None
        self.daemon.signal(signal.SIGTERM)
        code = self.daemon.proc.wait(timeout=30)
        self.daemon.close()
        self.daemon = None
        assert code == 0, f"the daemon stopped with {code}"

    def daemon_log(self) -> str:
        logs = sorted(self.dir.glob("daemon-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        return "\n".join(f"[{p.name}]\n" + p.read_text(errors="replace")[-4000:] for p in logs)

    @contextmanager
    def daemon_paused(self) -> Iterator[None]:
        """The daemon stopped (SIGSTOP) at a moment it holds no write transaction, so that a person's
        action on the file (desto's History tab) and the test's look at the file around it see the
        same rows. Resumed afterwards."""
        daemon = self.daemon if self.running else None
        if daemon is None:
            yield
            return
        for _ in range(200):
            os.kill(daemon.pid, signal.SIGSTOP)
            if write_lock_holder(self.db) != daemon.pid:
                break
            os.kill(daemon.pid, signal.SIGCONT)
            time.sleep(0.01)
        else:
            raise AssertionError("the daemon never let go of the write lock")
        try:
            yield
        finally:
            os.kill(daemon.pid, signal.SIGCONT)

    # ─── Redis ───────────────────────────────────────────────────────────────────────────────

    def restart_redis(self, keep_data: bool) -> None:
        self.client.close()
        self.redis.stop()
        if not keep_data:
            for path in self.redis.dir.iterdir():
                if path.name != "redis.log":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.redis.start()
        self.client = self.redis.client()

    # ─── the commands ────────────────────────────────────────────────────────────────────────

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "archiver", *args],
            cwd=REPO,
            env=daemon_env(self.redis, self.db, **self.env()),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # ─── the files ───────────────────────────────────────────────────────────────────────────

    def files(self) -> list[Path]:
        """The archive and its WAL (what SQLite keeps beside it)."""
        return [p for p in (self.db, Path(f"{self.db}-wal")) if p.exists()]

    def grep(self, paths: list[Path], markers: set[str]) -> dict[str, list[str]]:
        """The markers found in each file, by grep in a subprocess: this process holds SQLite
        connections to the archive, whose POSIX locks closing a descriptor of its own would drop."""
        if not markers or not paths:
            return {}
        patterns = self.dir / "patterns"
        patterns.write_text("\n".join(sorted(markers)) + "\n")
        found: dict[str, list[str]] = {}
        for path in paths:
            proc = subprocess.run(
                ["grep", "-a", "-o", "-F", "-f", str(patterns), str(path)], capture_output=True, text=True, check=False
            )
            hits = sorted(set(proc.stdout.split()))
            if hits:
                found[str(path)] = hits
        return found

    def rows(self, table: str) -> dict[str, sqlite3.Row]:
        return {r[ID_OF[table]]: r for r in query(self.db, f"SELECT * FROM {table}")}

    def close(self) -> None:
        if self.daemon is not None:
            with suppress(Exception):
                self.daemon.close()
            self.daemon = None
        with suppress(Exception):
            self.client.close()
        self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def host_roles(owner_url: str, sources: list[str]) -> Iterator[list[str]]:
    """A login role per source, each allowed to write its own source's central rows (the owner's
    ``desto-archiver grant``); dropped afterwards."""
    from tests.pg_helpers import login_roles

    with login_roles(owner_url, len(sources), prefix="model") as names:
        for source, name in zip(sources, names, strict=True):
            done = subprocess.run(
                [sys.executable, "-m", "archiver", "grant", "--postgres-url", owner_url, "--source", source,
                 "--role", name],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        yield names


def file_state(db: Path) -> dict[str, str]:
    return {r["name"]: r["value"] for r in query(db, "SELECT name, value FROM archiver_state")}


def wait_quiet(predicate: Any, timeout: float, what: str) -> Any:
    return wait_for(predicate, timeout, interval=0.1, what=what)
