"""Shipping the archive into PostgreSQL: the one-shot copy, the daemon's shipper, deletions, the
central schema's versions and the role it needs, and the installation without psycopg.

Every test uses a database of its own on the machine's PostgreSQL (``pg_url``) and skips with the
reason where none answers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from desto.redis.sqlite_store import SQLiteStore

from archiver.archive import changelog
from archiver.central.postgres import PG_SCHEMA_VERSION
from archiver.commands.cli import main
from tests.helpers import REPO, atjob_hash, daemon_thread, job_hash, session_hash, settings_for, wait_for
from tests.pg_helpers import central_differences, pg_rows
from tests.redis_server import free_port


def _fill(client, sessions: int = 5) -> list[str]:
    """Sessions with a job each, a deleted one (a tombstone), an at-job and a value to quarantine."""
    ids = []
    for _ in range(sessions):
        s = session_hash()
        j = job_hash(session_id=s["session_id"], status="finished", exit_code="0")
        client.hset(f"desto:session:{s['session_id']}", mapping=s)
        client.hset(f"desto:job:{j['job_id']}", mapping=j)
        ids.append(s["session_id"])
    client.hset("desto:atjob:7", mapping=atjob_hash("7"))
    client.set(f"desto:session:{uuid.uuid4()}", "not a hash")  # quarantined
    return ids


def _archive(redis, redis_server, db_path: Path) -> list[str]:
    """An archive made by backfills (no shipping): records, history, a tombstone, quarantine."""
    ids = _fill(redis)
    assert main(["backfill", "--db", str(db_path), "--redis-url", redis_server.url]) == 0
    redis.delete(f"desto:session:{ids[0]}")
    assert main(["backfill", "--db", str(db_path), "--redis-url", redis_server.url]) == 0
    assert _count(db_path, "quarantine") == 1
    return ids


def _ship(db_path: Path, url: str, source: str, *extra: str, capsys=None) -> dict:
    assert capsys is not None
    capsys.readouterr()
    code = main(["ship", "--db", str(db_path), "--postgres-url", url, "--source", source, "--json", *extra])
    assert code == 0
    assert capsys is not None
    return json.loads(capsys.readouterr().out)


def test_ship_copies_the_whole_archive_and_again_changes_nothing(redis, redis_server, db_path, pg_url, capsys):
    _archive(redis, redis_server, db_path)
    first = _ship(db_path, pg_url, "gpu1", capsys=capsys)
    assert first["copied"]["sessions"] == 5 and first["copied"]["quarantine"] == 1
    assert first["copied"]["status_history"] > 0
    assert central_differences(pg_url, db_path, "gpu1") == []
    tombstone = [r for r in pg_rows(pg_url, "sessions", "gpu1") if r["gone_at"] is not None]
    assert len(tombstone) == 1 and tombstone[0]["gone_reason"]

    again = _ship(db_path, pg_url, "gpu1", capsys=capsys)
    assert again["file_id"] == first["file_id"] and sum(again["deleted"].values()) == 0
    assert central_differences(pg_url, db_path, "gpu1") == []
    assert len(pg_rows(pg_url, "sessions")) == 5


def test_ship_deletes_central_rows_the_file_no_longer_holds(redis, redis_server, db_path, pg_url, capsys):
    ids = _archive(redis, redis_server, db_path)
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    store = SQLiteStore(str(db_path))  # a person's deletion through desto's History tab
    assert store.delete_session(ids[1])
    store.close()
    report = _ship(db_path, pg_url, "gpu1", capsys=capsys)
    assert report["deleted"]["sessions"] == 1
    assert ids[1] not in {r["session_id"] for r in pg_rows(pg_url, "sessions")}
    assert central_differences(pg_url, db_path, "gpu1") == []


def test_two_sources_share_one_database_without_collisions(redis, redis_server, db_path, pg_url, capsys, tmp_path):
    _archive(redis, redis_server, db_path)
    other = tmp_path / "other" / "desto.db"
    subprocess.run(["cp", str(db_path), str(tmp_path / "copy.db")], check=True)
    other.parent.mkdir()
    subprocess.run(["cp", str(db_path), str(other)], check=True)  # the same ids and numbers on a second host
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    _ship(other, pg_url, "gpu2", capsys=capsys)
    assert central_differences(pg_url, db_path, "gpu1") == []
    assert central_differences(pg_url, other, "gpu2") == []
    assert len(pg_rows(pg_url, "sessions")) == 10


def test_a_source_with_nothing_shipped_names_the_sources_that_have(redis, redis_server, db_path, pg_url, capsys):
    """A command run in a shell without the daemon's environment defaults to the host name as its
    source: `check` and `stats --source` must point to the names that did ship, not only say
    "nothing shipped"."""
    _archive(redis, redis_server, db_path)
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    base = ["--db", str(db_path), "--redis-url", redis_server.url, "--postgres-url", pg_url]
    main(["check", "--json", "--no-verify", *base, "--source", "not-this-host"])
    postgres = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["check"] == "postgres")
    assert postgres["status"] == "warn" and "nothing shipped yet" in postgres["detail"]
    assert "'gpu1'" in postgres["detail"] and "--source" in postgres["detail"]
    assert main(["stats", *base, "--source", "not-this-host"]) != 0
    refused = capsys.readouterr().err
    assert "'not-this-host'" in refused and "'gpu1'" in refused


def test_ship_to_a_database_that_does_not_exist_says_what_to_correct(redis, redis_server, db_path, pg_url, capsys):
    """A mistyped database name will not start answering: `ship` says to correct the URL (a usage
    error), where a server that is down gets "run the same command again"."""
    _archive(redis, redis_server, db_path)
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    capsys.readouterr()
    assert main(["ship", "--db", str(db_path), "--postgres-url", missing, "--source", "gpu1"]) == 2
    said = capsys.readouterr().err
    assert "the database does not exist" in said and "will not help" in said and "run the same command" not in said
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/db"
    assert main(["ship", "--db", str(db_path), "--postgres-url", down, "--source", "gpu1"]) == 1
    assert "nothing is lost: run the same command again" in capsys.readouterr().err


def test_daemon_ships_every_change_and_deletions_follow(redis, redis_server, db_path, pg_url):
    port = free_port()
    settings = settings_for(
        redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05, metrics_port=port
    )
    with daemon_thread(settings) as daemon:
        ids = _fill(redis)
        wait_for(lambda: _count(db_path, "sessions") == 5, 10)
        redis.hset(f"desto:session:{ids[2]}", "status", "failed")
        redis.delete(f"desto:session:{ids[0]}")
        wait_for(lambda: daemon.totals.result.tombstoned >= 1, 10)
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2, what="PG = file")
        store = SQLiteStore(str(db_path))  # desto's own write into the shared file is shipped too
        assert store.delete_session(ids[3])
        store.close()
        wait_for(lambda: ids[3] not in {r["session_id"] for r in pg_rows(pg_url, "sessions")}, 10, what="the deletion")
        assert central_differences(pg_url, db_path, "gpu1") == []
        assert daemon.shipper is not None and daemon.shipper.copies == 1  # the first start copies, then follows
        # shipped entries are trimmed from the file, but the last (which keeps the numbering going)
        wait_for(lambda: _log_size(db_path) == 1, 10, what="the change log to be trimmed")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        text = wait_for(lambda: (t := scrape()) and "desto_archiver_ship_backlog 0.0" in t and t, 10)
        assert "desto_archiver_ship_failing 0.0" in text and "desto_archiver_ship_copies_total 1.0" in text
        shipped = [line for line in text.splitlines() if line.startswith("desto_archiver_ship_entries_shipped_total")]
        assert float(shipped[0].split()[1]) > 0
    failed = [r for r in pg_rows(pg_url, "sessions") if r["session_id"] == ids[2]]
    assert failed[0]["status"] == "failed"


def test_the_shipper_follows_each_commit_not_its_interval(redis, redis_server, db_path, pg_url):
    """PostgreSQL is current within a moment of the file: the daemon's commits, and another program's
    it notices, start a shipping round at once; ARCHIVER_SHIP_INTERVAL (a minute here) is only the
    longest wait between looks."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=60)
    with daemon_thread(settings) as daemon:
        wait_for(lambda: (s := daemon.shipper) is not None and s.copies == 1 and s.backlog == 0, 15, what="the copy")
        ids = _fill(redis, sessions=2)

        def central_sessions() -> set[str]:
            return {r["session_id"] for r in pg_rows(pg_url, "sessions")}

        wait_for(lambda: set(ids) <= central_sessions(), 10, what="the new sessions in PostgreSQL")
        store = SQLiteStore(str(db_path))  # desto's own delete, noticed at the daemon's next look at the file
        assert store.delete_session(ids[0])
        store.close()
        wait_for(lambda: ids[0] not in central_sessions(), 10, what="the deletion in PostgreSQL")
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 10, interval=0.2, what="PG = file")


