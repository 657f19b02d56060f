"""Erasures in the central database: a record erased in the file (desto's History tab, forget,
retention) leaves no central row behind, whichever of the host's files shipped it.

Every test uses a database of its own on the machine's PostgreSQL (``pg_url``) and skips with the
reason where none answers."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
from desto.redis.sqlite_store import SQLiteStore

from archiver.commands.cli import main
from tests.helpers import count, daemon_thread, job_hash, session_hash, settings_for, wait_for
from tests.pg_helpers import pg_rows


def central_mentions(url: str, *needles: str) -> list[str]:
    """The central tables whose rows mention any of ``needles`` (a row read as text, bytea in hex
    included: the needles are compared in both forms)."""
    forms = [*needles, *(n.encode().hex() for n in needles)]
    found = []
    with psycopg.connect(url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'desto_archiver' "
                "AND table_name NOT IN ('archiver_schema', 'ship_positions', 'erased')"
            )
        ]
        for table in tables:
            for (text,) in conn.execute(f"SELECT t::text FROM desto_archiver.{table} t"):
                if any(form in text for form in forms):
                    found.append(table)
    return sorted(found)


def assert_none_left(url: str, *needles: str, timeout: float = 15.0) -> None:
    """Wait until no central row mentions any of ``needles``; fail naming the tables that still do."""
    left: list[str] = []

    def clean() -> bool:
        left[:] = central_mentions(url, *needles)
        return not left

    try:
        wait_for(clean, timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"still in PostgreSQL after {timeout} s: {left}") from None


def _start_anew(db_path: Path) -> None:
    """The host's file rebuilt: gone with its WAL, a new one made at the next start."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


def _a_session_and_its_unreadable_job() -> tuple[str, dict[str, str], dict[str, str]]:
    """(a secret, a session, its job with the secret in its command line, which desto cannot read:
    quarantined)."""
    secret = f"token-{uuid.uuid4().hex}"
    s = session_hash(session_name="leaky")
    j = job_hash(session_id=s["session_id"], status="finished", command=f"curl -H 'Authorization: {secret}' x")
    j["exit_code"] = "not-a-number"
    return secret, s, j


def _erase_session(how: str, db_path: Path, sid: str) -> None:
    if how == "forget":
        assert main(["forget", "--db", str(db_path), sid]) == 0
    else:  # a person's deletion in desto's History tab
        store = SQLiteStore(str(db_path))
        assert store.delete_session(sid)
        store.close()


@pytest.mark.parametrize("how", ["forget", "desto"])
def test_an_erasure_reaches_the_rows_an_earlier_file_of_the_host_shipped(redis, redis_server, db_path, pg_url, how):
    """A host whose file was rebuilt keeps its old central history (another file_id). Erasing a
    record afterwards must still remove that old history and a quarantined payload of the record
    (here with a secret in it) from PostgreSQL, not only the rows the current file shipped."""
    secret = f"token-{uuid.uuid4().hex}"
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    s = session_hash(session_name="leaky")
    sid = s["session_id"]
    j = job_hash(session_id=sid, status="finished", command="make")
    redis.set(f"desto:session:{sid}", f"curl -H 'Authorization: {secret}' x")  # quarantined, byte for byte
    with daemon_thread(settings) as daemon:  # (a string is not notified: the start's reconcile reads it)
        wait_for(lambda: central_mentions(pg_url, secret) == ["quarantine"], 15, what="the quarantine shipped")
        redis.delete(f"desto:session:{sid}")
        redis.hset(f"desto:session:{sid}", mapping=s)
        redis.hset(f"desto:job:{j['job_id']}", mapping=j)
        wait_for(lambda: any(r["record_id"] == sid for r in pg_rows(pg_url, "status_history")), 15, what="history")
        assert daemon.shipper is not None
        first_file = daemon.shipper.shipper.file_id
    _start_anew(db_path)
    with daemon_thread(settings) as daemon:
        assert daemon.shipper is not None
        wait_for(lambda: count(db_path, "sessions", "session_id = ?", (sid,)) == 1, 10, what="the record read again")
        wait_for(lambda: daemon.shipper.copies == 1, 10, what="the new file copied")
        new_file = daemon.shipper.shipper.file_id
        assert new_file != first_file

        def shipped_from() -> set[str]:
            return {r["file_id"] for r in pg_rows(pg_url, "status_history") if r["record_id"] == sid}

        wait_for(lambda: shipped_from() == {first_file, new_file}, 15, what="the new file's history shipped")
        _erase_session(how, db_path, sid)
        assert_none_left(pg_url, sid, j["job_id"], secret)


