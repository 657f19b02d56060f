"""Deletions that stick: what desto's History tab deletes (desto 0.7.0's own SQLiteStore, on its own
connection) stays deleted whatever the archiver meets in Redis afterwards, its history and quarantine
entries go, and its bytes leave the file. Also ``forget``, ``prune`` and the retention setting."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from desto.redis import SQLiteStore
from desto.redis.models import DestoJob, DestoSession, FavoriteCommand, SessionStatus

from archiver.archive import schema
from archiver.archive.store import Batch, Store
from archiver.commands.backfill import backfill
from archiver.keys import record_key
from archiver.kinds import Kind
from archiver.models import iso_utc
from tests.archive.test_store import T0, read
from tests.commands.test_commands import cli
from tests.helpers import (
    atjob_hash,
    count,
    daemon_thread,
    favorite_hash,
    integrity,
    job_hash,
    query,
    row,
    session_hash,
    settings_for,
    wait_for,
)

MARKER = "SECRET-TOKEN-7f3c9a51e2"


def erasures(db_path: Path) -> dict[tuple[str, str], str]:
    """(kind, id) -> how, for every erasure the file notes."""
    return {(r[0], r[1]): r[2] for r in query(db_path, "SELECT kind, record_id, how FROM archiver_erased")}


def desto_store(db_path: Path, secure_delete: bool | None = None) -> SQLiteStore:
    """desto's own store on the shared file. ``secure_delete``: as a SQLite built with (True) or
    without (False) SECURE_DELETE deletes (desto never sets it); None leaves this machine's. A
    build without it is played by its setting off and its compile options saying so."""
    store = SQLiteStore(db_path=str(db_path))
    if secure_delete is not None:
        conn = store._get_connection()
        conn.execute(f"PRAGMA secure_delete = {'ON' if secure_delete else 'OFF'}")
        built = sqlite3.connect(":memory:")
        compiled = [row[0] for row in built.execute("PRAGMA compile_options")]
        built.close()
        if not secure_delete:
            compiled = [option for option in compiled if option != "SECURE_DELETE"]
        conn.create_function("sqlite_compileoption_used", 1, lambda option: int(option in compiled))
    return store


def desto_session(session_id: str, name: str, status: SessionStatus = SessionStatus.FINISHED) -> DestoSession:
    return DestoSession(session_id=session_id, session_name=name, tmux_session_name=name, status=status)


# ─── which statements note an erasure: measured with real statements ─────────────────────────


def test_only_a_delete_by_desto_notes_an_erasure(db_path: Path) -> None:
    store = Store.open(db_path)
    desto = desto_store(db_path)
    try:
        s1, s2, fav = session_hash(), session_hash(), favorite_hash(name="deploy")
        j1 = job_hash(session_id=s1["session_id"])
        # the archiver's own writes: inserts, an update, a tombstone, a favorite's name freed
        store.apply(Batch([read(Kind.SESSION, s1["session_id"], s1, T0), read(Kind.JOB, j1["job_id"], j1, T0)]))
        store.apply(Batch([read(Kind.FAVORITE, fav["favorite_id"], fav, T0)]))
        store.apply(Batch([read(Kind.SESSION, s1["session_id"], {**s1, "status": "finished"}, T0 + 1)]))
        store.apply(Batch([read(Kind.JOB, j1["job_id"], None, T0 + 2)]))
        other = favorite_hash(name="deploy")
        store.apply(Batch([read(Kind.FAVORITE, other["favorite_id"], other, T0 + 3)]))
        # desto's upserts: an insert, then its ON CONFLICT DO UPDATE over an existing row
        desto.save_session(desto_session(s2["session_id"], "desto-saved", SessionStatus.RUNNING))
        desto.save_session(desto_session(s2["session_id"], "desto-saved", SessionStatus.FINISHED))
        desto.save_session(desto_session(s1["session_id"], "archived-then-desto-saved"))
        desto.save_job(DestoJob(job_id=j1["job_id"], session_id=s1["session_id"], command="x", script_path="y"))
        desto.save_favorite(FavoriteCommand(favorite_id=str(uuid.uuid4()), name="desto-fav", command="ls"))
        assert erasures(db_path) == {}

        # REPLACE deletes the old row as a side effect; delete triggers fire only under
        # recursive_triggers. Seen with a temp trigger (it may use temp tables), then the net result.
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("CREATE TEMP TABLE fired (n)")
        conn.execute("CREATE TEMP TRIGGER probe AFTER DELETE ON main.sessions BEGIN INSERT INTO fired VALUES (1); END")
        replace = "INSERT OR REPLACE INTO sessions (session_id, session_name) VALUES (?, 'replaced')"
        fired = []
        for recursive in ("OFF", "ON"):
            conn.execute(f"PRAGMA recursive_triggers = {recursive}")
            conn.execute(replace, (s2["session_id"],))
            fired.append(conn.execute("SELECT count(*) FROM fired").fetchone()[0])
        conn.close()
        assert fired == [0, 1], "REPLACE fires delete triggers under recursive_triggers only"
        assert erasures(db_path) == {}, "a REPLACE is not a deletion"
        assert row(db_path, "sessions", "session_id", s2["session_id"])["session_name"] == "replaced"

        # desto's four deletions (on a SQLite whose schema is not trusted, too)
        desto._get_connection().execute("PRAGMA trusted_schema = OFF")
        assert desto.delete_favorite(fav["favorite_id"])
        assert desto.delete_session(s1["session_id"])
        assert erasures(db_path) == {
            ("favorite", fav["favorite_id"]): "desto",
            ("session", s1["session_id"]): "desto",
            ("job", j1["job_id"]): "desto",
        }
        assert desto.clear_sessions_and_jobs()
        assert ("session", s2["session_id"]) in erasures(db_path)
        assert desto.clear_all()
        assert ("favorite", other["favorite_id"]) in erasures(db_path)
        assert count(db_path, "favorites") == count(db_path, "sessions") == count(db_path, "jobs") == 0
    finally:
        desto.close()
        store.close()


def test_only_desto_s_writes_by_a_sqlite_that_does_not_overwrite_note_the_file_unzeroed(db_path: Path) -> None:
    def unzeroed() -> bool:
        return count(db_path, "archiver_state", "name = 'written_unzeroed'") == 1

    store = Store.open(db_path)
    # the archiver's connection as on a SQLite built without SECURE_DELETE: it overwrites anyway
    store.conn.create_function("sqlite_compileoption_used", 1, lambda option: 0)
    overwriting, not_overwriting = desto_store(db_path, secure_delete=True), desto_store(db_path, secure_delete=False)
    untrusting = desto_store(db_path)
    untrusting._get_connection().execute("PRAGMA trusted_schema = OFF")
    try:
        s, fav = session_hash(), favorite_hash()
        j = job_hash(session_id=s["session_id"])
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0), read(Kind.JOB, j["job_id"], j, T0)]))
        store.apply(Batch([read(Kind.FAVORITE, fav["favorite_id"], fav, T0)]))
        store.apply(Batch([read(Kind.SESSION, s["session_id"], {**s, "status": "finished"}, T0 + 1)]))
        store.apply(Batch([read(Kind.JOB, j["job_id"], None, T0 + 2)]))
        for desto in (overwriting, untrusting):
            assert desto.save_session(desto_session(s["session_id"], "by-desto"))
            assert desto.save_job(DestoJob(job_id=j["job_id"], session_id=s["session_id"], command="x"))
            assert desto.save_favorite(FavoriteCommand(favorite_id=str(uuid.uuid4()), name=str(uuid.uuid4())))
        assert not unzeroed()
        assert not_overwriting.save_session(desto_session(s["session_id"], "updated"))  # an update
        assert unzeroed()
        with store.transaction() as conn:
            conn.execute("DELETE FROM archiver_state WHERE name = 'written_unzeroed'")
        assert not_overwriting.save_job(DestoJob(session_id=s["session_id"], command="y"))  # an insert
        assert unzeroed()
        assert not_overwriting.save_job(DestoJob(session_id=s["session_id"], command="z"))  # noted once
        assert unzeroed()
    finally:
        for desto in (overwriting, not_overwriting, untrusting):
            desto.close()
        store.close()


def test_the_migration_works_on_a_file_desto_created_and_on_a_file_of_version_2(tmp_path: Path) -> None:
    by_desto = tmp_path / "desto" / "desto.db"
    desto = desto_store(by_desto)
    desto.save_session(desto_session("s1", "made-by-desto"))
    Store.open(by_desto).close()
    assert desto.delete_session("s1")
    desto.close()
    assert erasures(by_desto) == {("session", "s1"): "desto"}

    v2 = tmp_path / "v2" / "desto.db"
    v2.parent.mkdir()
    conn = sqlite3.connect(v2, isolation_level=None)
    schema._migrate_to_1(conn)
    schema._migrate_to_2(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO sessions (session_id, session_name, status, read_at_us) VALUES ('s2', 'old', 'finished', 1)"
    )
    conn.close()
    store = Store.open(v2)
    assert store.schema_found == 2
    store.close()
    assert query(v2, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION
    desto = desto_store(v2)
    assert desto.delete_session("s2")
    desto.close()
    assert erasures(v2) == {("session", "s2"): "desto"}


def test_erased_records_are_not_written_nor_quarantined_and_jobs_of_an_erased_session_neither(db_path: Path) -> None:
    store = Store.open(db_path)
    desto = desto_store(db_path)
    try:
        s = session_hash()
        j = job_hash(session_id=s["session_id"])
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0), read(Kind.JOB, j["job_id"], j, T0)]))
        assert desto.delete_session(s["session_id"])
        later = job_hash(session_id=s["session_id"])  # chained after the delete: the file never met it
        bad = {**j, "status": "exploded"}  # a state desto's readers refuse: quarantine, were it not erased
        result = store.apply(
            Batch(
                [
                    read(Kind.SESSION, s["session_id"], {**s, "status": "finished"}, T0 + 10),
                    read(Kind.JOB, later["job_id"], later, T0 + 10),
                    read(Kind.JOB, j["job_id"], bad, T0 + 10),
                ]
            )
        )
        assert result.erased == 3
        assert count(db_path, "sessions") == count(db_path, "jobs") == count(db_path, "quarantine") == 0
    finally:
        desto.close()
        store.close()


def test_a_session_pruned_by_retention_leaves_its_jobs_still_in_redis_to_be_archived(db_path: Path) -> None:
    """Retention erases each record by its own tombstone (its rule: jobs do not follow): a job of a
    pruned session that Redis still holds is archived, and quarantined when desto cannot read it,
    never dropped as if a person had deleted the session."""
    from archiver.archive import erase

    store = Store.open(db_path)
    try:
        s = session_hash()
        sid = s["session_id"]
        store.apply(Batch([read(Kind.SESSION, sid, s, T0)]))
        with store.transaction() as conn:
            conn.execute("UPDATE sessions SET gone_at = '2000-01-01T00:00:00.000000Z' WHERE session_id = ?", (sid,))
        assert erase.prune(store, int(datetime(2001, 1, 1).timestamp() * 1_000_000)).records == {"session": 1}
        good = job_hash(session_id=sid)
        bad = job_hash(session_id=sid, exit_code="exploded")
        result = store.apply(
            Batch([read(Kind.JOB, good["job_id"], good, T0 + 10), read(Kind.JOB, bad["job_id"], bad, T0 + 10)])
        )
        assert result.erased == 0
        assert count(db_path, "jobs") == 1 and count(db_path, "quarantine") == 1
        assert count(db_path, "sessions") == 0  # the pruned session itself stays erased
    finally:
        store.close()


def test_desto_deleting_a_session_erases_its_jobs_known_only_from_quarantine_or_its_job_list(db_path: Path) -> None:
    from archiver.archive import erase

    store = Store.open(db_path)
    desto = desto_store(db_path)
    try:
        s = session_hash()
        sid = s["session_id"]
        # a job desto's readers would refuse (its exit code): quarantined with its command line
        bad = job_hash(session_id=sid, command=f"deploy --token {MARKER}", exit_code="exploded")
        listed = str(uuid.uuid4())  # named by the session's job list, never read
        s["job_ids"] = f"{bad['job_id']},{listed}"
        unlisted = job_hash(session_id=sid, command=f"cleanup --token {MARKER}", exit_code="nan")  # chained later
        store.apply(Batch([read(Kind.SESSION, sid, s, T0), read(Kind.JOB, bad["job_id"], bad, T0)]))
        store.apply(Batch([read(Kind.JOB, unlisted["job_id"], unlisted, T0)]))
        assert count(db_path, "quarantine") == 2 and count(db_path, "jobs") == 0

        assert desto.delete_session(sid)
        finished = erase.finish(store)
        assert finished is not None and finished.scrub_done
        assert count(db_path, "quarantine") == 0
        assert erasures(db_path) == {
            ("session", sid): "desto",
            ("job", bad["job_id"]): "desto",
            ("job", listed): "desto",
            ("job", unlisted["job_id"]): "desto",
        }
        # later changes in Redis, still refused by desto's readers: never quarantined again
        again = store.apply(
            Batch(
                [
                    read(Kind.JOB, bad["job_id"], {**bad, "error_message": "retried"}, T0 + 10),
                    read(Kind.JOB, listed, job_hash(listed, sid, exit_code="x", command=MARKER), T0 + 10),
                    read(Kind.JOB, str(uuid.uuid4()), job_hash(session_id=sid, exit_code="x", command=MARKER), T0 + 10),
                ]
            )
        )
        assert again.erased == 3 and not again.quarantined
        assert count(db_path, "quarantine") == 0
        assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 0
    finally:
        desto.close()
        store.close()


def test_a_file_of_version_4_learns_the_session_of_each_quarantined_job(tmp_path: Path) -> None:
    from archiver.archive import erase
    from archiver.models import encode_resp

    v4 = tmp_path / "desto.db"
    conn = sqlite3.connect(v4, isolation_level=None)
    for version in (1, 2, 3, 4):
        schema.MIGRATIONS[version](conn)
    conn.execute("PRAGMA user_version = 4")
    s = session_hash()
    bad = job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER}", exit_code="exploded")
    conn.execute(
        "INSERT INTO sessions (session_id, session_name, status, read_at_us) VALUES (?, 'v4', 'finished', 1)",
        (s["session_id"],),
    )
    payload = encode_resp([part.encode() for pair in bad.items() for part in pair])
    conn.execute(
        "INSERT INTO quarantine (key, key_text, kind, record_id, redis_type, payload, payload_sha256, reason, "
        "first_seen_at, last_seen_at) VALUES (?, ?, 'job', ?, 'hash', ?, 'x', 'exit_code', 't', 't')",
        (f"desto:job:{bad['job_id']}".encode(), f"desto:job:{bad['job_id']}", bad["job_id"], payload),
    )
    conn.close()
    store = Store.open(v4)
    desto = desto_store(v4)
    try:
        assert query(v4, "SELECT session_id FROM quarantine")[0][0] == s["session_id"]
        assert desto.delete_session(s["session_id"])
        erase.finish(store)
        assert count(v4, "quarantine") == 0
        assert erasures(v4) == {("session", s["session_id"]): "desto", ("job", bad["job_id"]): "desto"}
    finally:
        desto.close()
        store.close()


# ─── desto's History tab, the daemon running: deleted stays deleted ──────────────────────────


def _put(r, kind: Kind, fields: dict[str, str]) -> str:
    record_id = fields["session_id" if kind is Kind.SESSION else "job_id" if kind is Kind.JOB else "favorite_id"]
    r.hset(record_key(kind, record_id).decode(), mapping=fields)
    return record_id


def _archived(db_path: Path, table: str, id_col: str, record_id: str) -> bool:
    return row(db_path, table, id_col, record_id) is not None


def test_desto_deletions_stick_through_changes_reconciles_restarts_and_backfill(redis_server, redis, db_path) -> None:
    settings = settings_for(redis_server, db_path, reconcile_interval=0.5)
    a, b = session_hash(session_name="deleted-one"), session_hash(session_name="cleared")
    a_jobs = [job_hash(session_id=a["session_id"]) for _ in range(2)]
    b_job = job_hash(session_id=b["session_id"])
    keep = session_hash(session_name="kept")
    fav, fav2 = favorite_hash(name="deploy"), favorite_hash(name="cleanup")
    for kind, fields in [
        (Kind.SESSION, a), (Kind.SESSION, b), (Kind.SESSION, keep), (Kind.JOB, a_jobs[0]), (Kind.JOB, a_jobs[1]),
        (Kind.JOB, b_job), (Kind.FAVORITE, fav), (Kind.FAVORITE, fav2),
    ]:  # fmt: skip
        _put(redis, kind, fields)
    desto = desto_store(db_path)
    with daemon_thread(settings) as daemon:
        wait_for(lambda: count(db_path, "sessions") == 3 and count(db_path, "favorites") == 2, 10, what="archived")
        assert count(db_path, "status_history", "record_id = ?", (a["session_id"],)) > 0

        assert desto.delete_session(a["session_id"])
        assert desto.delete_favorite(fav["favorite_id"])
        wait_for(lambda: not count(db_path, "archiver_erased", "purged_at IS NULL"), 10, what="erasures finished")
        assert count(db_path, "status_history", "record_id = ?", (a["session_id"],)) == 0
        # the record changes in Redis; a new job is chained to the deleted session
        redis.hset(f"desto:session:{a['session_id']}", "status", "failed")
        redis.hset(f"desto:job:{a_jobs[0]['job_id']}", "status", "failed")
        redis.hset(f"desto:favorite:{fav['favorite_id']}", "use_count", "9")
        chained = _put(redis, Kind.JOB, job_hash(session_id=a["session_id"]))
        wait_for(lambda: daemon.totals.result.erased >= 4, 10, what="the changes of erased records met")
        reconciles = daemon.reconciles.done
        wait_for(lambda: daemon.reconciles.done >= reconciles + 2, 15, what="two reconciles")

        assert desto.clear_sessions_and_jobs()
        wait_for(lambda: not count(db_path, "archiver_erased", "purged_at IS NULL"), 10, what="clear finished")
        redis.hset(f"desto:session:{b['session_id']}", "status", "failed")
        redis.hset(f"desto:session:{keep['session_id']}", "status", "failed")
        wait_for(lambda: daemon.totals.result.erased >= 6, 10, what="the changes of cleared records met")
        # a session created after Clear History is archived as usual
        new = _put(redis, Kind.SESSION, session_hash(session_name="after-clear"))
        wait_for(lambda: _archived(db_path, "sessions", "session_id", new), 10, what="a new session archived")
        assert desto.clear_all()
    desto.close()

    def nothing_back() -> None:
        assert count(db_path, "sessions") == count(db_path, "jobs") == count(db_path, "favorites") == 0
        erased = erasures(db_path)
        for record in [("session", a["session_id"]), ("session", b["session_id"]), ("session", keep["session_id"]),
                       ("session", new), ("job", b_job["job_id"]), ("favorite", fav["favorite_id"]),
                       ("favorite", fav2["favorite_id"])] + [("job", j["job_id"]) for j in a_jobs]:  # fmt: skip
            assert erased.get(record) == "desto", record
        assert ("job", chained) not in erased  # never archived: kept out as a job of an erased session
        assert count(db_path, "status_history") == 0

    nothing_back()
    redis.hset(f"desto:session:{new}", "status", "finished")  # while no daemon runs
    with daemon_thread(settings):
        redis.hset(f"desto:session:{keep['session_id']}", "status", "finished")
        marker = _put(redis, Kind.SESSION, session_hash(session_name="barrier"))
        wait_for(lambda: _archived(db_path, "sessions", "session_id", marker), 10, what="the barrier archived")
    report = backfill(settings)
    assert report.written.get("session", 0) == 0
    assert report.erased == 10  # four sessions, four jobs (one chained after the delete), two favorites
    assert query(db_path, "SELECT session_name FROM sessions")[0][0] == "barrier"
    assert count(db_path, "sessions") == 1
    assert count(db_path, "jobs") == count(db_path, "favorites") == 0


def test_a_deletion_while_the_daemon_is_stopped_is_found_at_its_next_start(redis_server, redis, db_path) -> None:
    settings = settings_for(redis_server, db_path)
    s = session_hash(session_name="stopped")
    j = job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER}")
    _put(redis, Kind.SESSION, s)
    _put(redis, Kind.JOB, j)
    with daemon_thread(settings):
        wait_for(lambda: _archived(db_path, "jobs", "job_id", j["job_id"]), 10, what="archived")
    desto = desto_store(db_path)
    assert desto.delete_session(s["session_id"])
    desto.close()
    redis.hset(f"desto:session:{s['session_id']}", "status", "failed")
    assert count(db_path, "status_history", "record_id = ?", (s["session_id"],)) > 0
    with daemon_thread(settings) as daemon:
        wait_for(lambda: not count(db_path, "archiver_erased", "purged_at IS NULL"), 10, what="erasure finished")
        assert daemon.snapshot().erased == 2  # the session and its job, as the metrics say
    assert count(db_path, "sessions") == count(db_path, "jobs") == 0
    assert count(db_path, "status_history") == 0


def test_desto_saving_a_deleted_record_again_is_followed_again(redis_server, redis, db_path) -> None:
    settings = settings_for(redis_server, db_path)
    s = session_hash(session_name="resaved", status="running")
    _put(redis, Kind.SESSION, s)
    desto = desto_store(db_path)
    with daemon_thread(settings):
        wait_for(lambda: _archived(db_path, "sessions", "session_id", s["session_id"]), 10, what="archived")
        assert desto.delete_session(s["session_id"])
        wait_for(lambda: erasures(db_path), 10, what="the erasure noted")
        # desto's dashboard finishes the session and saves it: desto's decision
        assert desto.save_session(desto_session(s["session_id"], "resaved", SessionStatus.RUNNING))
        assert erasures(db_path) == {}
        redis.hset(f"desto:session:{s['session_id']}", mapping={"status": "finished", "end_time": "2026-12-01T10:00"})
        wait_for(
            lambda: (row(db_path, "sessions", "session_id", s["session_id"]) or {"status": ""})["status"] == "finished",
            10,
            what="the archiver following the record again",
        )
    desto.close()


# ─── the bytes leave the file ────────────────────────────────────────────────────────────────


def grep_count(path: Path) -> int:
    """``grep -c`` of the marker in a file, from a subprocess (never open() the archive here)."""
    done = subprocess.run(["grep", "-c", "-a", MARKER, str(path)], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return int(done.stdout.strip() or 0)


@pytest.mark.parametrize("secure_delete", [False, True], ids=["desto-without-secure-delete", "desto-with-it"])
def test_an_erased_command_line_leaves_the_file_its_wal_and_later_backups(
    redis_server, redis, db_path: Path, tmp_path: Path, secure_delete: bool
) -> None:
    settings = settings_for(redis_server, db_path)
    s = session_hash(session_name="leaky")
    # one short command line, one long enough to spill into overflow pages
    jobs = [
        job_hash(session_id=s["session_id"], command=f"curl -H 'Authorization: {MARKER}' https://x"),
        job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER} " + "x" * 9000),
    ]
    _put(redis, Kind.SESSION, s)
    others = [session_hash() for _ in range(300)]
    for other in others:
        _put(redis, Kind.SESSION, other)
    desto = desto_store(db_path, secure_delete=secure_delete)
    with daemon_thread(settings) as daemon:
        for job in jobs:
            _put(redis, Kind.JOB, job)
        wait_for(lambda: count(db_path, "jobs") == 2, 10, what="archived")
        # a later state of the first job that desto's readers would refuse: quarantined
        redis.hset(f"desto:job:{jobs[0]['job_id']}", "status", "exploded")
        wait_for(lambda: count(db_path, "quarantine") == 1, 10, what="quarantined")
        daemon.store.checkpointer.checkpoint()  # some pages copied into the file, some still in the WAL
        assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) > 0

        assert desto.delete_session(s["session_id"])
        wait_for(lambda: not count(db_path, "archiver_erased", "purged_at IS NULL"), 10, what="erasure finished")
        wait_for(lambda: not count(db_path, "archiver_state", "name = 'scrub_pending'"), 20, what="the file scrubbed")
        # the archiver's next write
        _put(redis, Kind.SESSION, session_hash(session_name="next"))
        wait_for(lambda: count(db_path, "sessions") == 301, 10, what="the next write")
        backup = tmp_path / "backup.db"
        done = cli(redis_server, db_path, "backup", str(backup))
        assert done.returncode == 0, done.stderr
        found = {name: grep_count(path) for name, path in
                 [("db", db_path), ("wal", Path(f"{db_path}-wal")), ("backup", backup)]}  # fmt: skip
        assert found == {"db": 0, "wal": 0, "backup": 0}
    desto.close()
    assert count(db_path, "quarantine") == 0
    assert count(db_path, "sessions") == 301


def test_a_backup_taken_before_the_daemon_finished_desto_s_delete_holds_nothing_of_it(
    redis_server, redis, db_path: Path, tmp_path: Path
) -> None:
    """desto deletes a session in its History tab while the daemon is stopped (or a moment before
    it gets to it), with a SQLite that does not overwrite what it frees; a backup taken then must
    already hold nothing of it: not its history, not its quarantined job, not its bytes in a free
    page. The live file is finished by the daemon; the copy is finished by the backup."""
    settings = settings_for(redis_server, db_path)
    s = session_hash(session_name="leaky")
    jobs = [
        job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER} " + "x" * 3000),
        job_hash(session_id=s["session_id"], command=f"curl -H 'Authorization: {MARKER}' https://x"),
    ]
    _put(redis, Kind.SESSION, s)
    for _ in range(200):
        _put(redis, Kind.SESSION, session_hash())
    with daemon_thread(settings):
        for job in jobs:
            _put(redis, Kind.JOB, job)
        wait_for(lambda: count(db_path, "jobs") == 2, 10, what="archived")
        redis.hset(f"desto:job:{jobs[1]['job_id']}", "exit_code", "not a number")  # quarantined
        wait_for(lambda: count(db_path, "quarantine") == 1, 10, what="quarantined")
    desto = desto_store(db_path, secure_delete=False)
    assert desto.delete_session(s["session_id"])  # the daemon is stopped
    desto.close()
    assert count(db_path, "archiver_erased", "purged_at IS NULL") >= 1  # not finished in the file yet
    backup = tmp_path / "backup.db"
    done = cli(redis_server, db_path, "backup", str(backup), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["erasures_finished"] is True
    assert grep_count(backup) == 0
    assert count(backup, "quarantine") == 0 and count(backup, "archiver_erased", "purged_at IS NULL") == 0
    assert not count(
        backup, "status_history", "record_id IN (?, ?, ?)", (s["session_id"], *[j["job_id"] for j in jobs])
    )
    assert count(backup, "sessions") == 200
    assert count(db_path, "archiver_erased", "purged_at IS NULL") >= 1  # the live file is the daemon's to finish


def test_old_page_images_in_the_wal_go_even_when_desto_overwrote_what_it_deleted(db_path: Path) -> None:
    from archiver.archive import erase

    store = Store.open(db_path)
    desto = desto_store(db_path, secure_delete=True)
    try:
        s = session_hash()
        j = job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER}")
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0), read(Kind.JOB, j["job_id"], j, T0)]))
        many = [session_hash() for _ in range(2000)]  # the marker's frames stay behind them in the WAL
        store.apply(Batch([read(Kind.SESSION, m["session_id"], m, T0 + 1) for m in many]))
        assert desto.delete_session(s["session_id"])
        assert grep_count(Path(f"{db_path}-wal")) > 0
        finished = erase.finish(store)
        assert finished is not None and finished.scrub == "truncate" and finished.scrub_done
        assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 0
    finally:
        desto.close()
        store.close()


def test_forget_leaves_no_old_image_of_a_row_desto_rewrote_without_overwriting(redis_server, db_path: Path) -> None:
    """desto's SQLite built without SECURE_DELETE leaves the old copy of a row it rewrites (a job
    that grows when it finishes) in free space: forget must find and scrub it too."""
    from desto.redis.models import JobStatus

    store = Store.open(db_path)
    desto = desto_store(db_path, secure_delete=False)
    try:
        neighbours = [session_hash() for _ in range(50)]
        store.apply(Batch([read(Kind.SESSION, n["session_id"], n, T0) for n in neighbours]))
        s = session_hash(session_name="rewritten")
        desto.save_session(desto_session(s["session_id"], "rewritten", SessionStatus.RUNNING))
        job = DestoJob(session_id=s["session_id"], command=f"deploy --token {MARKER}", script_path="/x.sh")
        assert desto.save_job(job)
        for _ in range(5):  # jobs chained after it: their rows sit beside its first copy
            assert desto.save_job(DestoJob(session_id=s["session_id"], command="ls", script_path="/y.sh"))
        job.status, job.exit_code, job.error_message = JobStatus.FINISHED, 0, "e" * 600
        assert desto.save_job(job)  # the row grows and moves: its first copy is freed, not overwritten
        j = job_hash(job.job_id, s["session_id"], command=job.command, status="finished", exit_code="0")
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0 + 1), read(Kind.JOB, job.job_id, j, T0 + 1)]))
    finally:
        store.close()
    try:
        done = cli(redis_server, db_path, "forget", job.job_id)
        assert done.returncode == 0, done.stderr
        assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 0
    finally:
        desto.close()


class DestoSaving:
    """desto's own store saving sessions on a thread of its own, each save waiting at most
    ``timeout_ms`` for the write lock (desto's is 30 s: a shorter wait makes the point with a file
    of tens of megabytes instead of gigabytes); counts its saves and its failures."""

    def __init__(self, db_path: Path, timeout_ms: int) -> None:
        self.db_path, self.timeout_ms = db_path, timeout_ms
        self.saved = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="desto-saving", daemon=True)

    def _run(self) -> None:
        desto = SQLiteStore(db_path=str(self.db_path))
        desto._get_connection().execute(f"PRAGMA busy_timeout = {self.timeout_ms}")
        while not self.stop.is_set():
            session = desto_session(str(uuid.uuid4()), "meanwhile", SessionStatus.RUNNING)
            if desto.save_session(session):
                self.saved += 1
            else:
                self.failed += 1
            self.stop.wait(0.02)
        desto.close()

    def __enter__(self) -> DestoSaving:
        self.thread.start()
        wait_for(lambda: self.saved + self.failed >= 3, 10, what="desto saving")
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _archive_with_a_rewritten_secret(db_path: Path, sessions: int) -> str:
    """An archive of ``sessions`` sessions with two jobs each, and one job desto saved twice
    without overwriting (the second time grown), its command carrying the marker; returns its id."""
    from desto.redis.models import JobStatus

    store = Store.open(db_path)
    desto = desto_store(db_path, secure_delete=False)
    try:
        for start in range(0, sessions, 1000):
            batch = []
            for _ in range(min(1000, sessions - start)):
                s = session_hash()
                batch.append(read(Kind.SESSION, s["session_id"], s, T0))
                for _ in range(2):
                    j = job_hash(session_id=s["session_id"], command="bash /app/desto_scripts/run.sh --retries 3")
                    batch.append(read(Kind.JOB, j["job_id"], j, T0))
            store.apply(Batch(batch))
        s = session_hash(session_name="rewritten")
        desto.save_session(desto_session(s["session_id"], "rewritten", SessionStatus.RUNNING))
        job = DestoJob(session_id=s["session_id"], command=f"deploy --token {MARKER}", script_path="/x.sh")
        assert desto.save_job(job)
        for _ in range(5):
            assert desto.save_job(DestoJob(session_id=s["session_id"], command="ls", script_path="/y.sh"))
        job.status, job.exit_code, job.error_message = JobStatus.FINISHED, 0, "e" * 600
        assert desto.save_job(job)
        j = job_hash(job.job_id, s["session_id"], command=job.command, status="finished", exit_code="0")
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0 + 1), read(Kind.JOB, job.job_id, j, T0 + 1)]))
    finally:
        desto.close()
        store.close()
    return job.job_id


def test_desto_s_writes_never_fail_during_the_scrub_which_leaves_no_erased_byte(db_path: Path, tmp_path: Path) -> None:
    """A VACUUM holds the write lock for the whole file, and desto's writes fail once they have
    waited their timeout; the scrub of every page holds it a few milliseconds at a time."""
    from archiver.archive import erase

    secret = _archive_with_a_rewritten_secret(db_path, 25000)
    copy = tmp_path / "copy" / "desto.db"
    copy.parent.mkdir()
    source, target = sqlite3.connect(db_path), sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.close()
    assert query(db_path, "PRAGMA page_count")[0][0] * 4096 > 40_000_000

    # the same file, scrubbed by a VACUUM: desto's saves fail meanwhile
    store = Store.open(copy)
    try:
        with DestoSaving(copy, timeout_ms=100) as desto:
            saved = desto.saved
            erase.forget(store, erase.resolve(store.conn, [secret], [])[0])  # a secure erasure...
            erase.scrub(store, "vacuum")  # ... and the VACUUM the scrub used to be
            wait_for(lambda: desto.saved > saved + 3, 10, what="desto saving again")
        assert desto.failed > 0
    finally:
        store.close()

    store = Store.open(db_path)
    try:
        with DestoSaving(db_path, timeout_ms=100) as desto:
            saved = desto.saved
            erased = erase.forget(store, erase.resolve(store.conn, [secret], [])[0])
            during = desto.saved - saved
            assert erased.scrub == "pages" and erased.scrub_done and erased.scrub_pages is not None
            assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 0
        assert desto.failed == 0
        assert during >= 5 and erased.scrub_pages["transactions"] > 5
        assert erased.scrub_pages["longest_lock_ms"] < 100
    finally:
        store.close()
    assert integrity(db_path) == "ok"
    assert count(db_path, "sessions", "session_name = 'meanwhile'") == desto.saved


def test_a_reader_that_keeps_the_wal_delays_the_scrub_which_is_finished_later(db_path: Path) -> None:
    from archiver.archive import erase

    store = Store.open(db_path)
    desto = desto_store(db_path, secure_delete=False)
    reader = sqlite3.connect(db_path, isolation_level=None)
    try:
        s = session_hash()
        j = job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER}")
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0), read(Kind.JOB, j["job_id"], j, T0)]))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchone()  # a snapshot with the job in it
        assert desto.delete_session(s["session_id"])
        first = erase.finish(store)
        assert first is not None and first.scrub == "pages" and not first.scrub_done
        assert erase.scrub_pending(store.conn) == "pages" and store.page_scrub is not None  # it goes on from there
        reader.execute("COMMIT")
        second = erase.finish(store)
        assert second is not None and second.scrub == "pages" and second.scrub_done
        assert erase.finish(store) is None
        assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 0
    finally:
        reader.close()
        desto.close()
        store.close()


# ─── forget ──────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
def archived(redis_server, redis, db_path) -> Iterator[dict[str, str]]:
    """A session with two jobs, another session, a favorite: in Redis and archived, the daemon running."""
    s = session_hash(session_name="with-secret")
    jobs = [job_hash(session_id=s["session_id"], command=f"deploy {MARKER}") for _ in range(2)]
    s["job_ids"] = ",".join(j["job_id"] for j in jobs)
    other = session_hash(session_name="innocent")
    fav = favorite_hash(name="leaky-fav", command=f"curl {MARKER}")
    for kind, fields in [
        (Kind.SESSION, s),
        (Kind.SESSION, other),
        (Kind.FAVORITE, fav),
        *((Kind.JOB, j) for j in jobs),
    ]:
        _put(redis, kind, fields)
    with daemon_thread(settings_for(redis_server, db_path)) as daemon:
        wait_for(lambda: count(db_path, "jobs") == 2 and count(db_path, "favorites") == 1, 10, what="archived")
        yield {
            "session": s["session_id"],
            "job1": jobs[0]["job_id"],
            "job2": jobs[1]["job_id"],
            "other": other["session_id"],
            "favorite": fav["favorite_id"],
            "daemon": daemon,  # type: ignore[dict-item]
        }


def test_forget_dry_run_shows_what_would_go_and_changes_nothing(redis_server, db_path, archived) -> None:
    done = cli(redis_server, db_path, "forget", archived["session"], "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert {(r["kind"], r["id"]) for r in shown["records"]} == {
        ("session", archived["session"]), ("job", archived["job1"]), ("job", archived["job2"])
    }  # fmt: skip
    assert shown["erased"] is None
    assert count(db_path, "jobs") == 2 and erasures(db_path) == {}


def test_forget_erases_a_session_with_its_jobs_while_the_daemon_runs(redis_server, redis, db_path, archived) -> None:
    done = cli(redis_server, db_path, "forget", archived["session"])
    assert done.returncode == 0, done.stderr
    assert "erased 3 records" in done.stdout
    assert erasures(db_path) == {
        ("session", archived["session"]): "forget",
        ("job", archived["job1"]): "forget",
        ("job", archived["job2"]): "forget",
    }
    assert count(db_path, "jobs") == 0 and count(db_path, "sessions") == 1
    redis.hset(f"desto:job:{archived['job1']}", "status", "failed")
    redis.hset(f"desto:session:{archived['session']}", "status", "failed")
    daemon = archived["daemon"]
    wait_for(lambda: daemon.totals.result.erased >= 2, 10, what="the daemon met the changes")  # type: ignore[attr-defined]
    assert count(db_path, "jobs") == 0 and count(db_path, "sessions") == 1
    assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 1  # the favorite's command, not forgotten

    shown = cli(redis_server, db_path, "show", archived["job1"])
    assert shown.returncode == 0, shown.stderr
    assert f"job {archived['job1']}: erased at 20" in shown.stdout and "by desto-archiver forget" in shown.stdout
    by_prefix = cli(redis_server, db_path, "show", archived["session"][:8])  # as `history` shows ids
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert f"session {archived['session']}: erased at 20" in by_prefix.stdout
    stats = json.loads(cli(redis_server, db_path, "stats", "--json").stdout)
    assert stats["erased"]["by_how"] == {"forget": {"session": 1, "job": 2}}
    assert "erased" in cli(redis_server, db_path, "stats").stdout
    check = cli(redis_server, db_path, "check", "--json", "--settle", "0")
    verify = json.loads(check.stdout)["verify"]
    assert verify["missing"] == 0 and verify["erased"] == 3, verify


def test_forget_by_name_and_its_usage_errors(redis_server, db_path, archived) -> None:
    unknown = cli(redis_server, db_path, "forget", "no-such-id", archived["other"])
    assert unknown.returncode == 2
    assert "no archived record has the id 'no-such-id'" in unknown.stderr and "nothing was erased" in unknown.stderr
    assert erasures(db_path) == {}
    assert cli(redis_server, db_path, "forget").returncode == 2
    assert cli(redis_server, db_path, "forget", "--name", "nobody").returncode == 2

    done = cli(redis_server, db_path, "forget", "--name", "leaky-fav")
    assert done.returncode == 0, done.stderr
    assert erasures(db_path) == {("favorite", archived["favorite"]): "forget"}
    again = cli(redis_server, db_path, "forget", archived["favorite"])
    assert again.returncode == 0 and "already erased" in again.stdout


def test_forget_shows_ids_kinds_and_names_never_a_command_line(redis_server, redis, db_path, archived) -> None:
    atjob = atjob_hash("41", command=f"tmux new-session -d -s nightly 'deploy {MARKER}'", session_name="nightly")
    redis.hset("desto:atjob:41", mapping=atjob)
    # a job of the session desto's readers would refuse: only in quarantine, with its command line
    bad = job_hash(session_id=archived["session"], command=f"deploy {MARKER}", exit_code="exploded")
    _put(redis, Kind.JOB, bad)
    wait_for(lambda: count(db_path, "at_jobs") == 1 and count(db_path, "quarantine") == 1, 10, what="archived")
    ids = [archived["session"], "41", archived["favorite"]]
    for extra in ([], ["--json"]):
        shown = cli(redis_server, db_path, "forget", *ids, "--dry-run", *extra)
        assert shown.returncode == 0, shown.stderr
        assert MARKER not in shown.stdout + shown.stderr
        assert "with-secret" in shown.stdout and "leaky-fav" in shown.stdout and "nightly" in shown.stdout
        assert bad["job_id"] in shown.stdout and archived["job1"] in shown.stdout
    alone = cli(redis_server, db_path, "forget", bad["job_id"], "--dry-run")
    assert alone.returncode == 0 and bad["job_id"] in alone.stdout and MARKER not in alone.stdout

    done = cli(redis_server, db_path, "forget", archived["favorite"])
    assert done.returncode == 0, done.stderr
    assert "leaky-fav" in done.stdout and MARKER not in done.stdout + done.stderr
    done = cli(redis_server, db_path, "forget", archived["session"], "41", "--json")
    assert done.returncode == 0, done.stderr
    assert MARKER not in done.stdout + done.stderr
    erased = json.loads(done.stdout)
    assert {(r["kind"], r["id"]) for r in erased["records"]} == {
        ("session", archived["session"]), ("job", archived["job1"]), ("job", archived["job2"]),
        ("job", bad["job_id"]), ("atjob", "41"),
    }  # fmt: skip
    assert erased["erased"]["quarantine"] == 1
    assert count(db_path, "quarantine") == count(db_path, "at_jobs") == count(db_path, "favorites") == 0
    assert grep_count(db_path) + grep_count(Path(f"{db_path}-wal")) == 0


def test_the_logs_of_erasures_and_prune_never_show_a_command_line(redis_server, db_path: Path) -> None:
    from structlog.testing import capture_logs

    from archiver.daemon.dirty import Dirty
    from archiver.daemon.housekeeping import Housekeeping
    from archiver.daemon.schedule import Schedule

    store = Store.open(db_path)
    desto = desto_store(db_path)
    try:
        pairs = []
        for _ in range(3):
            s = session_hash()
            j = job_hash(session_id=s["session_id"], command=f"deploy --token {MARKER}")
            store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0), read(Kind.JOB, j["job_id"], j, T0)]))
            pairs.append((s["session_id"], j["job_id"]))
        housekeeping = Housekeeping(settings_for(redis_server, db_path, retention_days=30), Dirty(100), Schedule())
        assert desto.delete_session(pairs[0][0])
        with capture_logs() as logs:
            assert housekeeping.finish_erasures(store) == 2
        store.apply(Batch([read(Kind.SESSION, pairs[1][0], None, T0 + 1), read(Kind.JOB, pairs[1][1], None, T0 + 1)]))
        old = iso_utc(T0 - 100 * 86_400 * 1_000_000)
        with store.transaction() as conn:
            conn.execute("UPDATE sessions SET gone_at = ? WHERE session_id = ?", (old, pairs[1][0]))
            conn.execute("UPDATE jobs SET gone_at = ? WHERE job_id = ?", (old, pairs[1][1]))
        with capture_logs() as more:
            assert housekeeping.step(store, 0.0) == 2
        events = [e["event"] for e in logs + more]
        assert "erasure.finished" in events and "retention.erased" in events
        assert MARKER not in repr(logs + more)
    finally:
        desto.close()
        store.close()
    store = Store.open(db_path)
    with store.transaction() as conn:
        conn.execute(
            "UPDATE sessions SET gone_at = ?, gone_reason = 'expired' WHERE session_id = ?", (old, pairs[2][0])
        )
    store.close()
    for extra in ([], ["--json"], ["--dry-run"]):
        pruned = cli(redis_server, db_path, "prune", "--older-than", "90d", *extra)
        assert pruned.returncode == 0, pruned.stderr
        assert MARKER not in pruned.stdout + pruned.stderr
    assert count(db_path, "sessions") == 0


# ─── retention ───────────────────────────────────────────────────────────────────────────────


def _age(db_path: Path, table: str, id_col: str, record_id: str, days: float) -> None:
    """Make a record look as if it left Redis ``days`` ago (no daemon may be writing)."""
    gone = iso_utc(int((datetime.now().timestamp() - days * 86400) * 1_000_000))
    conn = sqlite3.connect(db_path)
    conn.execute(f"UPDATE {table} SET gone_at = ?, gone_reason = 'expired' WHERE {id_col} = ?", (gone, record_id))
    conn.commit()
    conn.close()


def _three_ages(redis_server, redis, db_path: Path) -> dict[str, str]:
    old, recent, live = session_hash(), session_hash(), session_hash()
    old_job = job_hash(session_id=old["session_id"])
    for kind, fields in [(Kind.SESSION, old), (Kind.SESSION, recent), (Kind.SESSION, live), (Kind.JOB, old_job)]:
        _put(redis, kind, fields)
    with daemon_thread(settings_for(redis_server, db_path)):
        wait_for(lambda: count(db_path, "sessions") == 3 and count(db_path, "jobs") == 1, 10, what="archived")
    redis.delete(f"desto:session:{old['session_id']}", f"desto:job:{old_job['job_id']}")
    redis.delete(f"desto:session:{recent['session_id']}")
    _age(db_path, "sessions", "session_id", old["session_id"], 120)
    _age(db_path, "jobs", "job_id", old_job["job_id"], 120)
    _age(db_path, "sessions", "session_id", recent["session_id"], 10)
    return {
        "old": old["session_id"],
        "old_job": old_job["job_id"],
        "recent": recent["session_id"],
        "live": live["session_id"],
    }


def test_prune_erases_what_left_redis_before_the_cutoff_and_never_a_live_record(redis_server, redis, db_path) -> None:
    ids = _three_ages(redis_server, redis, db_path)
    dry = cli(redis_server, db_path, "prune", "--older-than", "90d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["records"] == {"session": 1, "job": 1}
    assert count(db_path, "sessions") == 3
    assert cli(redis_server, db_path, "prune", "--older-than", "ninety").returncode == 2

    done = cli(redis_server, db_path, "prune", "--older-than", "90d")
    assert done.returncode == 0, done.stderr
    assert "erased records that left Redis before" in done.stdout and "job 1, session 1" in done.stdout
    assert erasures(db_path) == {("session", ids["old"]): "retention", ("job", ids["old_job"]): "retention"}
    assert {r[0] for r in query(db_path, "SELECT session_id FROM sessions")} == {ids["recent"], ids["live"]}
    assert count(db_path, "status_history", "record_id IN (?, ?)", (ids["old"], ids["old_job"])) == 0
    # a live record is never pruned, however old its first sight
    assert cli(redis_server, db_path, "prune", "--older-than", "1s").returncode == 0
    assert {r[0] for r in query(db_path, "SELECT session_id FROM sessions")} == {ids["live"]}


def test_the_retention_setting_makes_the_daemon_prune(redis_server, redis, db_path) -> None:
    ids = _three_ages(redis_server, redis, db_path)
    with daemon_thread(settings_for(redis_server, db_path, retention_days=30)):
        wait_for(lambda: ("session", ids["old"]) in erasures(db_path), 10, what="retention applied")
    assert erasures(db_path) == {("session", ids["old"]): "retention", ("job", ids["old_job"]): "retention"}
    assert _archived(db_path, "sessions", "session_id", ids["recent"])
    assert _archived(db_path, "sessions", "session_id", ids["live"])


def test_retention_gives_the_space_back_in_small_steps_once_the_file_is_in_incremental_mode(db_path: Path) -> None:
    from archiver.archive import erase

    store = Store.open(db_path)
    try:
        sessions = [session_hash(session_name="x" * 500) for _ in range(3000)]
        store.apply(Batch([read(Kind.SESSION, s["session_id"], s, T0) for s in sessions]))
        store.apply(Batch([read(Kind.SESSION, s["session_id"], None, T0 + 1) for s in sessions[:2000]]))
        assert erase.prune(store, T0 + 2, batch=500).pages_freed == 0  # not in incremental mode yet
        assert store.conn.execute("PRAGMA freelist_count").fetchone()[0] > 0
        store.apply(Batch([read(Kind.SESSION, s["session_id"], None, T0 + 3) for s in sessions[2000:]]))
        erase.scrub(store, "vacuum")  # what prune --vacuum does once
        assert store.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        forgotten = [erase.Target(Kind.SESSION, s["session_id"], "") for s in sessions[2000:]]
        erase.forget(store, forgotten)
        assert store.conn.execute("PRAGMA freelist_count").fetchone()[0] > 256
        assert 256 <= erase.give_back_space(store.conn, store.transaction, max_steps=1) <= 260  # one step: 1 MB
        before = erase.file_bytes(store.conn)
        assert erase.give_back_space(store.conn, store.transaction) > 0
        assert store.conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert erase.file_bytes(store.conn) < before / 2
    finally:
        store.close()