def _log_size(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT count(*) FROM archiver_changes").fetchone()[0]
    finally:
        conn.close()


def test_a_daemon_without_postgres_keeps_no_change_log(redis, redis_server, db_path, pg_url):
    with daemon_thread(settings_for(redis_server, db_path, postgres_url=pg_url, source_name="a")):
        pass
    conn = sqlite3.connect(db_path)
    assert changelog.is_enabled(conn)
    conn.close()
    before = _log_size(db_path)
    with daemon_thread(settings_for(redis_server, db_path)):
        _fill(redis, 2)
        wait_for(lambda: len(redis.keys("desto:*")) and _count(db_path, "sessions") >= 2, 10)
    conn = sqlite3.connect(db_path)
    try:
        assert not changelog.is_enabled(conn)
        assert changelog.complete_from(conn) is None
        # nothing added while shipping is off; what was there (the shipped mark) stays
        assert conn.execute("SELECT count(*) FROM archiver_changes").fetchone()[0] == before >= 1
    finally:
        conn.close()


def _count(db_path: Path, table: str) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_shipping_again_after_a_period_without_it_is_complete(redis, redis_server, db_path, pg_url):
    """Triggers off for a while (a daemon without PostgreSQL), with a deletion: the next shipping
    daemon copies the whole file and deletes what the file lost."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    with daemon_thread(settings):
        ids = _fill(redis)
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2)
    with daemon_thread(settings_for(redis_server, db_path)) as plain:
        more = _fill(redis, 3)
        wait_for(lambda: _count(db_path, "sessions") >= 8, 10)
        redis.delete(f"desto:session:{ids[1]}")  # gone from Redis, then deleted from the file by a person
        wait_for(lambda: plain.totals.result.tombstoned >= 1, 10)
    store = SQLiteStore(str(db_path))
    assert store.delete_session(ids[1])
    store.close()
    with daemon_thread(settings) as daemon:
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2, what="PG = file")
        assert daemon.shipper is not None and daemon.shipper.copies == 1
    central = {r["session_id"] for r in pg_rows(pg_url, "sessions")}
    assert ids[1] not in central and set(more) <= central


def test_a_newer_central_schema_is_refused_with_the_reason(db_path, pg_url, redis, redis_server, capsys):
    _archive(redis, redis_server, db_path)
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO desto_archiver.archiver_schema (version) VALUES (99)")
    code = main(["ship", "--db", str(db_path), "--postgres-url", pg_url, "--source", "gpu1"])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        f"version 99, newer than this desto-archiver's {PG_SCHEMA_VERSION}" in err and "upgrade desto-archiver" in err
    )
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    with daemon_thread(settings) as daemon:  # the archive goes on; shipping stops, saying why
        assert daemon.shipper is not None
        wait_for(lambda: daemon.shipper.refused, 10, what="the shipper to refuse")
        assert "version 99" in daemon.shipper.refused
        s = session_hash()
        redis.hset(f"desto:session:{s['session_id']}", mapping=s)
        wait_for(lambda: _count(db_path, "sessions") >= 6, 10)


def test_least_privilege_role_ships_into_a_schema_its_owner_created(redis, redis_server, db_path, pg_url, capsys):
    """The owner creates the schema and lets the host's role write its source (``grant``, as
    docs/postgresql.md says); the role has only CONNECT, USAGE on the schema and DML on the tables
    hosts write, and can neither create nor drop anything."""
    _archive(redis, redis_server, db_path)
    role = f"archiver_{uuid.uuid4().hex[:8]}"
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
    capsys.readouterr()
    assert main(["grant", "--postgres-url", pg_url, "--source", "gpu1", "--role", role]) == 0  # the owner's run
    try:
        role_url = pg_url.replace("postgres@", f"{role}@")
        report = _ship(db_path, role_url, "gpu1", capsys=capsys)
        assert report["copied"]["sessions"] == 5
        assert central_differences(pg_url, db_path, "gpu1") == []
        with psycopg.connect(role_url, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE desto_archiver.other (x int)")
        # a fresh database where the role may not create the schema: the reason and what to grant
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA desto_archiver CASCADE")
        code = main(["ship", "--db", str(db_path), "--postgres-url", role_url, "--source", "gpu1"])
        assert code == 2
        assert "grant the archiver's role CREATE on the schema desto_archiver" in capsys.readouterr().err
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_without_psycopg_the_daemon_and_commands_run_and_shipping_says_what_to_install(
    redis, redis_server, db_path, tmp_path
):
    """The SQLite-only installation: psycopg cannot be imported (a stub that raises ImportError
    comes first on the path), yet backfill, stats, history and check work; asking for shipping names
    the extra to install."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "psycopg.py").write_text("raise ImportError('psycopg is not installed')\n")
    env = {
        "PYTHONPATH": f"{blocker}:{REPO}",
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": redis_server.url,
        "SQLITE_DB_PATH": str(db_path),
        "ARCHIVER_LOG_FORMAT": "json",
    }
    _fill(redis, 2)

    def run(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "archiver", *args],
            env={**env, **more},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    assert run("backfill").returncode == 0
    assert run("stats", "--json").returncode == 0
    assert json.loads(run("history", "--json").stdout)
    probe = run("backfill", "--json")
    assert probe.returncode == 0 and "psycopg" not in probe.stderr
    missing = run("ship", "--postgres-url", "postgresql://x@127.0.0.1/db")
    # what works from a clone (no distribution of that name is published), and both ways of giving
    # the database named, since either may be the one the user typed
    for answer in (missing, run("run", ARCHIVER_POSTGRES_URL="postgresql://x@127.0.0.1/db")):
        assert answer.returncode == 2, answer.stderr
        assert "pip install -e '.[postgres]'" in answer.stderr and "desto-archiver[postgres]" not in answer.stderr
        assert "--postgres-url or ARCHIVER_POSTGRES_URL" in answer.stderr
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, archiver.commands.cli, archiver.daemon.pipeline, archiver.archive.reader; "
            "print('psycopg' in sys.modules)",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert loaded.stdout.strip() == "False"


