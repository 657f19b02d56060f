"""A file put back at the archive's path (a backup restored, a copy, a filesystem snapshot rolled
back) is not the change log that was shipped, whatever its numbers say: it is copied whole under a
file_id of its own, and what it lacks or deleted does not stay in PostgreSQL.

Every test uses a database of its own on the machine's PostgreSQL (``pg_url``) and skips with the
reason where none answers."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import psycopg
import pytest
from desto.redis import SQLiteStore
from desto.redis.models import DestoSession, SessionStatus

from archiver.archive import changelog
from archiver.commands.cli import main
from tests.helpers import count, daemon_thread, job_hash, session_hash, settings_for, wait_for
from tests.pg_helpers import central_differences, pg_rows

SOURCE = "gpu1"


def fill(redis, sessions: int) -> dict[str, str]:
    """Sessions with a job each: session id -> job id."""
    out = {}
    for _ in range(sessions):
        s = session_hash()
        j = job_hash(session_id=s["session_id"], status="finished", exit_code="0")
        redis.hset(f"desto:session:{s['session_id']}", mapping=s)
        redis.hset(f"desto:job:{j['job_id']}", mapping=j)
        out[s["session_id"]] = j["job_id"]
    return out


def last_seq(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return changelog.last_seq(conn)
    finally:
        conn.close()


def shipped(url: str) -> tuple[str, int]:
    """(file_id, position) PostgreSQL holds for the source."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT file_id, position FROM desto_archiver.ship_positions WHERE source_name = %s", (SOURCE,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def take_copy(how: str, db_path: Path, dest: Path) -> None:
    """A copy of the archive as an operator makes one: desto-archiver's own backup, sqlite3's
    .backup, a copy of the files (the daemon stopped), or a filesystem snapshot (the files as they
    are at an instant, WAL and all, the daemon running)."""
    if how == "backup":
        assert main(["backup", "--db", str(db_path), str(dest)]) == 0
    elif how == "sqlite3-backup":
        if shutil.which("sqlite3"):
            subprocess.run(["sqlite3", str(db_path), f".backup '{dest}'"], check=True)
        else:  # the same SQLite call
            src, dst = sqlite3.connect(db_path), sqlite3.connect(dest)
            src.backup(dst)
            src.close(), dst.close()
    else:  # "stopped-copy" and "snapshot": the files themselves
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{db_path}{suffix}").exists():
                shutil.copyfile(f"{db_path}{suffix}", f"{dest}{suffix}")


def restore(copy: Path, db_path: Path, aside: Path) -> None:
    """docs/operations.md, "Restoring a backup": the old file moved away with its -wal and -shm,
    the copy (a copy of it: it may be restored again) put in its place, with its own WAL if it has one."""
    aside.mkdir(exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        old = Path(f"{db_path}{suffix}")
        if old.exists():
            old.rename(aside / f"{old.name}.{len(list(aside.iterdir()))}")
    for suffix in ("", "-wal"):
        if Path(f"{copy}{suffix}").exists():
            shutil.copyfile(f"{copy}{suffix}", f"{db_path}{suffix}")


def central_ids(url: str, table: str, column: str) -> set[str]:
    return {r[column] for r in pg_rows(url, table, SOURCE)}


def history_of(url: str, file_id: str) -> dict[int, tuple[str, str, str]]:
    """The central status history one file shipped: id -> (record, event, when)."""
    return {
        r["id"]: (r["record_id"], r["event"], r["observed_at"])
        for r in pg_rows(url, "status_history", SOURCE, file_id=file_id)
    }


def desto_writes_past(db_path: Path, position: int, delete: str, save: str) -> None:
    """desto, on the restored file before the archiver starts again: a session deleted in its
    History tab (logged at numbers PostgreSQL takes for shipped ones), then saves of another
    until the log's numbers pass PostgreSQL's position."""
    store = SQLiteStore(str(db_path))
    assert store.delete_session(delete)
    while last_seq(db_path) <= position:
        store.save_session(DestoSession(session_id=save, session_name="saved", status=SessionStatus.FINISHED))
    store.close()


@pytest.mark.parametrize("how", ["backup", "sqlite3-backup", "stopped-copy", "snapshot"])
def test_a_restored_backup_whose_log_passed_the_shipped_position_is_copied_whole(
    redis, redis_server, db_path, pg_url, tmp_path, how
):
    """The copy's log is behind PostgreSQL's position, but desto writes into the restored file
    before the archiver starts again (a session deleted in its History tab, other saves): the log's
    numbers pass the position, and a check of numbers alone (position > last seq) no longer sees a
    restore. The numbers up to the position are not the ones shipped: the deletion must still reach
    PostgreSQL (the session and its job), the copy is shipped under a file_id of its own, and the
    status history the first file shipped keeps its rows (the copy numbers its own again)."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    copy = tmp_path / "copy.db"
    with daemon_thread(settings) as daemon:
        records = fill(redis, 4)
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE) == [], 15, interval=0.2, what="PG = file")
        wait_for(lambda: daemon.shipper.backlog == 0, 10)
        if how != "stopped-copy":
            take_copy(how, db_path, copy)
    if how == "stopped-copy":
        take_copy(how, db_path, copy)
    with daemon_thread(settings) as daemon:  # more changes shipped: PostgreSQL's position passes the copy's log
        for sid in records:
            redis.hset(f"desto:session:{sid}", "status", "failed")
        wait_for(lambda: daemon.shipper.backlog == 0 and shipped(pg_url)[1] >= last_seq(copy) + 4, 15, what="shipped")
        first_file = daemon.shipper.shipper.file_id
    shipped_before = history_of(pg_url, first_file)
    restore(copy, db_path, tmp_path / "aside")
    file_id, position = shipped(pg_url)
    assert file_id == first_file and last_seq(db_path) < position
    victim, *others = records
    desto_writes_past(db_path, position, delete=victim, save=others[0])

    with daemon_thread(settings) as daemon:
        assert daemon.shipper is not None
        wait_for(lambda: victim not in central_ids(pg_url, "sessions", "session_id"), 15, what="the deletion")
        assert records[victim] not in central_ids(pg_url, "jobs", "job_id")
        wait_for(lambda: daemon.shipper.copies == 1, 10, what="the copy to finish")
        assert daemon.shipper.shipper.file_id != first_file
        new_file = daemon.shipper.shipper.file_id
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE, file_id=new_file) == [], 15, 0.2, "PG = file")
    assert count(db_path, "sessions", "session_id = ?", (victim,)) == 0
    # the first file's history stays as it shipped it, but for the erased session's and its job's
    erased = {victim, records[victim]}
    assert history_of(pg_url, first_file) == {i: h for i, h in shipped_before.items() if h[0] not in erased}


def ship_past_a_backup(daemon, redis, records, db_path: Path, pg_url: str, backup: Path) -> None:
    """PostgreSQL equal to the file, a backup taken, then every session failed and shipped: the
    central position is past the backup's change log."""
    wait_for(lambda: central_differences(pg_url, db_path, SOURCE) == [], 15, interval=0.2, what="PG = file")
    take_copy("backup", db_path, backup)
    for sid in records:
        redis.hset(f"desto:session:{sid}", "status", "failed")
    wait_for(lambda: daemon.shipper.backlog == 0 and shipped(pg_url)[1] > last_seq(backup), 15, what="shipped")


def test_the_same_backup_restored_twice_is_copied_whole_each_time(redis, redis_server, db_path, pg_url, tmp_path):
    """The second restore of one backup carries the first file's file_id, which PostgreSQL no longer
    ships under: its log is not the one that file shipped either (ship_files keeps that file's mark),
    so it takes another file_id, and neither earlier file's history is overwritten."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    backup = tmp_path / "backup.db"
    with daemon_thread(settings) as daemon:
        records = fill(redis, 3)
        ship_past_a_backup(daemon, redis, records, db_path, pg_url, backup)
    files = [shipped(pg_url)[0]]
    for _ in range(2):
        kept = {f: history_of(pg_url, f) for f in files}
        restore(backup, db_path, tmp_path / "aside")
        with daemon_thread(settings) as daemon:
            assert daemon.shipper is not None
            wait_for(lambda: daemon.shipper.copies == 1, 15, what="the restored file copied whole")
            files.append(daemon.shipper.shipper.file_id)
            for sid in records:  # the restored file catches up from Redis: new history, numbered again
                redis.hset(f"desto:session:{sid}", "status", "finished")
            wait_for(lambda: daemon.shipper.backlog == 0 and count(db_path, "sessions", "status = 'finished'") == 3, 15)
            wait_for(
                lambda: central_differences(pg_url, db_path, SOURCE, file_id=files[-1]) == [], 15, 0.2, "PG = file"
            )
        assert len(set(files)) == len(files), files
        assert {f: history_of(pg_url, f) for f in files[:-1]} == kept


def test_a_copy_holding_all_that_was_shipped_goes_on_from_its_log(redis, redis_server, db_path, pg_url, tmp_path):
    """A copy taken once everything was shipped, and put back before anything else was (a snapshot
    rolled back, the file moved away and back): its log holds PostgreSQL's mark, so it is the log
    that was shipped and shipping goes on from it, without a whole copy nor a new file_id."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    copy = tmp_path / "copy.db"
    with daemon_thread(settings) as daemon:
        fill(redis, 2)
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE) == [], 15, interval=0.2, what="PG = file")
        wait_for(lambda: daemon.shipper.backlog == 0, 10)
        first_file = daemon.shipper.shipper.file_id
    take_copy("stopped-copy", db_path, copy)
    restore(copy, db_path, tmp_path / "aside")
    with daemon_thread(settings) as daemon:
        more = fill(redis, 1)
        wait_for(lambda: set(more) <= central_ids(pg_url, "sessions", "session_id"), 15, what="shipped on")
        assert daemon.shipper is not None and daemon.shipper.copies == 0
        assert daemon.shipper.shipper.file_id == first_file


