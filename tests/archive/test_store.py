"""The SQLite store on a real file: schema, version guard, tombstones, favorites' names, quarantine."""

from __future__ import annotations

import os
import random
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from archiver.archive.schema import SCHEMA_VERSION
from archiver.archive.sql import select_in
from archiver.archive.store import (
    DAMAGED_ADVICE,
    AlreadyRunning,
    Batch,
    DaemonLock,
    Store,
    StoreError,
    is_damaged,
    store_advice,
)
from archiver.keys import classify, record_key
from archiver.kinds import Kind
from archiver.models import Fetched, Outcome, TimedHint, normalize
from tests.helpers import (
    count,
    damage_pages,
    favorite_hash,
    integrity,
    job_hash,
    lock_holder,
    query,
    row,
    session_hash,
    wait_for,
)

pytestmark = pytest.mark.unit

T0 = 1_795_000_000_000_000


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store.open(db_path)
    yield s
    s.close()


def read(
    kind: Kind, record_id: str, fields: dict[str, str] | None, at: int, pttl: int = -1, version: int | None = None
) -> Outcome:
    """A read at ``at`` by Redis' clock, with that as its version unless ``version`` says otherwise."""
    key = record_key(kind, record_id)
    parsed = classify(key)
    assert parsed is not None
    version = at if version is None else version
    if fields is None:
        return normalize(parsed, Fetched(key, "none", None, -2, at, version))
    flat = [part.encode() for item in fields.items() for part in item]
    return normalize(parsed, Fetched(key, "hash", flat, pttl, at, version))


def history(db_path: Path, record_id: str) -> list[tuple]:
    rows = query(
        db_path,
        "SELECT event, status, previous_status, desto_timestamp, source FROM status_history "
        "WHERE record_id = ? ORDER BY id",
        (record_id,),
    )
    return [tuple(r) for r in rows]