def test_reading_commands_read_the_central_database_across_hosts(
    redis, redis_server, db_path, pg_url, capsys, tmp_path
):
    ids = _archive(redis, redis_server, db_path)
    other = tmp_path / "gpu2" / "desto.db"
    other.parent.mkdir()
    subprocess.run(["cp", str(db_path), str(other)], check=True)
    conn = sqlite3.connect(other)
    conn.execute("UPDATE sessions SET status = 'failed' WHERE session_id = ?", (ids[2],))
    conn.commit()
    conn.close()
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    _ship(other, pg_url, "gpu2", capsys=capsys)

    def run(*args: str) -> str:
        capsys.readouterr()
        assert main([*args, "--postgres-url", pg_url]) == 0
        return capsys.readouterr().out

    everything = json.loads(run("history", "--json"))
    assert sorted({s["source_name"] for s in everything}) == ["gpu1", "gpu2"] and len(everything) == 10
    failed = json.loads(run("history", "--json", "--status", "failed"))
    assert [(s["source_name"], s["session_id"]) for s in failed] == [("gpu2", ids[2])]
    assert len(json.loads(run("history", "--json", "--source", "gpu1"))) == 5
    table = run("history", "--source", "gpu2", "--status", "failed")
    assert "gpu2" in table and ids[2][:8] in table and "source_name" in table

    stats = json.loads(run("stats", "--json"))
    assert stats["records"]["sessions"]["total"] == 10 and stats["records"]["sessions"]["tombstoned"] == 2
    assert [s["source"] for s in stats["sources"]] == ["gpu1", "gpu2"]
    assert stats["quarantine"]["total"] == 2
    assert "gpu2" in run("stats", "--source", "gpu2")

    header = run("export", "sessions", "--format", "csv", "--source", "gpu1").splitlines()[0]
    assert header.startswith("source_name,session_id,") and "file_id" not in header
    quarantined = [json.loads(line) for line in run("export", "quarantine").splitlines()]
    assert len(quarantined) == 2 and quarantined[0]["payload"] == "not a hash"

    capsys.readouterr()
    assert main(["history", "--source", "gpu1", "--db", str(db_path)]) == 2
    assert "--postgres-url" in capsys.readouterr().err


