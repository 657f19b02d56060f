"""``python -m bench.erase_cost``: how big an archive grows, and what erasing in it costs.

Builds an archive of ``--sessions`` sessions, each with ``--jobs`` jobs, through the daemon's own
write path (``archiver.daemon.reconcile.write_batch``): every record read once running and once finished,
so each has the status history the daemon keeps (first sight, then the change). Then, on that file:

- its size per thousand sessions (with their jobs and history), WAL emptied;
- desto's History tab deleting one session on a connection that does not overwrite what it
  deletes (SQLite built without SECURE_DELETE), and the archiver finishing it: the scrub of every
  page, while desto's own store saves a session every 20 ms (with desto's 30 s wait for the
  lock): how long it takes, its longest hold of the write lock, desto's longest save and failures;
- the same desto saving during a VACUUM of the file (what ``prune --vacuum`` runs, and the
  scrub was before): how long desto's saves wait, and whether they fail;
- the same deletion on a connection that does overwrite (Debian's and Ubuntu's SQLite): the WAL
  started over;
- ``forget`` of one session;
- retention erasing half the archive in transactions of 500 records, then giving the space back
  in steps of 256 pages: the total, and the longest transaction (the longest desto's writes wait);
- desto's Clear History of the rest, with the erasure triggers and, on a copy, without them.

    .venv/bin/python -m bench.erase_cost --sessions 100000
    .venv/bin/python -m bench.erase_cost --sessions 1000000 --scrub-only   # 2.8 GB: the scrubs only
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from archiver.archive import erase
from archiver.archive.store import Store
from archiver.daemon.reconcile import write_batch
from archiver.keys import classify
from archiver.models import Fetched, Outcome, iso_utc, normalize
from bench.records import DESTO_TTL_SECONDS, record_id
from tests.helpers import job_hash, session_hash

_TTL_MS = DESTO_TTL_SECONDS * 1000
_STAMP = "2026-11-27T05:00:00.123456"


def _fetched(key: bytes, record: dict[str, str], at_us: int) -> Outcome:
    flat = [part.encode() for pair in record.items() for part in pair]
    return normalize(classify(key), Fetched(key, "hash", flat, _TTL_MS, at_us, at_us))  # type: ignore[arg-type]


def _records(start: int, count: int, jobs: int, status: str, at_us: int) -> list[Outcome]:
    out: list[Outcome] = []
    for i in range(start, start + count):
        sid = record_id(i, "5e55").decode()
        job_ids = [record_id(i * jobs + j, "j0b5").decode() for j in range(jobs)]
        session = session_hash(sid, status=status, start_time=_STAMP, last_heartbeat=_STAMP, job_ids=",".join(job_ids))
        out.append(_fetched(f"desto:session:{sid}".encode(), session, at_us))
        for n, jid in enumerate(job_ids):
            command = f"bash /app/desto_scripts/job-{n}.sh --target host-{i % 97} --retries 3"
            job = job_hash(jid, sid, status=status, command=command, start_time=_STAMP)
            out.append(_fetched(f"desto:job:{jid}".encode(), job, at_us))
    return out


@contextmanager
def _timed_transactions(store: Store, spans: list[float]) -> Iterator[None]:
    """Each write transaction's time (BEGIN IMMEDIATE to COMMIT): what desto's writes wait at most."""
    original = store._transaction

    @contextmanager
    def timed(commit: bool = True) -> Iterator[sqlite3.Connection]:
        started = time.perf_counter()
        with original(commit) as conn:
            yield conn
        spans.append(time.perf_counter() - started)

    store._transaction = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        store._transaction = original  # type: ignore[method-assign]


def _desto_delete(path: Path, session_index: int, secure_delete: bool) -> float:
    """desto 0.7.0's delete_session, statement for statement, on a connection of its own; without
    ``secure_delete``, as on a SQLite built without SECURE_DELETE (its compile options say so)."""
    sid = record_id(session_index, "5e55").decode()
    conn = sqlite3.connect(path, timeout=30)
    conn.execute(f"PRAGMA secure_delete = {'ON' if secure_delete else 'OFF'}")
    compiled = {row[0] for row in conn.execute("PRAGMA compile_options")} - {"SECURE_DELETE"}
    if secure_delete:
        compiled.add("SECURE_DELETE")
    conn.create_function("sqlite_compileoption_used", 1, lambda option: int(option in compiled))
    started = time.perf_counter()
    conn.execute("DELETE FROM jobs WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
    conn.commit()
    took = time.perf_counter() - started
    conn.close()
    return took


@contextmanager
def _desto_saving(path: Path, every_s: float = 0.02) -> Iterator[dict[str, Any]]:
    """desto 0.7.0's own store saving a session every ``every_s`` on a thread of its own, with
    desto's own wait for the lock (30 s); yields its figures: saves, failures, the longest."""
    from desto.redis import SQLiteStore
    from desto.redis.models import DestoSession, SessionStatus

    figures: dict[str, Any] = {"saves": 0, "failed": 0, "longest_s": 0.0}
    stop = threading.Event()

    def save() -> None:
        desto = SQLiteStore(db_path=str(path))
        while not stop.wait(every_s):
            sid = str(uuid.uuid4())
            started = time.perf_counter()
            ok = desto.save_session(DestoSession(session_id=sid, session_name="bench", status=SessionStatus.RUNNING))
            figures["longest_s"] = max(figures["longest_s"], time.perf_counter() - started)
            figures["saves" if ok else "failed"] += 1
        desto.close()

    thread = threading.Thread(target=save, name="desto-saving", daemon=True)
    thread.start()
    try:
        yield figures
    finally:
        stop.set()
        thread.join()