def test_an_archive_shipped_before_the_log_had_tokens_is_copied_once_under_its_file_id(
    redis, redis_server, db_path, pg_url
):
    """The upgrade: a file of schema 4 (entries without tokens, triggers that write none) and a
    central position without a mark. The file is migrated (tokens given, the old triggers replaced),
    PostgreSQL's position, which cannot be checked, costs one whole copy, under the same file_id;
    then shipping follows the log."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    with daemon_thread(settings) as daemon:
        fill(redis, 2)
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE) == [], 15, interval=0.2, what="PG = file")
        first_file = daemon.shipper.shipper.file_id
    conn = sqlite3.connect(db_path)
    with conn:  # the file as schema 4 left it
        changelog.set_enabled(conn, False)
        conn.execute("ALTER TABLE archiver_changes DROP COLUMN token")
        for table, key in changelog.SHIPPED.items():
            conn.execute(
                f"CREATE TRIGGER archiver_changes_{table}_delete AFTER DELETE ON {table} BEGIN "
                f"INSERT INTO archiver_changes (tbl, key) VALUES ('{table}', OLD.{key}); END"
            )
        conn.execute("INSERT INTO archiver_state VALUES ('changes_from', '1', '')")
        conn.execute("PRAGMA user_version = 4")
    conn.close()
    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute("UPDATE desto_archiver.ship_positions SET head = NULL, head_token = NULL")
    with daemon_thread(settings) as daemon:
        assert daemon.shipper is not None
        wait_for(lambda: daemon.shipper.copies == 1, 15, what="one copy")
        more = fill(redis, 1)
        wait_for(lambda: set(more) <= central_ids(pg_url, "sessions", "session_id"), 15, what="shipped on")
        assert daemon.shipper.copies == 1 and daemon.shipper.shipper.file_id == first_file
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 6
        assert conn.execute("SELECT count(*) FROM archiver_changes WHERE token IS NULL").fetchone()[0] == 0
        assert changelog.is_enabled(conn)
        bodies = [r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE name LIKE 'archiver_changes_%'")]
        assert bodies and all("randomblob(8)" in b for b in bodies)
    finally:
        conn.close()


def test_a_backup_moved_into_place_under_the_shipping_daemon_is_shipped_from_then_on(
    redis, redis_server, db_path, pg_url, tmp_path
):
    """The daemon notices its file replaced, opens the path again and starts a new shipper: the
    restored file is copied whole under a file_id of its own and followed from then on."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    backup = tmp_path / "backup.db"
    with daemon_thread(settings) as daemon:
        records = fill(redis, 2)
        ship_past_a_backup(daemon, redis, records, db_path, pg_url, backup)
        first_thread, first_file = daemon.shipper, daemon.shipper.shipper.file_id
        restore(backup, db_path, tmp_path / "aside")
        # between the old shipper's stop and the new one's start the daemon has no shipper at all
        wait_for(
            lambda: (now := daemon.shipper) is not None and now is not first_thread and now.copies == 1,
            15,
            what="a new shipper",
        )
        assert not first_thread.is_alive()
        more = fill(redis, 1)
        wait_for(lambda: set(more) <= central_ids(pg_url, "sessions", "session_id"), 15, what="shipped on")
        new_file = daemon.shipper.shipper.file_id
        assert new_file != first_file and shipped(pg_url)[0] == new_file
        wait_for(lambda: central_differences(pg_url, db_path, SOURCE, file_id=new_file) == [], 15, 0.2, "PG = file")


def test_check_says_a_restored_file_is_behind_what_was_shipped_and_will_be_copied_whole(
    redis, redis_server, db_path, pg_url, tmp_path, capsys
):
    """PostgreSQL's position is ahead of the restored file's log: that is not "0 changes waiting"
    but a file behind what was shipped, which the next shipping copies whole."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name=SOURCE, ship_interval=0.05)
    backup = tmp_path / "backup.db"
    with daemon_thread(settings) as daemon:
        records = fill(redis, 2)
        ship_past_a_backup(daemon, redis, records, db_path, pg_url, backup)
    restore(backup, db_path, tmp_path / "aside")
    capsys.readouterr()
    base = ["check", "--json", "--no-verify", "--no-daemon", "--db", str(db_path), "--redis-url", redis_server.url]
    main([*base, "--postgres-url", pg_url, "--source", SOURCE])
    found = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["postgres"]
    assert found["status"] == "warn", found
    assert "behind what was shipped" in found["detail"] and "copies it whole" in (found["hint"] or ""), found