def test_a_new_file_is_wal_with_desto_tables_and_the_schema_version(store: Store, db_path: Path) -> None:
    assert query(db_path, "PRAGMA journal_mode")[0][0] == "wal"
    assert query(db_path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    tables = {r[0] for r in query(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"sessions", "jobs", "favorites", "at_jobs", "status_history", "quarantine", "archiver_state"} <= tables
    desto_session_cols = [r[1] for r in query(db_path, "PRAGMA table_info(sessions)")][:12]
    assert desto_session_cols == [
        "session_id", "session_name", "tmux_session_name", "status", "start_time", "end_time",
        "last_heartbeat", "job_ids", "tmux_active", "at_job_id", "created_at", "updated_at",
    ]  # fmt: skip


def test_opening_twice_does_not_migrate_again(db_path: Path) -> None:
    Store.open(db_path).close()
    again = Store.open(db_path)
    assert again.schema_found == SCHEMA_VERSION
    again.close()


def test_a_file_from_a_newer_archiver_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this desto-archiver's"):
        Store.open(db_path)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "desto.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="is it a SQLite file"):
        Store.open(path)


def test_an_unwritable_folder_is_a_clear_error() -> None:
    # /sys refuses new folders to everyone, root included
    with pytest.raises(StoreError, match="cannot create the folder /sys/desto_data: Operation not permitted"):
        Store.open(Path("/sys/desto_data/desto.db"))


def test_an_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(StoreError, match="cannot create the folder"):
        Store.open(blocker / "desto.db")


def test_an_older_read_never_overwrites_a_newer_one(store: Store, db_path: Path) -> None:
    record = session_hash(status="running")
    sid = record["session_id"]
    store.apply(Batch([read(Kind.SESSION, sid, {**record, "status": "finished"}, T0 + 10)]))
    result = store.apply(Batch([read(Kind.SESSION, sid, record, T0 + 5)]))  # a slow scan's read
    assert result.stale == 1
    assert row(db_path, "sessions", "session_id", sid)["status"] == "finished"
    store.apply(Batch([read(Kind.SESSION, sid, {**record, "status": "failed"}, T0 + 20)]))
    assert row(db_path, "sessions", "session_id", sid)["status"] == "failed"


def test_versions_decide_which_read_is_newer_and_the_times_written_are_redis_own(store: Store, db_path: Path) -> None:
    """After Redis' clock was set back an hour, a read made later has an earlier time and a later
    version (read_clock.ReadClock): the version decides, and the rows and their history keep the time."""
    hour = 3_600_000_000
    record = session_hash(status="running")
    sid = record["session_id"]
    store.apply(Batch([read(Kind.SESSION, sid, record, T0 + hour)]))
    finished = {**record, "status": "finished"}
    store.apply(Batch([read(Kind.SESSION, sid, finished, T0 + 60_000_000, version=T0 + hour + 1)]))
    found = row(db_path, "sessions", "session_id", sid)
    assert found["status"] == "finished"
    assert found["read_at_us"] == T0 + hour + 1
    assert found["last_seen_at"] == "2026-11-18T11:07:40.000000Z"  # T0 + 60 s by Redis' clock, not an hour on
    assert history(db_path, sid)[-1] == ("status", "finished", "running", None, "redis")
    assert query(db_path, "SELECT observed_at FROM status_history ORDER BY id")[-1][0] == "2026-11-18T11:07:40.000000Z"

    gone = store.apply(Batch([read(Kind.SESSION, sid, None, T0 + 61_000_000, version=T0 + hour + 2)]))
    assert gone.tombstoned == 1
    assert row(db_path, "sessions", "session_id", sid)["gone_at"] == "2026-11-18T11:07:41.000000Z"
    late = store.apply(Batch([read(Kind.SESSION, sid, record, T0 + hour + 5, version=T0 + hour)]))
    assert late.stale == 1  # an older version stays older, whatever its time


def test_the_newest_version_is_kept_in_the_file(store: Store, db_path: Path) -> None:
    assert store.newest_version() is None
    first, second = session_hash(), job_hash()
    store.apply(Batch([read(Kind.SESSION, first["session_id"], first, T0 + 10, version=T0 + 50)]))
    assert store.newest_version() == T0 + 50
    # a slow scan's older read lowers nothing; a tombstone's version counts like a row's
    store.apply(Batch([read(Kind.JOB, second["job_id"], second, T0 + 20)]))
    assert store.newest_version() == T0 + 50
    store.apply(Batch([read(Kind.SESSION, first["session_id"], None, T0 + 30, version=T0 + 70)]))
    assert store.newest_version() == T0 + 70
    # a file an older desto-archiver wrote has no note of it: the rows tell
    conn = sqlite3.connect(db_path)
    conn.execute("DELETE FROM archiver_state WHERE name = 'newest_read_us'")
    conn.execute("UPDATE jobs SET read_at_us = ?", (T0 + 90,))
    conn.commit()
    assert store.newest_version() == T0 + 90
    # nor does a note someone spoilt stop the archiver
    conn.execute("INSERT INTO archiver_state VALUES ('newest_read_us', 'not a number', '')")
    conn.commit()
    conn.close()
    assert store.newest_version() == T0 + 90
    store.apply(Batch([read(Kind.JOB, second["job_id"], second, T0 + 95)]))
    assert store.newest_version() == T0 + 95


def test_a_damaged_file_is_blamed_on_the_file_not_on_the_records(db_path: Path) -> None:
    """A batch that fails because a page of the file is damaged must not be taken, row by row, for
    records the file refuses: they would all land in the quarantine, for nothing of theirs."""
    store = Store.open(db_path)
    records = [session_hash() for _ in range(3)]
    store.apply(Batch([read(Kind.SESSION, r["session_id"], r, T0) for r in records]))
    store.close()
    root = query(db_path, "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_sessions_1'")[0][0]
    damage_pages(db_path, root)

    store = Store.open(db_path)
    changed = [read(Kind.SESSION, r["session_id"], {**r, "status": "finished"}, T0 + 1) for r in records]
    with pytest.raises(sqlite3.DatabaseError) as raised:
        store.apply(Batch(changed))
    store.close()
    assert is_damaged(raised.value) and store_advice(raised.value) == DAMAGED_ADVICE
    assert count(db_path, "quarantine") == 0


def test_a_file_the_archiver_may_not_write_is_told_apart_from_a_busy_one(store: Store, db_path: Path) -> None:
    readonly = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as refused:
        readonly.execute("INSERT INTO archiver_state VALUES ('x', 'y', 'z')")
    readonly.close()
    assert store_advice(refused.value) == (
        "give the archiver's user write access to the file, its -wal and -shm, and its folder"
    )
    with lock_holder(db_path, hold_s=5, gap_s=0):
        busy = Store.open(db_path, busy_timeout=0.05)
        with pytest.raises(sqlite3.OperationalError) as locked:
            busy.set_state({"x": "y"}, T0)
        busy.close()
    assert store_advice(locked.value) is None and not is_damaged(locked.value)


def test_unchanged_reads_only_touch_last_seen(store: Store, db_path: Path) -> None:
    record = job_hash()
    jid = record["job_id"]
    store.apply(Batch([read(Kind.JOB, jid, record, T0)]))
    before = row(db_path, "jobs", "job_id", jid)
    result = store.apply(Batch([read(Kind.JOB, jid, record, T0 + 1_000_000)]))
    after = row(db_path, "jobs", "job_id", jid)
    assert result.unchanged == 1 and not result.written
    assert after["updated_at"] == before["updated_at"]
    assert after["last_seen_at"] > before["last_seen_at"]
    assert len(history(db_path, jid)) == 1


def test_an_index_whose_name_holds_a_quote_is_deferred_and_built_again(db_path: Path) -> None:
    """The names of the indexes a first backfill drops come from the file: one that holds a double
    quote is still one name, dropped and built again, never part of the statement's text."""
    Store.open(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute('CREATE INDEX "by ""name"" x" ON sessions(session_name)')
    store = Store.open(db_path)
    try:
        assert store.defer_indexes() == 13
        names = {r[0] for r in query(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert 'by "name" x' not in names
        assert store.restore_indexes() == 13
    finally:
        store.close()
    names = {r[0] for r in query(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert 'by "name" x' in names


def test_tombstones_say_when_and_why(store: Store, db_path: Path) -> None:
    deleted, expired, missing = (session_hash() for _ in range(3))
    ttl_ms = 1000
    store.apply(
        Batch(
            [
                read(Kind.SESSION, deleted["session_id"], deleted, T0),
                read(Kind.SESSION, expired["session_id"], expired, T0, pttl=ttl_ms),
                read(Kind.SESSION, missing["session_id"], missing, T0),
            ]
        )
    )
    later = T0 + 5_000_000
    gone = [read(Kind.SESSION, r["session_id"], None, later) for r in (deleted, expired, missing)]
    result = store.apply(Batch(gone, gone_events={record_key(Kind.SESSION, deleted["session_id"]): b"del"}))
    assert result.tombstoned == 3
    d = row(db_path, "sessions", "session_id", deleted["session_id"])
    e = row(db_path, "sessions", "session_id", expired["session_id"])
    m = row(db_path, "sessions", "session_id", missing["session_id"])
    assert (d["gone_reason"], e["gone_reason"], m["gone_reason"]) == ("deleted", "expired", "missing")
    assert e["gone_at"] == e["expires_at"] < m["gone_at"]  # expiry dated by the TTL read earlier
    assert d["session_name"] == deleted["session_name"]  # the row and all its fields stay
    assert history(db_path, deleted["session_id"])[-1][0] == "deleted"
    # a second sighting of the absence changes nothing
    assert store.apply(Batch([read(Kind.SESSION, missing["session_id"], None, later + 1)])).tombstoned == 0


def test_a_key_that_comes_back_clears_its_tombstone(store: Store, db_path: Path) -> None:
    record = session_hash()
    sid = record["session_id"]
    store.apply(Batch([read(Kind.SESSION, sid, record, T0)]))
    store.apply(Batch([read(Kind.SESSION, sid, None, T0 + 1)]))
    store.apply(Batch([read(Kind.SESSION, sid, record, T0 + 2)]))
    assert row(db_path, "sessions", "session_id", sid)["gone_at"] is None
    assert [h[0] for h in history(db_path, sid)] == ["first_seen", "missing", "reappeared"]


def test_a_key_never_archived_that_is_gone_leaves_nothing(store: Store, db_path: Path) -> None:
    result = store.apply(Batch([read(Kind.JOB, "never-seen", None, T0)]))
    assert result.tombstoned == 0
    assert row(db_path, "jobs", "job_id", "never-seen") is None


def _fav(name: str, fid: str | None = None) -> dict[str, str]:
    return favorite_hash(fid or str(uuid.uuid4()), name=name)


def _names(db_path: Path) -> dict[str, tuple[str, str]]:
    return {r["favorite_id"]: (r["name"], r["real_name"]) for r in query(db_path, "SELECT * FROM favorites")}


def test_favorite_renames_that_swap_names_in_one_batch_never_fail(store: Store, db_path: Path) -> None:
    a, b, c = _fav("x"), _fav("y"), _fav("z")
    ids = [f["favorite_id"] for f in (a, b, c)]
    store.apply(Batch([read(Kind.FAVORITE, f["favorite_id"], f, T0) for f in (a, b, c)]))
    # a 3-cycle of renames x->y, y->z, z->x, all read in one batch
    renamed = [{**a, "name": "y"}, {**b, "name": "z"}, {**c, "name": "x"}]
    store.apply(Batch([read(Kind.FAVORITE, f["favorite_id"], f, T0 + 1) for f in renamed]))
    names = _names(db_path)
    assert [names[i][0] for i in ids] == ["y", "z", "x"]
    assert [names[i][1] for i in ids] == ["y", "z", "x"]
    renames = query(db_path, "SELECT detail FROM status_history WHERE event = 'renamed' ORDER BY id")
    assert len(renames) == 3


def test_a_favorite_name_reused_after_a_delete_keeps_both_rows(store: Store, db_path: Path) -> None:
    old, new = _fav("deploy"), _fav("deploy")
    store.apply(Batch([read(Kind.FAVORITE, old["favorite_id"], old, T0)]))
    store.apply(Batch([read(Kind.FAVORITE, old["favorite_id"], None, T0 + 1)]))
    store.apply(Batch([read(Kind.FAVORITE, new["favorite_id"], new, T0 + 2)]))
    names = _names(db_path)
    assert names[new["favorite_id"]] == ("deploy", "deploy")
    displaced, real = names[old["favorite_id"]]
    assert real == "deploy" and displaced == f"deploy [{old['favorite_id']}]"
    assert row(db_path, "favorites", "favorite_id", old["favorite_id"])["gone_reason"] == "missing"


def test_a_rename_read_before_the_old_holder_s_own_rename_is_applied(store: Store, db_path: Path) -> None:
    a, b = _fav("x"), _fav("y")
    store.apply(Batch([read(Kind.FAVORITE, f["favorite_id"], f, T0) for f in (a, b)]))
    # b took "x" after a became "w", but only b's read has arrived so far
    store.apply(Batch([read(Kind.FAVORITE, b["favorite_id"], {**b, "name": "x"}, T0 + 1)]))
    store.apply(Batch([read(Kind.FAVORITE, a["favorite_id"], {**a, "name": "w"}, T0 + 2)]))
    names = _names(db_path)
    assert names[a["favorite_id"]] == ("w", "w") and names[b["favorite_id"]] == ("x", "x")


def test_quarantine_keeps_one_row_per_key_and_resolves(store: Store, db_path: Path) -> None:
    bad = session_hash(status="paused")
    sid = bad["session_id"]
    first = store.apply(Batch([read(Kind.SESSION, sid, bad, T0)]))
    again = store.apply(Batch([read(Kind.SESSION, sid, bad, T0 + 1)]))
    assert len(first.quarantined) == 1 and not again.quarantined and again.quarantine_repeats == 1
    q = query(db_path, "SELECT * FROM quarantine")
    assert len(q) == 1 and q[0]["times_seen"] == 2 and q[0]["resolved_at"] is None
    assert q[0]["key"] == record_key(Kind.SESSION, sid) and q[0]["key_text"] == f"desto:session:{sid}"
    assert row(db_path, "sessions", "session_id", sid) is None  # never in a desto table
    store.apply(Batch([read(Kind.SESSION, sid, {**bad, "status": "running"}, T0 + 2)]))
    assert query(db_path, "SELECT resolved_at FROM quarantine")[0][0] is not None


def test_desto_messages_add_intermediate_statuses_and_desto_timestamps(store: Store, db_path: Path) -> None:
    record = job_hash(status="queued")
    jid = record["job_id"]
    store.apply(Batch([read(Kind.JOB, jid, record, T0)]))
    hints = {
        (Kind.JOB, jid): [
            TimedHint("running", "2026-11-26T10:00:00", T0 + 1),
            TimedHint("finished", "2026-11-26T10:00:05", T0 + 2),
        ]
    }
    store.apply(Batch([read(Kind.JOB, jid, {**record, "status": "finished"}, T0 + 3)], hints=hints))
    assert history(db_path, jid) == [
        ("first_seen", "queued", None, None, "redis"),
        ("status", "running", "queued", "2026-11-26T10:00:00", "pubsub"),
        ("status", "finished", "running", "2026-11-26T10:00:05", "redis"),
    ]


def test_a_late_desto_message_attaches_its_timestamp(store: Store, db_path: Path) -> None:
    record = job_hash(status="running")
    jid = record["job_id"]
    store.apply(Batch([read(Kind.JOB, jid, record, T0)]))
    late = {(Kind.JOB, jid): [TimedHint("running", "2026-11-26T09:59:59", T0 + 1)]}
    store.apply(Batch([read(Kind.JOB, jid, record, T0 + 2)], hints=late))
    assert history(db_path, jid) == [("first_seen", "running", None, "2026-11-26T09:59:59", "redis")]


def test_state_is_kept(store: Store) -> None:
    store.set_state({"last_reconcile_at": "123"}, T0)
    assert store.get_state()["last_reconcile_at"] == "123"


def test_one_daemon_per_file(db_path: Path) -> None:
    first = DaemonLock(db_path)
    first.acquire()
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            DaemonLock(db_path).acquire()
    finally:
        first.release()
    second = DaemonLock(db_path)
    second.acquire()  # free again once the first let go
    second.release()


def test_the_file_moved_away_or_replaced_is_told_and_only_its_own_side_files_go(db_path: Path) -> None:
    store = Store.open(db_path)
    wal, shm = Path(f"{db_path}-wal"), Path(f"{db_path}-shm")
    try:
        assert wal.exists() and shm.exists()
        assert store.file_lost() is None
        moved = db_path.with_name("moved.db")
        os.rename(db_path, moved)
        assert store.file_lost() == "removed"
        db_path.write_bytes(b"")  # whatever is put at the path next
        assert store.file_lost() == "replaced"
        # A WAL at the path that is not the one this store opened belongs to someone else.
        os.rename(wal, db_path.with_name("moved.db-wal"))
        wal.write_bytes(b"another file's log")
    finally:
        removed = store.release_lost_file()
    assert removed == [shm.name]
    assert not shm.exists()
    assert wal.read_bytes() == b"another file's log"
    assert db_path.read_bytes() == b""
    assert integrity(moved) == "ok"  # the lost file itself is untouched, and whole


def test_lookups_by_id_find_each_row_once_with_a_few_statement_texts(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "lookups.db")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(f"id{i}", i) for i in range(2000)])
    texts: set[str] = set()
    conn.set_trace_callback(texts.add)
    try:
        for count in range(0, 1200, 7):
            wanted = [f"id{i}" for i in random.Random(count).sample(range(2100), count)]
            found = list(select_in(conn, "SELECT id, n FROM t WHERE id IN", wanted))
            assert sorted(found) == sorted((w, int(w[2:])) for w in wanted if int(w[2:]) < 2000)
    finally:
        conn.close()
    # Every length of list the daemon meets shares one of ten statements, so its cache of
    # prepared statements stays small and keeps them. (The trace shows the values bound: count them.)
    lengths = {text.split(" IN (", 1)[1].count(",") + 1 for text in texts if " IN (" in text}
    assert lengths <= {1 << k for k in range(10)}, sorted(lengths)
    assert len(lengths) >= 5  # the loop above met lists of many lengths


def test_a_row_the_file_refuses_is_quarantined_alone(store: Store, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute(
        "CREATE TRIGGER no_secrets BEFORE INSERT ON jobs WHEN NEW.command LIKE '%password%' "
        "BEGIN SELECT RAISE(ABORT, 'no secrets in the archive'); END"
    )
    conn.commit()
    conn.close()
    good, refused = job_hash(), job_hash(command="mysql --password=hunter2")
    result = store.apply(Batch([read(Kind.JOB, r["job_id"], r, T0) for r in (good, refused)]))
    assert result.written["job"] == 1 and len(result.quarantined) == 1
    assert row(db_path, "jobs", "job_id", good["job_id"]) is not None
    assert row(db_path, "jobs", "job_id", refused["job_id"]) is None
    reason = query(db_path, "SELECT reason FROM quarantine")[0][0]
    assert "the archive refused the normalized row: no secrets in the archive" in reason


def test_a_file_at_schema_1_is_migrated_forward_keeping_its_rows(db_path: Path) -> None:
    from archiver.archive import schema

    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    schema._migrate_to_1(conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO sessions (session_id, session_name, status, read_at_us) VALUES ('s1', 'nightly', 'running', 1)"
    )
    conn.close()
    store = Store.open(db_path)
    try:
        assert store.schema_found == 1
        assert query(db_path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
        assert row(db_path, "sessions", "session_id", "s1")["observed_status"] == "running"
    finally:
        store.close()


def test_status_history_numbers_stay_above_every_number_given_before_the_upgrade(db_path: Path) -> None:
    """A file of schema 8 numbered its status history by plain rowid: a number freed at the top was
    given again. Upgraded, it numbers above its rows and above the deleted rows its change log
    still names (a shipper may count those as shipped), keeping rows, indexes and log triggers."""
    from archiver.archive import changelog, schema

    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    for version in range(1, 9):
        schema.MIGRATIONS[version](conn)
    conn.execute("PRAGMA user_version = 8")
    changelog.set_enabled(conn, True)
    for n in range(1, 6):
        conn.execute(
            "INSERT INTO status_history (kind, record_id, event, observed_at, source) "
            "VALUES ('session', ?, 'first_seen', '2026-01-01T00:00:00Z', 'redis')",
            (f"s{n}",),
        )
    conn.execute("DELETE FROM status_history WHERE id >= 4")  # logged: not shipped yet
    conn.close()
    store = Store.open(db_path)
    try:
        assert store.schema_found == 8
        mine = session_hash()
        store.apply(Batch([read(Kind.SESSION, mine["session_id"], mine, T0)]))
        rows = query(db_path, "SELECT id, record_id FROM status_history ORDER BY id")
        assert [tuple(r) for r in rows] == [(1, "s1"), (2, "s2"), (3, "s3"), (6, mine["session_id"])]
        names = {r[0] for r in query(db_path, "SELECT name FROM sqlite_master WHERE tbl_name = 'status_history'")}
        assert {"idx_status_history_record", "idx_status_history_observed"} <= names
        assert {"archiver_changes_status_history_update", "archiver_changes_status_history_delete"} <= names
        store.conn.execute("DELETE FROM status_history WHERE id = 6")
        store.apply(Batch([read(Kind.SESSION, mine["session_id"], {**mine, "status": "failed"}, T0 + 1)]))
        assert query(db_path, "SELECT max(id) FROM status_history")[0][0] == 7
    finally:
        store.close()


def test_writes_by_another_program_are_noted_for_a_re_read(store: Store, db_path: Path) -> None:
    mine = session_hash()
    store.apply(Batch([read(Kind.SESSION, mine["session_id"], mine, T0)]))
    assert store.foreign_commits() is True  # the first look always checks
    assert store.take_rechecks(100) == []  # the archiver's own writes are not noted
    assert store.foreign_commits() is False
    other = sqlite3.connect(db_path)
    with other:  # what desto's store does: an upsert that leaves the archiver's columns alone
        other.execute("UPDATE sessions SET status = 'starting' WHERE session_id = ?", (mine["session_id"],))
        other.execute("INSERT INTO jobs (job_id, session_id, status) VALUES ('j-desto', 's', 'queued')")
    other.close()
    assert store.foreign_commits() is True
    assert set(store.take_rechecks(100)) == {(Kind.SESSION, mine["session_id"]), (Kind.JOB, "j-desto")}
    assert store.take_rechecks(100) == []
    # the re-read restores Redis' state without recording a transition that never happened
    store.apply(Batch([read(Kind.SESSION, mine["session_id"], mine, T0 + 1)]))
    assert row(db_path, "sessions", "session_id", mine["session_id"])["status"] == "running"
    assert [h[0] for h in history(db_path, mine["session_id"])] == ["first_seen"]


def test_the_wal_starts_over_while_the_writer_never_pauses(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Readers and the checkpointer never find a moment without the writer during a backfill: the
    # writer itself must start the WAL over, or it grows with every row ever written.
    monkeypatch.setattr(Store, "MAX_WAL_BYTES", 256 * 1024)
    store = Store.open(db_path)
    wal = Path(f"{db_path}-wal")
    try:
        largest = 0
        for n in range(40):
            batch = [read(Kind.SESSION, f"s-{n}-{i}", session_hash(f"s-{n}-{i}"), T0 + n) for i in range(200)]
            store.apply(Batch(batch))
            largest = max(largest, wal.stat().st_size)
        assert count_rows(db_path) == 8000
        assert largest < 4 * 1024 * 1024, f"the WAL grew to {largest:,} bytes"
    finally:
        store.close()


def test_a_reader_on_an_old_snapshot_never_stalls_the_writer(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_WAL_BYTES the writer tries to start the WAL over; a reader holding a snapshot
    (desto's tab, an export into a pager, a backup) keeps it from doing so. The writer must try
    without waiting for that reader, or every batch waits out the whole busy timeout."""
    monkeypatch.setattr(Store, "MAX_WAL_BYTES", 64 * 1024)
    store = Store.open(db_path, busy_timeout=10)
    wal = Path(f"{db_path}-wal")
    reader = sqlite3.connect(db_path, isolation_level=None)
    try:
        store.apply(Batch([read(Kind.SESSION, f"s-{i}", session_hash(f"s-{i}"), T0) for i in range(500)]))
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM sessions").fetchone()[0] == 500  # holds its snapshot
        for n in range(4):  # the WAL is past the limit and stays there while the reader reads
            batch = [read(Kind.SESSION, f"t-{n}-{i}", session_hash(f"t-{n}-{i}"), T0 + 1 + n) for i in range(100)]
            started = time.monotonic()
            store.apply(Batch(batch))
            assert time.monotonic() - started < 3, "a batch waited for the reader"
            assert wal.stat().st_size > Store.MAX_WAL_BYTES
        reader.execute("COMMIT")
        later = iter(range(10_000))

        def restarted() -> bool:  # the reader gone, a later batch starts the WAL over
            n = next(later)
            store.apply(Batch([read(Kind.SESSION, f"u-{n}", session_hash(f"u-{n}"), T0 + 9)]))
            return wal.stat().st_size < Store.MAX_WAL_BYTES

        wait_for(restarted, 5, interval=0.1, what="the WAL to start over")
    finally:
        reader.close()
        store.close()


def count_rows(db_path: Path) -> int:
    return int(query(db_path, "SELECT count(*) FROM sessions")[0][0])


def test_a_write_takes_the_brief_gaps_another_writer_leaves(db_path: Path) -> None:
    """SQLite's own busy handler sleeps up to 100 ms between tries and misses most 10 ms gaps:
    with a 0.3 s timeout, several of these writes would fail."""
    store = Store.open(db_path, busy_timeout=0.3)
    pauses = random.Random(7)
    try:
        with lock_holder(db_path, hold_s=0.040, gap_s=0.010):
            for i in range(20):
                time.sleep(pauses.uniform(0.0, 0.05))  # the next write meets the lock anywhere in its cycle
                store.set_state({"probe": str(i)}, T0)
        assert store.get_state()["probe"] == "19"
    finally:
        store.close()


def test_a_write_gives_up_after_the_busy_timeout_and_keeps_its_setting(db_path: Path) -> None:
    store = Store.open(db_path, busy_timeout=0.2)
    try:
        with lock_holder(db_path, hold_s=60, gap_s=0):
            started = time.monotonic()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                store.set_state({"probe": "1"}, T0)
            assert time.monotonic() - started >= 0.2
        assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 200
        store.set_state({"probe": "2"}, T0)  # the lock is free again
        assert store.get_state()["probe"] == "2"
    finally:
        store.close()