def measure(
    path: Path, sessions: int, jobs: int, per_transaction: int = 2000, scrub_only: bool = False
) -> dict[str, Any]:
    store = Store.open(path)
    result: dict[str, Any] = {"sessions": sessions, "jobs_per_session": jobs}
    try:
        at = time.time_ns() // 1000
        started = time.perf_counter()
        for status in ("running", "finished"):
            at += 1_000_000
            for start in range(0, sessions, per_transaction):
                write_batch(store, _records(start, min(per_transaction, sessions - start), jobs, status, at))
        result["build_s"] = time.perf_counter() - started
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        size = erase.file_bytes(store.conn)
        result["file_bytes"] = size
        result["bytes_per_1000_sessions"] = size / sessions * 1000
        result["history_rows"] = store.conn.execute("SELECT count(*) FROM status_history").fetchone()[0]

        result["desto_delete_s"] = _desto_delete(path, 1, secure_delete=False)
        with _desto_saving(path) as desto:
            done = erase.finish(store)
        assert done is not None and done.scrub == "pages" and done.scrub_done
        result["finish_without_secure_delete"] = {**done.as_dict(), "desto": desto}

        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        with _desto_saving(path) as desto:
            started = time.perf_counter()
            erase.scrub(store, "vacuum")
            vacuum_s = time.perf_counter() - started
        result["vacuum"] = {"seconds": vacuum_s, "desto": desto}
        if scrub_only:
            return result

        result["desto_delete_secure_s"] = _desto_delete(path, 2, secure_delete=True)
        done = erase.finish(store)
        assert done is not None and done.scrub == "truncate"
        result["finish_with_secure_delete"] = done.as_dict()

        started = time.perf_counter()
        targets, _ = erase.resolve(store.conn, [record_id(3, "5e55").decode()], [])
        forgotten = erase.forget(store, targets)
        result["forget_one_session_s"] = time.perf_counter() - started
        result["forget"] = forgotten.as_dict()

        # the older half of the archive left Redis 100 days ago
        old = iso_utc(at - 100 * 86_400 * 1_000_000)
        with store.transaction() as conn:
            for table in ("sessions", "jobs"):
                conn.execute(
                    f"UPDATE {table} SET gone_at = ?, gone_reason = 'expired' WHERE rowid <= ?",
                    (old, sessions // 2 * (1 if table == "sessions" else jobs)),
                )
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        spans: list[float] = []
        with _timed_transactions(store, spans):
            pruned = erase.prune(store, at - 90 * 86_400 * 1_000_000, batch=500)
        result["prune_half"] = pruned.as_dict()
        result["prune_transactions"] = len(spans)
        result["prune_longest_transaction_s"] = max(spans, default=0.0)
    finally:
        store.close()
    if not scrub_only:
        result.update(_clear_history(path))
    return result


def _clear_history(path: Path) -> dict[str, Any]:
    """desto's Clear History of what is left, timed with the erasure triggers and, on a copy,
    without them: what noting each deleted row costs desto's own transaction."""
    bare = path.with_name("without-triggers.db")
    source, copy = sqlite3.connect(path), sqlite3.connect(bare)
    source.backup(copy)
    source.close()
    for table in ("sessions", "jobs", "favorites"):
        copy.execute(f"DROP TRIGGER archiver_erase_{table}")
    copy.commit()
    copy.close()
    out: dict[str, Any] = {}
    for name, file in (("clear_history_s", path), ("clear_history_without_triggers_s", bare)):
        conn = sqlite3.connect(file, timeout=30)
        out["clear_history_rows"] = sum(
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("sessions", "jobs")
        )
        started = time.perf_counter()
        conn.executescript("DELETE FROM jobs; DELETE FROM sessions;")  # desto's clear_sessions_and_jobs
        out[name] = time.perf_counter() - started
        conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.erase_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=2, help="jobs per session")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--scrub-only", action="store_true", help="the scrubs only: no forget, retention, Clear History"
    )
    parser.add_argument("--dir", type=Path, help="where to build the archive (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="erase-cost-", dir=args.dir) as folder:
        r = measure(Path(folder) / "desto.db", args.sessions, args.jobs, scrub_only=args.scrub_only)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    mb = r["file_bytes"] / 1e6
    print(f"{r['sessions']:,} sessions with {r['jobs_per_session']} jobs each, {r['history_rows']:,} history rows:")
    per_1000 = r["bytes_per_1000_sessions"] / 1e6
    print(f"  file {mb:.1f} MB: {per_1000:.2f} MB per 1,000 sessions (built in {r['build_s']:.1f} s)")
    no_sd, vacuum = r["finish_without_secure_delete"], r["vacuum"]
    pages, desto = no_sd["scrub_pages"], no_sd["desto"]
    print(f"  desto deletes one session, no secure_delete: {r['desto_delete_s'] * 1000:.1f} ms; the archiver's "
          f"scrub of every page: {no_sd['scrub_s']:.1f} s in {pages['transactions']:,} transactions, the longest "
          f"holding the lock {pages['longest_lock_ms']:.1f} ms; desto saving meanwhile: {desto['saves']:,} saves, "
          f"the longest {desto['longest_s'] * 1000:.0f} ms, {desto['failed']} failed")  # fmt: skip
    desto = vacuum["desto"]
    print(f"  a VACUUM instead: {vacuum['seconds']:.1f} s holding the lock; desto saving meanwhile: "
          f"{desto['saves']:,} saves, the longest {desto['longest_s']:.1f} s, {desto['failed']} failed")  # fmt: skip
    if args.scrub_only:
        return 0
    sd = r["finish_with_secure_delete"]
    print(f"  desto deletes one session with secure_delete: {r['desto_delete_secure_s'] * 1000:.1f} ms; "
          f"the archiver's WAL restart: {sd['scrub_s'] * 1000:.1f} ms")  # fmt: skip
    print(f"  forget one session: {r['forget_one_session_s'] * 1000:.1f} ms")
    p = r["prune_half"]
    print(
        f"  retention erasing half ({sum(p['records'].values()):,} records, {p['history']:,} history rows): "
        f"{p['seconds']:.1f} s in {r['prune_transactions']} transactions, the longest "
        f"{r['prune_longest_transaction_s'] * 1000:.0f} ms; file {p['bytes_before'] / 1e6:.1f} -> "
        f"{p['bytes_after'] / 1e6:.1f} MB"
    )
    print(
        f"  desto's Clear History of the {r['clear_history_rows']:,} rows left: {r['clear_history_s']:.2f} s "
        f"({r['clear_history_without_triggers_s']:.2f} s without the erasure triggers)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
