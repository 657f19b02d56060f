"""More than one shipper of one file: the daemon's and the one-shot ``ship`` beside it, or the
daemon's old thread still finishing a batch after the file was replaced and a new one started.
They must agree on the file's identity, and nothing read from a lost file lands after its
replacement was noticed.

Every test uses a database of its own on the machine's PostgreSQL (``pg_url``) and skips with the
reason where none answers."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from desto.redis import SQLiteStore
from desto.redis.models import DestoSession
from structlog.testing import capture_logs

from archiver.archive import changelog, erase
from archiver.archive.store import Batch, Store
from archiver.central import ship
from archiver.central.ship import FileReplaced, NeedsCopy, Shipper
from archiver.commands.cli import main
from archiver.kinds import Kind
from tests.archive.test_store import T0, read
from tests.helpers import daemon_thread, job_hash, session_hash, settings_for, wait_for
from tests.pg_helpers import central_differences, pg_rows

SOURCE = "gpu1"


def file_id_in(db_path: Path) -> str | None:
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute("SELECT value FROM archiver_state WHERE name = 'ship_file_id'").fetchone()
        return None if row is None else str(row[0])
    finally:
        conn.close()


def shipped_file_id(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT file_id FROM desto_archiver.ship_positions WHERE source_name = %s", (SOURCE,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_two_shippers_opening_a_new_file_at_once_agree_on_its_file_id(redis_server, db_path, pg_url, monkeypatch):
    """The daemon's shipper and a one-shot ship both find no file_id in a new file and make one:
    the file keeps one of them, and both must ship under that one (not each its own)."""
    Store.open(db_path, 5.0).close()
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE)
    made = threading.Barrier(2)
    real = uuid.uuid4

    def after_both_looked() -> uuid.UUID:  # each has found none before either writes its own
        made.wait(10)
        return real()

    monkeypatch.setattr(ship.uuid, "uuid4", after_both_looked)
    shippers = [Shipper(settings), Shipper(settings)]
    errors: list[BaseException] = []

    def open_one(shipper: Shipper) -> None:
        try:
            shipper.open()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in shippers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.undo()
    try:
        assert not errors, errors
        assert shippers[0].file_id == shippers[1].file_id == file_id_in(db_path)
    finally:
        for s in shippers:
            s.close()


def test_a_shipper_whose_file_took_a_new_id_from_another_follows_it(redis, redis_server, db_path, pg_url, tmp_path):
    """A restored file opened by two shippers (the daemon's and a one-shot ship): one copies it
    under a new file_id. The other, still holding the old id, must take the file's new id, not
    copy the file again under yet another id that the first no longer knows (the two would then
    take turns, each copy a full set of status history more)."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    with daemon_thread(settings) as daemon:
        for _ in range(2):
            s = session_hash()
            redis.hset(f"desto:session:{s['session_id']}", mapping=s)
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE) == [], 15, interval=0.2, what="PG = file")
        copy = tmp_path / "copy.db"
        assert main(["backup", "--db", str(db_path), str(copy)]) == 0
        for sid in {r["session_id"] for r in pg_rows(pg_url, "sessions")}:
            redis.hset(f"desto:session:{sid}", "status", "failed")
        wait_for(lambda: daemon.shipper.backlog == 0 and daemon.shipper.shipped > 2, 15, what="shipped")
        first = daemon.shipper.shipper.file_id
    for suffix in ("-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, db_path)

    daemons, one_shot = Shipper(settings), Shipper(settings)
    try:
        daemons.open()
        one_shot.open()
        assert daemons.file_id == one_shot.file_id == first
        one_shot.copy_all()
        assert one_shot.file_id != first
        try:
            daemons.ship_batch()
        except NeedsCopy:  # what the daemon's thread does then
            daemons.copy_all()
        assert daemons.file_id == one_shot.file_id == file_id_in(db_path) == shipped_file_id(pg_url)
        assert {r["file_id"] for r in pg_rows(pg_url, "status_history")} == {first, one_shot.file_id}
    finally:
        daemons.close()
        one_shot.close()


def test_a_shipper_mid_batch_when_its_file_is_replaced_never_commits_what_it_read_from_the_lost_file(
    redis, redis_server, db_path, pg_url, tmp_path
):
    """The daemon notices its file replaced (a restore moved into place), stops its shipper thread
    with a 2 s timeout and starts a new one. An old thread still in a batch (PostgreSQL slow to
    answer) holds rows read from the lost file: once the new shipper has started, that batch must
    not land (its rows and position would be the lost file's), whenever PostgreSQL lets it go on."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    with daemon_thread(settings) as daemon:
        s = session_hash()
        redis.hset(f"desto:session:{s['session_id']}", mapping=s)
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE) == [], 15, interval=0.2, what="PG = file")
        wait_for(lambda: daemon.shipper.backlog == 0, 10)
    copy = tmp_path / "copy.db"
    assert main(["backup", "--db", str(db_path), str(copy)]) == 0

    old = Shipper(settings)
    old.open()
    only_in_lost = session_hash()
    store = SQLiteStore(str(db_path))  # a change the lost file holds, not yet shipped
    store.save_session(DestoSession(session_id=only_in_lost["session_id"], session_name="lost"))
    store.close()
    read, go_on = threading.Event(), threading.Event()
    put = old._put

    def slow_put(*args: object) -> None:  # the batch has read the file; PostgreSQL answers late
        read.set()
        assert go_on.wait(30)
        put(*args)  # type: ignore[arg-type]

    old._put = slow_put  # type: ignore[method-assign]
    outcome: list[object] = []

    def old_batch() -> None:
        try:
            outcome.append(old.ship_batch())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=old_batch)
    thread.start()
    try:
        assert read.wait(10)
        aside = tmp_path / "aside"
        aside.mkdir()
        for suffix in ("", "-wal", "-shm"):  # the restore, as docs/operations.md says
            if Path(f"{db_path}{suffix}").exists():
                Path(f"{db_path}{suffix}").rename(aside / f"desto.db{suffix}")
        shutil.copyfile(copy, db_path)
        new = Shipper(settings)
        new.open()  # the new shipper has started; its first batch waits for the old one's lock
        go_on.set()
        thread.join(30)
        assert only_in_lost["session_id"] not in {r["session_id"] for r in pg_rows(pg_url, "sessions")}
        assert outcome and isinstance(outcome[0], FileReplaced), outcome
        new.ship_batch()
        new.close()
    finally:
        go_on.set()
        thread.join(30)
        old.close()


def test_ship_whose_file_is_replaced_during_the_copy_stops_and_says_to_run_again(
    redis, redis_server, db_path, pg_url, capsys, monkeypatch
):
    s = session_hash()
    redis.hset(f"desto:session:{s['session_id']}", mapping=s)
    assert main(["backfill", "--db", str(db_path), "--redis-url", redis_server.url]) == 0
    checked = Shipper._check_file

    def replaced_at_the_first_page(self: Shipper) -> None:
        Path(db_path).rename(db_path.with_name("moved.db"))
        shutil.copyfile(db_path.with_name("moved.db"), db_path)
        checked(self)

    monkeypatch.setattr(Shipper, "_check_file", replaced_at_the_first_page)
    capsys.readouterr()
    assert main(["ship", "--db", str(db_path), "--postgres-url", pg_url, "--source", SOURCE]) == 1
    err = capsys.readouterr().err
    assert "was replaced or removed" in err and "run the same command again" in err
    assert pg_rows(pg_url, "sessions") == []


def test_a_shipper_whose_file_was_removed_leaves_the_path_to_the_daemon(redis, redis_server, db_path, pg_url):
    """A shipper thread that finds its file gone must not open the path itself: the daemon is about
    to make a new file there, and a connection of the shipper's in the middle of that (the new
    file still empty, not yet in WAL mode) or opened on the lost file's WAL and shared memory still
    at the path gave disk I/O errors, the daemon's own start refused, and a SIGBUS. The daemon opens
    the new file and only then starts a shipper for it."""
    from archiver.daemon.shipper import ShipperThread

    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    Store.open(db_path, 5.0).close()
    thread = ShipperThread(settings)
    thread.start()
    try:
        wait_for(lambda: thread.copies >= 1, 15, what="the first copy")
        with capture_logs() as logs:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
            wait_for(lambda: any(e["event"] == "ship.file_replaced" for e in logs), 10, what="the loss noticed")
            Store.open(db_path, 5.0).close()  # the daemon's new file, where the shipper could see it
            time.sleep(1.5)  # a few rounds of the shipper's backoff
        assert thread.is_alive() and thread.shipper.sqlite is None, "the shipper opened the path's new file itself"
        assert not [e for e in logs if e["event"] == "ship.failed"], logs
    finally:
        thread.stop(5.0)
    assert not thread.is_alive()


@contextmanager
def logging_store_and_shipper(redis_server, db_path: Path, pg_url: str) -> Iterator[tuple[Store, Shipper]]:
    """The file with its change log kept, as a shipping daemon keeps it, and a shipper of it (not
    opened yet)."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE)
    store = Store.open(db_path)
    changelog.set_enabled(store.conn, True)
    shipper = Shipper(settings)
    try:
        yield store, shipper
    finally:
        shipper.close()
        store.close()


