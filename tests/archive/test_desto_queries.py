"""desto's History tab reads the archive through its own ``SQLiteStore``: every query it runs there
must be answered from an index, in the order the tab asks for, and never by sorting the whole
table. The statements are the ones desto itself sends (caught with SQLite's trace callback), so a
change in desto's queries, or in the archive's indexes, shows here; what they cost at a million
sessions is measured by ``python -m bench desto_tab``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from desto.redis import SQLiteStore

from archiver.archive.schema import DESTO_READ_INDEXES
from archiver.archive.store import Store

STATUSES = ("finished", "failed", "running")


def _archive(path: Path) -> None:
    Store.open(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO sessions (session_id, session_name, status, created_at) VALUES (?, ?, ?, ?)",
            [(f"s{n:05d}", f"train-{n % 50}", STATUSES[n % 3], f"2026-01-01 00:{n % 60:02d}:00") for n in range(600)],
        )
    conn.close()


def _desto_statements(path: Path) -> list[str]:
    """What desto's store sends for each page and count its History tab shows."""
    store = SQLiteStore(str(path))
    sent: list[str] = []
    store._get_connection().set_trace_callback(sent.append)
    pages = [
        store.get_all_sessions(limit=20),
        store.get_all_sessions(limit=20, offset=400),
        store.get_all_sessions(status="failed", limit=20),
        store.get_all_sessions(status="failed", limit=20, offset=100),
        store.search_sessions("train-1", limit=20),
        store.search_sessions("train-1", limit=20, status="failed"),
    ]
    counts = [store.get_session_count(), store.get_session_count("failed")]
    store.close()
    assert [len(p) for p in pages] == [20, 20, 20, 20, 20, 20] and counts == [600, 200]
    return [s for s in sent if s.lstrip().upper().startswith("SELECT")]


def _plan(path: Path, statement: str) -> list[str]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + statement)]
    finally:
        conn.close()


def test_every_query_of_desto_s_history_tab_reads_an_index_in_order(tmp_path: Path) -> None:
    db = tmp_path / "desto.db"
    _archive(db)
    statements = _desto_statements(db)
    assert len(statements) == 8, statements
    ours = {name for name, _ in DESTO_READ_INDEXES}
    for statement in statements:
        plan = _plan(db, statement)
        shown = f"{statement}\n  " + "\n  ".join(plan)
        assert not any("TEMP B-TREE" in step for step in plan), f"sorts the whole table:\n{shown}"
        assert not any(step.strip() == "SCAN sessions" for step in plan), f"reads every row:\n{shown}"
        if "ORDER BY created_at" in statement:
            assert any(name in step for step in plan for name in ours), f"not by the archive's indexes:\n{shown}"


def test_the_indexes_come_with_the_migration_into_a_file_desto_created(tmp_path: Path) -> None:
    """A file desto's store made first (SQLITE_ENABLED=true) gets them when the archiver opens it."""
    db = tmp_path / "desto.db"
    SQLiteStore(str(db)).close()
    Store.open(db).close()
    conn = sqlite3.connect(db)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert {name for name, _ in DESTO_READ_INDEXES} <= names
