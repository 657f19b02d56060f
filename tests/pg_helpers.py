"""PostgreSQL for the shipping tests: the machine's server (127.0.0.1:5432, or $ARCHIVER_TEST_POSTGRES),
a database of each test's own, the central tables read back, and a TCP proxy that plays a network
that fails: it stops accepting, cuts every connection, or cuts one mid-stream."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SERVER = os.environ.get("ARCHIVER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
SHIPPED = ("sessions", "jobs", "favorites", "at_jobs", "status_history", "quarantine")
_reason: list[str] = []


def admin_url(database: str = "postgres") -> str:
    return f"{SERVER}/{database}"


def unavailable() -> str | None:
    """Why the tests cannot use PostgreSQL (None: they can)."""
    if _reason:
        return _reason[0] or None
    try:
        import psycopg

        with psycopg.connect(admin_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        _reason.append("")
    except Exception as exc:
        _reason.append(f"no PostgreSQL at {SERVER}: {str(exc).strip().splitlines()[0]}")
    return _reason[0] or None


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A database of the caller's own, dropped afterwards (with whatever still connects to it)."""
    import psycopg

    name = f"archiver_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def login_roles(owner_url: str, count: int, prefix: str = "host") -> Iterator[list[str]]:
    """``count`` login roles with only what PUBLIC has (and no PUBLIC access to the owner's
    database); dropped, with whatever they own, afterwards. Roles are the cluster's: random names."""
    import psycopg

    names = [f"{prefix}_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    database = owner_url.rsplit("/", 1)[1]
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
        for name in names:
            conn.execute(f"CREATE ROLE {name} LOGIN")
    try:
        yield names
    finally:
        with psycopg.connect(owner_url, autocommit=True) as conn:
            for name in names:
                conn.execute(f"DROP OWNED BY {name}")
                conn.execute(f"DROP ROLE {name}")


def pg_rows(
    url: str, table: str, source: str | None = None, schema: str = "desto_archiver", file_id: str | None = None
) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    clauses, params = [], []
    for column, value in (("source_name", source), ("file_id", file_id)):
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",)).fetchone()["to_regclass"] is None:
            return []  # the shipper has not created the central tables yet
        return list(conn.execute(f"SELECT * FROM {schema}.{table} {where}", params))


def _comparable(value: Any) -> Any:
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def file_rows(db_path: Path, table: str) -> dict[Any, dict[str, Any]]:
    """The file's rows of ``table`` by key, but for the status history and quarantine of records
    erased and not purged yet (an erasure reaches PostgreSQL before the daemon purges the file)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        numbered = table in ("status_history", "quarantine")
        key = (
            "id"
            if numbered
            else conn.execute(f"SELECT name FROM pragma_table_info('{table}') WHERE pk = 1").fetchone()[0]
        )
        where = (
            " WHERE NOT EXISTS (SELECT 1 FROM archiver_erased e WHERE e.kind = t.kind AND e.record_id = t.record_id)"
            if numbered
            else ""
        )
        return {r[key]: dict(r) for r in conn.execute(f"SELECT * FROM {table} t{where}")}
    finally:
        conn.close()


def central_differences(
    url: str, db_path: Path, source: str, schema: str = "desto_archiver", file_id: str | None = None
) -> list[str]:
    """How the central tables of ``source`` differ from the file, row for row and column for column;
    with ``file_id``, the numbered tables' rows of that file only (a host's earlier files keep theirs)."""
    import psycopg

    problems: list[str] = []
    for table in SHIPPED:
        mine = file_rows(db_path, table)
        numbered = table in ("status_history", "quarantine")
        key = "id" if numbered else next(iter(_key_of(table)))
        try:
            theirs = {r[key]: r for r in pg_rows(url, table, source, schema, file_id if numbered else None)}
        except psycopg.errors.UndefinedTable:  # the shipper has not created the central tables yet
            return [f"{schema}.{table} does not exist yet"]
        for k in mine.keys() - theirs.keys():
            problems.append(f"{table} {k}: in the file, not in PostgreSQL")
        for k in theirs.keys() - mine.keys():
            problems.append(f"{table} {k}: in PostgreSQL, not in the file")
        for k in mine.keys() & theirs.keys():
            for column, value in mine[k].items():
                if column in theirs[k] and _comparable(theirs[k][column]) != value:
                    problems.append(f"{table} {k}.{column}: file {value!r}, PostgreSQL {theirs[k][column]!r}")
    return problems


def _key_of(table: str) -> tuple[str]:
    return ({"sessions": "session_id", "jobs": "job_id", "favorites": "favorite_id", "at_jobs": "at_job_id"}[table],)


class Proxy:
    """A TCP proxy in front of PostgreSQL that a test can break: ``down()`` cuts every connection and
    refuses new ones until ``up()``; ``cut_after(n)`` drops the next connection that carries more
    than n bytes from the client, in the middle of its stream."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepting = True
        self._cut_after: int | None = None
        self.cuts = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="pg-proxy", daemon=True).start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def down(self) -> None:
        self.accepting = False
        self._drop_all()

    def up(self) -> None:
        self.accepting = True

    def cut_after(self, nbytes: int) -> None:
        self._cut_after = nbytes

    def close(self) -> None:
        self._closed = True
        self.accepting = False
        with contextlib.suppress(OSError):
            self.listener.close()
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            budget = [self._cut_after]
            self._cut_after = None
            threading.Thread(target=self._pump, args=(client, upstream, budget), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, [None]), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, budget: list[int | None]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget[0] is not None:
                    if len(data) >= budget[0]:
                        dst.sendall(data[: budget[0]])
                        self.cuts += 1
                        break
                    budget[0] -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def skip_without_postgres() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