def _forget(store: Store, session_id: str) -> None:
    targets, _ = erase.resolve(store.conn, [session_id], [])
    erase.forget(store, targets)


def _history_of_a_new_session_shipped(store: Store, shipper: Shipper, pg_url: str, db_path: Path, at: int) -> None:
    """A new session's two status-history rows written after ``at``, then shipped: PostgreSQL holds
    this file's status history as the file does, both rows with it."""
    later = session_hash()
    for status in ("starting", "running"):
        at += 1_000_000
        store.apply(Batch([read(Kind.SESSION, later["session_id"], {**later, "status": status}, at)]))
    while shipper.ship_batch():
        pass
    in_file = {r[0]: r[1] for r in store.conn.execute("SELECT id, record_id FROM status_history")}
    ours = [r for r in pg_rows(pg_url, "status_history") if r["file_id"] == shipper.file_id]
    assert {r["id"]: r["record_id"] for r in ours} == in_file
    assert list(in_file.values()).count(later["session_id"]) == 2
    assert central_differences(pg_url, db_path, SOURCE, file_id=shipper.file_id) == []


def test_history_written_after_an_erasure_took_the_newest_rows_is_shipped(redis_server, db_path, pg_url):
    """An erasure that takes the newest status-history rows (the newest session forgotten) frees
    their numbers. The shipper ships that table by number: the rows written next must reach
    PostgreSQL, and the erased ones leave it."""
    with logging_store_and_shipper(redis_server, db_path, pg_url) as (store, shipper):
        at = T0
        kept, newest = session_hash(), session_hash()
        for record in (kept, newest):
            for status in ("starting", "running", "finished"):
                at += 1_000_000
                store.apply(Batch([read(Kind.SESSION, record["session_id"], {**record, "status": status}, at)]))
        shipper.open()
        shipper.copy_all()
        shipped = {r["id"] for r in pg_rows(pg_url, "status_history")}
        assert len(shipped) == 6

        _forget(store, newest["session_id"])  # its three history rows were the file's newest
        _history_of_a_new_session_shipped(store, shipper, pg_url, db_path, at)