@pytest.mark.parametrize("how", ["forget", "desto"])
def test_a_session_s_erasure_reaches_its_job_quarantined_by_an_earlier_file(redis, redis_server, db_path, pg_url, how):
    """A job desto cannot read is quarantined, with its session's id, by each file of the host that
    reads it: the rebuilt host's earlier file shipped its quarantined payload (a secret in the
    command line) under its own file_id. Erasing the session in a way that takes its jobs must
    remove that payload from PostgreSQL too, though no central job row names the job."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    secret, s, j = _a_session_and_its_unreadable_job()
    sid = s["session_id"]
    s["job_ids"] = json.dumps([j["job_id"]])
    redis.hset(f"desto:session:{sid}", mapping=s)
    redis.hset(f"desto:job:{j['job_id']}", mapping=j)
    with daemon_thread(settings) as daemon:
        wait_for(lambda: "quarantine" in central_mentions(pg_url, secret), 15, what="the quarantine shipped")
        assert daemon.shipper is not None
        first_file = daemon.shipper.shipper.file_id
    _start_anew(db_path)
    with daemon_thread(settings) as daemon:
        assert daemon.shipper is not None
        wait_for(lambda: daemon.shipper.copies == 1, 10, what="the new file copied")
        assert daemon.shipper.shipper.file_id != first_file

        def quarantined_by() -> int:
            return len([r for r in pg_rows(pg_url, "quarantine") if r["record_id"] == j["job_id"]])

        wait_for(lambda: quarantined_by() == 2, 15, what="both files' quarantine rows")
        _erase_session(how, db_path, sid)
        assert_none_left(pg_url, sid, j["job_id"], secret)


def test_a_restored_file_s_erasure_reaches_a_job_another_file_quarantined_since(redis, redis_server, db_path, pg_url):
    """desto deletes a session; a job of it desto cannot read comes later (refused: its session is
    erased). The host's file is lost: the new one, knowing no erasure, archives the session again
    and quarantines the job with its secret, and ships both. Then the backup taken after the
    deletion is restored: its erasure of the session takes the job wherever PostgreSQL holds it,
    though only a quarantine row of another file names it, with the session's id."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    secret, s, j = _a_session_and_its_unreadable_job()
    sid = s["session_id"]
    backup = db_path.parent / "after-the-deletion.db"
    redis.hset(f"desto:session:{sid}", mapping=s)
    with daemon_thread(settings):
        wait_for(lambda: count(db_path, "sessions", "session_id = ?", (sid,)) == 1, 10, what="the session")
        store = SQLiteStore(str(db_path))
        assert store.delete_session(sid)  # a person's deletion in desto's History tab
        store.close()
        wait_for(lambda: not any(r["session_id"] == sid for r in pg_rows(pg_url, "sessions")), 15, what="erased")
        redis.hset(f"desto:job:{j['job_id']}", mapping=j)
        assert main(["backup", "--db", str(db_path), str(backup)]) == 0
    _start_anew(db_path)
    with daemon_thread(settings):  # a file that knows no erasure
        wait_for(lambda: "quarantine" in central_mentions(pg_url, secret), 15, what="the job quarantined again")
    _start_anew(db_path)
    backup.rename(db_path)  # restored as docs/operations.md says, the daemon stopped
    with daemon_thread(settings) as daemon:
        assert daemon.shipper is not None
        wait_for(lambda: daemon.shipper.copies == 1, 10, what="the restored file copied")
        assert_none_left(pg_url, sid, j["job_id"], secret)


def test_the_central_upgrade_names_the_session_of_jobs_quarantined_before_it(
    redis, redis_server, db_path, pg_url, monkeypatch
):
    """Central schema 6 ships a quarantined job's session; rows a host shipped under schema 5 get
    it from their payload when the owner upgrades, so a later erasure of the session finds them."""
    from archiver.central import postgres

    s = session_hash()
    sid = s["session_id"]
    j = job_hash(session_id=sid, status="finished")
    j["exit_code"] = "not-a-number"  # desto cannot read it: quarantined
    redis.hset(f"desto:session:{sid}", mapping=s)
    redis.hset(f"desto:job:{j['job_id']}", mapping=j)
    db_path.parent.mkdir(exist_ok=True)
    assert main(["backfill", "--db", str(db_path), "--redis-url", redis_server.url]) == 0
    ship = ["ship", "--db", str(db_path), "--postgres-url", pg_url, "--source", "gpu1"]
    with monkeypatch.context() as old:
        old.setattr(postgres, "PG_SCHEMA_VERSION", 5)
        assert main(ship) == 0
    [row] = [r for r in pg_rows(pg_url, "quarantine") if r["record_id"] == j["job_id"]]
    assert "session_id" not in row
    with psycopg.connect(pg_url) as owner:  # the owner's upgrade, before any host ships again
        assert postgres.migrate_pg(owner, "desto_archiver") == (5, 6)
    [row] = [r for r in pg_rows(pg_url, "quarantine") if r["record_id"] == j["job_id"]]
    assert row["session_id"] == sid
    assert main(ship) == 0


def test_a_whole_copy_applies_every_erasure_the_file_remembers(redis, redis_server, db_path, pg_url, capsys):
    """An erasure made while no change log was kept (a daemon without PostgreSQL) is in no log entry:
    the next shipping's whole copy must apply it to every central row of the record, an earlier
    file's too, and the central database says what was erased."""
    shipping = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    s, kept = session_hash(session_name="gone"), session_hash(session_name="kept")
    sid = s["session_id"]
    with daemon_thread(shipping):
        for record in (s, kept):
            redis.hset(f"desto:session:{record['session_id']}", mapping=record)
        wait_for(lambda: any(r["record_id"] == sid for r in pg_rows(pg_url, "status_history")), 15, what="shipped")
    _start_anew(db_path)
    with daemon_thread(settings_for(redis_server, db_path)):  # no PostgreSQL: no change log
        wait_for(lambda: count(db_path, "sessions") == 2, 10, what="the records read into the new file")
        assert main(["forget", "--db", str(db_path), sid]) == 0
    capsys.readouterr()
    assert main(["ship", "--db", str(db_path), "--postgres-url", pg_url, "--source", "gpu1", "--json"]) == 0
    assert central_mentions(pg_url, sid) == []
    assert json.loads(capsys.readouterr().out)["erasures"] == 1
    assert [(r["kind"], r["record_id"], r["how"]) for r in pg_rows(pg_url, "erased")] == [("session", sid, "forget")]
    assert main(["stats", "--postgres-url", pg_url]) == 0
    assert "1 by forget (session 1)" in capsys.readouterr().out