def test_the_documented_queries_run_on_a_shipped_database(redis, redis_server, db_path, pg_url, capsys):
    """Every SQL example of docs/postgresql.md runs as written (the role grants aside)."""
    ids = _archive(redis, redis_server, db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE jobs SET status = 'failed', end_time = start_time WHERE session_id = ?", (ids[1],))
    conn.execute("UPDATE sessions SET status = 'failed' WHERE session_id = ?", (ids[1],))
    conn.commit()
    conn.close()
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    text = (REPO / "docs" / "postgresql.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```sql\n")[1:]]
    queries = [b for b in blocks if b.lstrip().upper().startswith("SELECT")]
    assert len(queries) >= 4
    with psycopg.connect(pg_url) as pg:
        results = [pg.execute(q).fetchall() for q in queries]
    failed_this_week, per_day = results[1], results[2]
    assert [(r[0], r[3]) for r in failed_this_week] == [("gpu1", 0)]
    assert sum(r[2] for r in per_day) == 5 and sum(r[3] for r in per_day) == 1


def test_an_older_read_never_overwrites_a_newer_central_row(redis, redis_server, db_path, pg_url, capsys):
    """The version guard: a central row written from a newer read (another file of the same host,
    e.g. before a restore) keeps its state when an older read of the record is shipped."""
    ids = _archive(redis, redis_server, db_path)
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute(
            "UPDATE desto_archiver.sessions SET status = 'failed', read_at_us = read_at_us + 1000000 "
            "WHERE session_id = %s",
            (ids[1],),
        )
        pg.execute(
            "UPDATE desto_archiver.sessions SET read_at_us = read_at_us - 1000000 WHERE session_id = %s", (ids[2],)
        )
    _ship(db_path, pg_url, "gpu1", capsys=capsys)
    central = {r["session_id"]: r for r in pg_rows(pg_url, "sessions")}
    assert central[ids[1]]["status"] == "failed"  # newer than the file's: kept
    assert central[ids[2]]["read_at_us"] == file_rows_of(db_path, ids[2])  # older: replaced by the file's