def test_history_numbers_freed_by_two_erasures_with_a_batch_between_are_never_given_again(
    redis_server, db_path, pg_url
):
    """Two erasures each take one of the newest status-history rows, with a shipped batch between
    them, then new rows are written. Had SQLite given the freed numbers to the new rows, the batch
    between would have moved the shipped number past the lower one, and a new row under it would
    never reach PostgreSQL: the numbers a row once had are never given again."""
    with logging_store_and_shipper(redis_server, db_path, pg_url) as (store, shipper):
        at = T0
        kept, first, second = session_hash(), session_hash(), session_hash()
        for record in (kept, first, second):  # first's and second's rows are the file's two newest
            at += 1_000_000
            store.apply(Batch([read(Kind.SESSION, record["session_id"], record, at)]))
        shipper.open()
        shipper.copy_all()
        _forget(store, first["session_id"])
        while shipper.ship_batch():  # a batch sees one erasure done, the other not begun
            pass
        assert central_differences(pg_url, db_path, SOURCE, file_id=shipper.file_id) == []
        _forget(store, second["session_id"])
        _history_of_a_new_session_shipped(store, shipper, pg_url, db_path, at)


def test_a_session_desto_saves_again_before_its_erasure_is_finished_is_shipped_again_whole(
    redis_server, db_path, pg_url
):
    """desto deletes a session (its erasure reaches PostgreSQL: every central row of it goes), then
    saves it again before the archiver has finished the erasure in the file, which lifts it: the
    file still holds the session's history, and PostgreSQL must hold it again (not the job desto
    deleted with it, whose erasure stands)."""
    with logging_store_and_shipper(redis_server, db_path, pg_url) as (store, shipper):
        desto = SQLiteStore(str(db_path))
        try:
            at = T0
            session = session_hash()
            sid = session["session_id"]
            job = job_hash(session_id=sid, status="finished", exit_code="0")
            session["job_ids"] = f'["{job["job_id"]}"]'
            for status in ("starting", "running", "finished"):
                at += 1_000_000
                store.apply(
                    Batch([read(Kind.SESSION, sid, {**session, "status": status}, at),
                           read(Kind.JOB, job["job_id"], job, at)])
                )  # fmt: skip
            shipper.open()
            shipper.copy_all()
            saved = desto.get_session(sid)
            assert saved is not None

            assert desto.delete_session(sid)  # the History tab's delete: noted by the file's trigger
            while shipper.ship_batch():
                pass
            assert not [r for r in pg_rows(pg_url, "status_history") if r["record_id"] == sid]
            assert isinstance(saved, DestoSession) and desto.save_session(saved)  # desto's decision: lifted
            while shipper.ship_batch():
                pass

            # desto deleted the job's row with the session's, so the job stays erased (its history is
            # purged from the file when the erasure is finished); the session is desto's again
            assert store.conn.execute("SELECT record_id FROM archiver_erased").fetchall() == [(job["job_id"],)]
            in_file = Counter(
                r[0] for r in store.conn.execute("SELECT record_id FROM status_history WHERE record_id = ?", (sid,))
            )
            ours = [r for r in pg_rows(pg_url, "status_history") if r["file_id"] == shipper.file_id]
            assert in_file == {sid: 3}
            assert Counter(r["record_id"] for r in ours) == in_file
            assert {r["session_id"] for r in pg_rows(pg_url, "sessions")} == {sid}
            assert not pg_rows(pg_url, "jobs")
        finally:
            desto.close()
