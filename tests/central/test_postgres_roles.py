"""Many hosts, one database, a role per host: each host may write only its own source's rows,
every host reads them all, and only the database's owner changes the schema's version and who may
write which source (``desto-archiver grant``).

Every test uses a database of its own on the machine's PostgreSQL (``pg_url``, whose user owns
it) and skips with the reason where none answers. Roles are cluster-wide: each test makes its
own, with a random name, and drops them."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from archiver.commands.cli import main
from tests.helpers import daemon_thread, session_hash, settings_for, wait_for
from tests.pg_helpers import central_differences, login_roles, pg_rows


def as_role(pg_url: str, role: str) -> str:
    return pg_url.replace("postgres@", f"{role}@")


def grant(pg_url: str, source: str, role: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["grant", "--postgres-url", pg_url, "--source", source, "--role", role, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def archive(redis, redis_server, db_path: Path, sessions: int) -> None:
    redis.flushdb()
    db_path.parent.mkdir(exist_ok=True)
    for _ in range(sessions):
        s = session_hash()
        redis.hset(f"desto:session:{s['session_id']}", mapping=s)
    assert main(["backfill", "--db", str(db_path), "--redis-url", redis_server.url]) == 0


def ship(db_path: Path, url: str, source: str) -> int:
    return main(["ship", "--db", str(db_path), "--postgres-url", url, "--source", source])


def position(pg_url: str, source: str) -> tuple[str, int | None]:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT file_id, position FROM desto_archiver.ship_positions WHERE source_name = %s", (source,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_host_s_role_cannot_delete_update_or_insert_another_host_s_rows_nor_touch_the_schema(
    redis, redis_server, pg_url, tmp_path, capsys
):
    """Two hosts, two roles, set up as docs/postgresql.md says (the owner's `grant`). Host B's
    credentials must not delete, change or add host A's rows (its sessions, its position), nor
    write the schema's version (one row there stopped every host's shipping for good) or who may
    write which source, even with the broad grant the documentation used to give; both hosts ship,
    and each reads every host's rows."""
    a_db, b_db = tmp_path / "a" / "desto.db", tmp_path / "b" / "desto.db"
    with login_roles(pg_url, 2) as (role_a, role_b):
        report = grant(pg_url, "a", role_a, capsys)
        assert report["source"] == "a" and report["role"] == role_a
        grant(pg_url, "b", role_b, capsys)
        archive(redis, redis_server, a_db, 3)
        assert ship(a_db, as_role(pg_url, role_a), "a") == 0
        archive(redis, redis_server, b_db, 2)
        assert ship(b_db, as_role(pg_url, role_b), "b") == 0
        assert central_differences(pg_url, a_db, "a") == [] and central_differences(pg_url, b_db, "b") == []
        a_position = position(pg_url, "a")

        with psycopg.connect(pg_url, autocommit=True) as owner:  # what the documentation used to grant
            owner.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA desto_archiver TO {role_b}")
        with psycopg.connect(as_role(pg_url, role_b), autocommit=True) as b:
            assert b.execute("SELECT count(*) FROM desto_archiver.sessions").fetchone()[0] == 5  # reads all
            for statement in (
                "DELETE FROM desto_archiver.sessions WHERE source_name = 'a'",
                "UPDATE desto_archiver.sessions SET status = 'failed' WHERE source_name = 'a'",
                "DELETE FROM desto_archiver.ship_positions WHERE source_name = 'a'",
                "UPDATE desto_archiver.ship_positions SET position = 0 WHERE source_name = 'a'",
                "UPDATE desto_archiver.sources SET role_name = current_user",
                "DELETE FROM desto_archiver.archiver_schema",
            ):
                assert b.execute(statement).rowcount == 0, statement
            for statement in (
                "INSERT INTO desto_archiver.sessions (source_name, file_id, session_id) VALUES ('a', 'x', 'y')",
                "INSERT INTO desto_archiver.ship_positions (source_name, file_id) VALUES ('c', 'x')",
                "INSERT INTO desto_archiver.archiver_schema (version) VALUES (99)",
                "INSERT INTO desto_archiver.sources (source_name, role_name) VALUES ('a', current_user)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    b.execute(statement)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                b.execute("TRUNCATE desto_archiver.sessions")
        assert central_differences(pg_url, a_db, "a") == [] and position(pg_url, "a") == a_position

        # both go on shipping, the daemon's batches too; a central reader with B's role sees both hosts
        settings = settings_for(
            redis_server, a_db, postgres_url=as_role(pg_url, role_a), source_name="a", ship_interval=0.05
        )
        with daemon_thread(settings):
            s = session_hash()
            redis.hset(f"desto:session:{s['session_id']}", mapping=s)
            wait_for(lambda: central_differences(pg_url, a_db, "a") == [], 15, interval=0.2, what="A shipped on")
        assert ship(b_db, as_role(pg_url, role_b), "b") == 0
        capsys.readouterr()
        assert main(["stats", "--json", "--postgres-url", as_role(pg_url, role_b)]) == 0
        assert [s["source"] for s in json.loads(capsys.readouterr().out)["sources"]] == ["a", "b"]


def test_a_role_not_granted_its_source_is_told_what_the_owner_must_run_and_ships_once_granted(
    redis, redis_server, db_path, pg_url, capsys
):
    """A host whose role may not write its source (no `grant` yet, or another host's role) stops
    with what the database's owner must run; the daemon keeps trying, and ships once it is run."""
    archive(redis, redis_server, db_path, 2)
    with login_roles(pg_url, 2) as (role_a, role_b):
        grant(pg_url, "a", role_a, capsys)
        grant(pg_url, "b", role_b, capsys)
        capsys.readouterr()
        assert ship(db_path, as_role(pg_url, role_b), "a") == 2  # B's role, A's source
        err = capsys.readouterr().err
        assert f"role {role_b!r} may not write the rows of source 'a'" in err, err
        assert f"desto-archiver grant --postgres-url <owner's URL> --source a --role {role_b}" in err, err
        assert pg_rows(pg_url, "sessions", "a") == []
        base = ["check", "--json", "--no-verify", "--no-daemon", "--db", str(db_path), "--redis-url", redis_server.url]
        main([*base, "--postgres-url", as_role(pg_url, role_b), "--source", "a"])
        found = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["postgres"]
        assert found["status"] == "fail" and "may not write the rows of source 'a'" in found["detail"], found
        assert f"--source a --role {role_b}" in found["hint"], found

        settings = settings_for(
            redis_server, db_path, postgres_url=as_role(pg_url, role_b), source_name="c", ship_interval=0.05,
            reconnect_max_backoff=0.5,
        )  # fmt: skip
        with daemon_thread(settings) as daemon:
            assert daemon.shipper is not None
            wait_for(lambda: daemon.shipper.failing and "may not write" in daemon.shipper.failing, 10, what="told")
            assert "--source c --role" in daemon.shipper.failing
            grant(pg_url, "c", role_b, capsys)
            wait_for(
                lambda: central_differences(pg_url, db_path, "c") == [] and daemon.shipper.failing is None,
                15,
                interval=0.2,
                what="shipped, and the shipper's failure cleared",
            )
            assert daemon.shipper.refused is None
            grant(pg_url, "c", role_a, capsys)  # the owner gives the source to another role
            s = session_hash()
            redis.hset(f"desto:session:{s['session_id']}", mapping=s)
            wait_for(lambda: daemon.shipper.failing and "may not write" in daemon.shipper.failing, 10, what="told")
            assert s["session_id"] not in {r["session_id"] for r in pg_rows(pg_url, "sessions", "c")}


def test_grant_is_the_owner_s_and_names_a_role_that_exists(redis, redis_server, db_path, pg_url, capsys):
    with login_roles(pg_url, 1) as (role,):
        capsys.readouterr()
        assert main(["grant", "--postgres-url", pg_url, "--source", "a", "--role", "nobody_" + role]) == 2
        assert f"no role 'nobody_{role}'" in capsys.readouterr().err
        assert main(["grant", "--postgres-url", pg_url, "--source", "a", "--role", role]) == 0
        assert f"role '{role}' may write the rows of source 'a' in postgresql://postgres@" in capsys.readouterr().out
        assert main(["grant", "--postgres-url", as_role(pg_url, role), "--source", "a", "--role", role]) == 2
        assert "the database's owner" in capsys.readouterr().err
        assert main(["grant", "--postgres-url", pg_url, "--role", role]) == 2
        assert "--source" in capsys.readouterr().err


def test_an_existing_central_database_is_upgraded_by_the_owner_s_grant(
    redis, redis_server, db_path, pg_url, capsys, monkeypatch
):
    """A central database of schema 3 shipped to by a role with the DML the documentation gave: the
    new version refuses that role until the owner runs `grant` (which upgrades the schema first)."""
    from archiver.central import postgres

    archive(redis, redis_server, db_path, 2)
    with login_roles(pg_url, 1) as (role,):
        with monkeypatch.context() as old:
            old.setattr(postgres, "PG_SCHEMA_VERSION", 3)
            assert ship(db_path, pg_url, "setup") == 0  # the owner creates schema 3
            with psycopg.connect(pg_url, autocommit=True) as owner:
                database = pg_url.rsplit("/", 1)[1]
                owner.execute(f"GRANT CONNECT ON DATABASE {database} TO {role}")
                owner.execute(f"GRANT USAGE ON SCHEMA desto_archiver TO {role}")
                owner.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA desto_archiver TO {role}")
            assert ship(db_path, as_role(pg_url, role), "a") == 0
        capsys.readouterr()
        assert ship(db_path, as_role(pg_url, role), "a") == 2  # the role may not upgrade the schema
        assert "its owner upgrades it once, with `desto-archiver grant" in capsys.readouterr().err
        settings = settings_for(
            redis_server, db_path, postgres_url=as_role(pg_url, role), source_name="a", ship_interval=0.05,
            reconnect_max_backoff=0.5,
        )  # fmt: skip
        with daemon_thread(settings) as daemon:  # a host upgraded before the owner's run waits for it
            assert daemon.shipper is not None
            wait_for(lambda: daemon.shipper.failing and "owner upgrades it" in daemon.shipper.failing, 10)
            report = grant(pg_url, "a", role, capsys)
            assert report["schema_version"] == postgres.PG_SCHEMA_VERSION
            assert report["not_granted"] == ["setup"]  # a source already there that no role may write yet
            s = session_hash()
            redis.hset(f"desto:session:{s['session_id']}", mapping=s)
            wait_for(lambda: central_differences(pg_url, db_path, "a") == [], 15, interval=0.2, what="shipped")
            assert daemon.shipper.refused is None
        assert ship(db_path, as_role(pg_url, role), "a") == 0