def file_rows_of(db_path: Path, session_id: str) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT read_at_us FROM sessions WHERE session_id = ?", (session_id,)).fetchone()[0]
    finally:
        conn.close()


def test_a_backup_restored_over_the_file_is_copied_again_under_a_new_file_id(
    redis, redis_server, db_path, pg_url, capsys, tmp_path
):
    """A restored copy's change log is behind what PostgreSQL holds: its numbers would be taken for
    changes already shipped. The shipper notices, names the file anew and copies it whole; the
    history shipped from the file before keeps its own rows."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    with daemon_thread(settings):
        ids = _fill(redis)
        wait_for(lambda: _count(db_path, "sessions") == 5, 10)
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2)
    backup = tmp_path / "backup.db"
    assert main(["backup", "--db", str(db_path), str(backup)]) == 0
    with daemon_thread(settings) as daemon:
        for sid in ids[:3]:
            redis.hset(f"desto:session:{sid}", "status", "finished")
        wait_for(lambda: daemon.shipper is not None and daemon.shipper.backlog == 0 and daemon.shipper.shipped > 3, 15)
        old_id = daemon.shipper.shipper.file_id
    for suffix in ("-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    subprocess.run(["cp", str(backup), str(db_path)], check=True)
    with daemon_thread(settings) as daemon:
        assert daemon.shipper is not None
        wait_for(lambda: daemon.shipper.copies == 1 and daemon.shipper.backlog == 0, 15, what="the copy")
        assert daemon.shipper.shipper.file_id != old_id
        # the restored file caught up from Redis; the newest read of each record is the one kept
        wait_for(lambda: _count(db_path, "status_history") > 0, 5)
        central = {r["session_id"]: r for r in pg_rows(pg_url, "sessions")}
        assert all(central[sid]["status"] == "finished" for sid in ids[:3])
        assert {r["file_id"] for r in pg_rows(pg_url, "status_history")} == {old_id, daemon.shipper.shipper.file_id}


def test_check_reports_how_far_shipping_is_behind(redis, redis_server, db_path, pg_url, capsys):
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    with daemon_thread(settings) as daemon:
        _fill(redis, 3)
        wait_for(lambda: _count(db_path, "sessions") == 3, 10)
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2, what="PG = file")
        wait_for(lambda: daemon.shipper is not None and daemon.shipper.backlog == 0, 10)
        base = ["check", "--json", "--no-verify", "--db", str(db_path), "--redis-url", redis_server.url]
        capsys.readouterr()
        main([*base, "--postgres-url", pg_url, "--source", "gpu1"])
        found = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
        assert found["postgres"]["status"] == "ok" and "0 changes waiting" in found["postgres"]["detail"]
        main([*base, "--postgres-url", pg_url.rsplit("/", 1)[0] + "/no_such_database", "--source", "gpu1"])
        report = json.loads(capsys.readouterr().out)
        postgres = next(c for c in report["checks"] if c["check"] == "postgres")
        assert postgres["status"] == "fail" and "no_such_database" in postgres["detail"] and not report["ok"]


def test_values_postgres_cannot_hold_as_they_are_are_shipped_readable(redis, redis_server, db_path, pg_url, capsys):
    """Another writer of the file may leave text that is not UTF-8, a NUL, or a word where desto
    keeps a number: the row is shipped (such a value made readable, or NULL), never refused forever."""
    ids = _archive(redis, redis_server, db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE sessions SET session_name = CAST(X'6e616d65ff00' AS TEXT) WHERE session_id = ?", (ids[1],))
    conn.execute("UPDATE sessions SET tmux_active = 'yes' WHERE session_id = ?", (ids[2],))
    conn.execute("UPDATE jobs SET exit_code = 3.0 WHERE session_id = ?", (ids[3],))
    conn.commit()
    conn.close()
    report = _ship(db_path, pg_url, "gpu1", capsys=capsys)
    assert report["copied"]["sessions"] == 5
    central = {r["session_id"]: r for r in pg_rows(pg_url, "sessions")}
    assert central[ids[1]]["session_name"] == "name\ufffd\ufffd"
    assert central[ids[2]]["tmux_active"] is None
    assert [r["exit_code"] for r in pg_rows(pg_url, "jobs") if r["session_id"] == ids[3]] == [3]


def test_status_history_after_its_newest_row_was_deleted_is_shipped(redis, redis_server, db_path, pg_url):
    """New status-history rows are found by number, not logged. Deleting the highest row (by
    hand, or an erasure) must not make the next row's number one PostgreSQL counts as shipped:
    the next rows get numbers above every one given before, and reach PostgreSQL."""
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    with daemon_thread(settings):
        ids = _fill(redis, 3)
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2, what="PG = file")
        for round_ in range(2):
            conn = sqlite3.connect(db_path, timeout=10)
            with conn:
                top = conn.execute("SELECT max(id) FROM status_history").fetchone()[0]
                conn.execute("DELETE FROM status_history WHERE id = ?", (top,))
            conn.close()
            if round_ == 0:  # the deletion shipped before the next row is written
                wait_for(lambda top=top: top not in {r["id"] for r in pg_rows(pg_url, "status_history")}, 10)
            redis.hset(f"desto:session:{ids[round_]}", "status", "failed")
            wait_for(lambda top=top: (_max_history(db_path) or 0) > top, 10, what="a new history row")
            wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2, what="PG = file")
        by_id = {r["id"]: r for r in pg_rows(pg_url, "status_history")}
        assert by_id[_max_history(db_path)]["status"] == "failed"


def _max_history(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT max(id) FROM status_history").fetchone()[0]
    finally:
        conn.close()


def test_an_erased_record_is_erased_centrally_too(redis, redis_server, db_path, pg_url, capsys):
    """forget (and desto's History tab) erase a record: the central database must not keep what
    the file no longer holds, its history included (a secret in a command line)."""
    secret = f"token-{uuid.uuid4().hex}"
    settings = settings_for(redis_server, db_path, postgres_url=pg_url, source_name="gpu1", ship_interval=0.05)
    with daemon_thread(settings):
        kept = _fill(redis, sessions=2)
        s = session_hash(session_name="leaky")
        j = job_hash(session_id=s["session_id"], command=f"curl -H 'Authorization: {secret}' x", status="finished")
        redis.hset(f"desto:session:{s['session_id']}", mapping=s)
        redis.hset(f"desto:job:{j['job_id']}", mapping=j)
        wait_for(lambda: any(r["job_id"] == j["job_id"] for r in pg_rows(pg_url, "jobs")), 15, what="shipped")
        capsys.readouterr()
        assert main(["forget", "--db", str(db_path), s["session_id"]]) == 0
        redis.hset(f"desto:job:{j['job_id']}", "error_message", "changed after the erasure")

        def central_mentions() -> list[str]:
            with psycopg.connect(pg_url) as conn:
                found = []
                for table in ("sessions", "jobs", "status_history", "quarantine"):
                    rows = conn.execute(f"SELECT t::text FROM desto_archiver.{table} t").fetchall()
                    found += [table for (text,) in rows if s["session_id"] in text or secret in text]
                return found

        wait_for(lambda: central_mentions() == [], 15, interval=0.2, what="the erasure shipped")
        wait_for(lambda: central_differences(pg_url, db_path, "gpu1") == [], 15, interval=0.2, what="PG = file")
    assert {r["session_id"] for r in pg_rows(pg_url, "sessions")} >= set(kept)
