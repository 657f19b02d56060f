"""Coexistence with desto's built-in SQLite store (SQLITE_ENABLED=true) on the same file: either
may create it first, and both may write it at the same time, without either one failing and with
the archive ending equal to Redis."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

from desto.redis import DestoJob, DestoManager, SessionStatus, SQLiteStore
from desto.redis.models import FavoriteCommand

from archiver.archive.schema import SCHEMA_VERSION, TRACKING_COLUMNS
from archiver.archive.store import Batch, Store
from archiver.kinds import Kind
from tests.archive.test_store import T0, history, read
from tests.desto_helpers import (
    archived_favorites,
    archiver_log,
    desto_client,
    desto_log,
    problems,
    redis_job,
    redis_session,
    settle,
    sqlite_failures,
    start_session,
)
from tests.helpers import daemon_thread, job_hash, query, row, session_hash, settings_for, wait_for

DESTO_COLUMNS = {
    "sessions": [
        "session_id",
        "session_name",
        "tmux_session_name",
        "status",
        "start_time",
        "end_time",
        "last_heartbeat",
        "job_ids",
        "tmux_active",
        "at_job_id",
        "created_at",
        "updated_at",
    ],
    "jobs": [
        "job_id",
        "session_id",
        "command",
        "script_path",
        "status",
        "start_time",
        "end_time",
        "exit_code",
        "error_message",
        "created_at",
        "updated_at",
    ],
    "favorites": ["favorite_id", "name", "command", "created_at", "last_used_at", "use_count", "updated_at"],
}


def _value(db_path: Path, table: str, id_col: str, record_id: str, column: str) -> object:
    found = row(db_path, table, id_col, record_id)
    return None if found is None else found[column]


def _columns(db_path: Path, table: str) -> list[str]:
    return [r["name"] for r in query(db_path, f"PRAGMA table_info({table})")]


def _schema(db_path: Path) -> tuple[int, list[tuple[str, str, str | None]]]:
    objects = query(db_path, "SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    return query(db_path, "PRAGMA user_version")[0][0], [tuple(o) for o in objects]


def test_archiver_migrates_a_file_desto_created_and_keeps_desto_rows(redis, redis_server, db_path: Path) -> None:
    client = desto_client(redis_server)
    with desto_log() as desto_errors:
        desto_store = SQLiteStore(db_path=str(db_path))
        manager = DestoManager(client, sqlite_store=desto_store)
        # Archived by desto's store; its keys have since left Redis (desto's 7-day TTL).
        old, old_job = start_session(manager, redis, "old-backup", "bash backup.sh", "/app/desto_scripts/backup.sh")
        assert manager.finish_job("old-backup", 0)
        assert manager.finish_session("old-backup")
        # Failed the way mark_job_finished.py does it: desto's store keeps the session 'running'.
        stuck, stuck_job = start_session(manager, redis, "stuck-sync", "bash sync.sh", "/app/desto_scripts/sync.sh")
        assert manager.fail_job("stuck-sync", "exit code 2")
        assert manager.session_manager.fail_session(stuck.session_id, "job exited with code 2")
        # Saved through desto's store API, never in Redis.
        legacy_favorite = FavoriteCommand(name="legacy", command="echo legacy", created_at=datetime.now(), use_count=3)
        assert desto_store.save_favorite(legacy_favorite)
        assert redis.delete(f"desto:session:{old.session_id}", f"desto:job:{old_job.job_id}") == 2

        desto_old_session = desto_store.get_session(old.session_id)
        desto_old_job = desto_store.get_job(old_job.job_id)
        assert desto_old_session is not None and desto_old_session.status is SessionStatus.FINISHED
        assert desto_old_job is not None and desto_old_job.status.value == "finished"
        assert desto_store.get_session(stuck.session_id).status is SessionStatus.RUNNING
        desto_store.close()
        assert _schema(db_path)[0] == 0
        assert {t: _columns(db_path, t) for t in DESTO_COLUMNS} == DESTO_COLUMNS

        with daemon_thread(settings_for(redis_server, db_path)):
            live_manager = DestoManager(client)
            fresh, fresh_job = start_session(
                live_manager, redis, "fresh-run", "bash run.sh", "/app/desto_scripts/run.sh"
            )
            assert live_manager.finish_job("fresh-run", 0)
            assert live_manager.finish_session("fresh-run")
            favorite = live_manager.favorites_manager.add_favorite("fresh", "echo fresh")
            assert favorite is not None
            reader = SQLiteStore(db_path=str(db_path))
            settle(redis, db_path)
            wait_for(
                lambda: _value(db_path, "sessions", "session_id", old.session_id, "gone_at"),
                10,
                what="the session desto archived, gone from Redis, marked gone",
            )

        # Migrated in place: desto's columns as they were, the archiver's added after them.
        assert _schema(db_path)[0] == SCHEMA_VERSION
        for table, desto_columns in DESTO_COLUMNS.items():
            columns = _columns(db_path, table)
            assert columns[: len(desto_columns)] == desto_columns
            assert {name for name, _ in TRACKING_COLUMNS} <= set(columns[len(desto_columns) :])

        # desto's own rows are kept as desto wrote them; those no longer in Redis are marked gone.
        assert reader.get_session(old.session_id) == desto_old_session
        assert reader.get_job(old_job.job_id) == desto_old_job
        assert archived_favorites(reader)[legacy_favorite.favorite_id] == legacy_favorite
        for table, id_col, record_id in (
            ("sessions", "session_id", old.session_id),
            ("jobs", "job_id", old_job.job_id),
            ("favorites", "favorite_id", legacy_favorite.favorite_id),
        ):
            assert _value(db_path, table, id_col, record_id, "gone_reason") == "missing"
        # The failure desto's store missed is archived from Redis over desto's stale row.
        assert reader.get_session(stuck.session_id) == redis_session(redis, stuck.session_id)
        assert reader.get_session(stuck.session_id).status is SessionStatus.FAILED
        assert reader.get_job(stuck_job.job_id) == redis_job(redis, stuck_job.job_id)
        # Everything reads back through desto's store, its rows and the archiver's alike.
        sessions = reader.get_all_sessions()
        assert {s.session_id for s in sessions} == {old.session_id, stuck.session_id, fresh.session_id}
        assert [j.job_id for j in reader.get_jobs_for_session(fresh.session_id)] == [fresh_job.job_id]
        assert [j.job_id for j in reader.get_jobs_for_session(old.session_id)] == [old_job.job_id]
        assert set(archived_favorites(reader)) == {legacy_favorite.favorite_id, favorite.favorite_id}
        assert reader.get_stats() == {"sessions": 3, "jobs": 3, "favorites": 2}
        assert reader.get_session_count(status="failed") == 1
        reader.close()
    assert sqlite_failures(desto_errors) == []


def test_desto_store_opens_and_writes_a_file_the_archiver_created(redis, redis_server, db_path: Path) -> None:
    client = desto_client(redis_server)
    manager = DestoManager(client)
    with daemon_thread(settings_for(redis_server, db_path)):
        earlier, earlier_job = start_session(manager, redis, "earlier", "bash a.sh", "/app/desto_scripts/a.sh")
        assert manager.finish_job("earlier", 0)
        assert manager.finish_session("earlier")
        wait_for(
            lambda: _value(db_path, "sessions", "session_id", earlier.session_id, "status") == "finished",
            10,
            what="the session archived",
        )
    schema = _schema(db_path)
    assert schema[0] == SCHEMA_VERSION

    with desto_log() as desto_errors:
        desto_store = SQLiteStore(db_path=str(db_path))
        assert _schema(db_path) == schema  # desto's CREATE ... IF NOT EXISTS changed nothing
        assert desto_store.get_session(earlier.session_id) == redis_session(redis, earlier.session_id)
        assert desto_store.get_jobs_for_session(earlier.session_id) == [redis_job(redis, earlier_job.job_id)]

        desto_manager = DestoManager(client, sqlite_store=desto_store)
        later, later_job = start_session(desto_manager, redis, "later", "bash b.sh", "/app/desto_scripts/b.sh")
        assert desto_manager.finish_job("later", 0)
        assert desto_manager.finish_session("later")
        assert desto_store.get_session(later.session_id) == redis_session(redis, later.session_id)
        assert desto_store.get_job(later_job.job_id) == redis_job(redis, later_job.job_id)
        favorite = FavoriteCommand(name="desto-saved", command="echo saved", created_at=datetime.now())
        assert desto_store.save_favorite(favorite)
        assert archived_favorites(desto_store)[favorite.favorite_id] == favorite
        assert {s.session_id for s in desto_store.get_all_sessions()} == {earlier.session_id, later.session_id}

        # The archiver starts again on the file desto wrote to, and archives on.
        with daemon_thread(settings_for(redis_server, db_path)):
            assert _schema(db_path)[0] == SCHEMA_VERSION
            fm = manager.favorites_manager
            assert fm.add_favorite("after-restart", "echo again") is not None
            settle(redis, db_path)
        assert desto_store.get_stats() == {"sessions": 2, "jobs": 2, "favorites": 2}
        desto_store.close()
    assert sqlite_failures(desto_errors) == []


class _SlowerStore(SQLiteStore):
    """desto's store in a desto process slower than the archiver: a job is saved only once the
    archive already holds it as Redis has it, so desto's write lands last."""

    def __init__(self, db_path: Path, r) -> None:
        super().__init__(db_path=str(db_path))
        self.r = r

    def save_job(self, job: DestoJob) -> bool:
        wait_for(lambda: self.get_job(job.job_id) == redis_job(self.r, job.job_id), 10, what="the job archived")
        return super().save_job(job)


def test_a_stale_save_by_desto_store_does_not_outlive_the_redis_record(redis, redis_server, db_path: Path) -> None:
    # start_session_with_job saves the job object queue_job returned (status queued) although the
    # job already runs in Redis; for a scheduled session nothing changes the job afterwards.
    with daemon_thread(settings_for(redis_server, db_path)):
        desto_store = _SlowerStore(db_path, redis)
        manager = DestoManager(desto_client(redis_server), sqlite_store=desto_store)
        session, job = start_session(
            manager, redis, "scheduled-later", "bash later.sh", "/app/desto_scripts/later.sh", SessionStatus.SCHEDULED
        )
        assert redis_job(redis, job.job_id).status.value == "running"
        settle(redis, db_path)
        assert desto_store.get_job(job.job_id).status.value == "running"
        assert desto_store.get_session(session.session_id) == redis_session(redis, session.session_id)
        desto_store.close()


SESSIONS = 30


def test_desto_store_and_archiver_write_the_same_file_concurrently(redis, redis_server, db_path: Path) -> None:
    client = desto_client(redis_server)
    expected: dict[str, SessionStatus] = {}
    failures: list[BaseException] = []

    def lifecycles(store: SQLiteStore) -> None:
        try:
            manager = DestoManager(client, sqlite_store=store)
            for i in range(SESSIONS):
                name, variant = f"batch-{i:02d}", i % 5
                script = f"/app/desto_scripts/step{i}.sh"
                if variant == 4:
                    session, _ = start_session(manager, redis, name, f"bash {script}", script, SessionStatus.SCHEDULED)
                    expected[session.session_id] = SessionStatus.SCHEDULED
                    continue
                session, _ = start_session(manager, redis, name, f"bash {script}", script)
                if variant == 0:  # a chained job, started when the first one finishes
                    assert manager.add_job_to_session(name, f"bash {script} --next", script) is not None
                    assert manager.finish_job(name, 0)
                    assert manager.finish_job(name, 0)
                    assert manager.finish_session(name)
                    expected[session.session_id] = SessionStatus.FINISHED
                elif variant == 1:
                    assert manager.finish_job(name, 0)
                    assert manager.finish_session(name)
                    expected[session.session_id] = SessionStatus.FINISHED
                else:  # failed as mark_job_finished.py does on a non-zero exit
                    assert manager.fail_job(name, f"exit code {variant}")
                    assert manager.session_manager.fail_session(session.session_id, f"exit code {variant}")
                    expected[session.session_id] = SessionStatus.FAILED
        except BaseException as exc:
            failures.append(exc)
        finally:
            store.close()

    with (
        desto_log() as desto_errors,
        archiver_log() as archiver_events,
        daemon_thread(settings_for(redis_server, db_path)),
    ):
        desto_store = SQLiteStore(db_path=str(db_path))
        worker = threading.Thread(target=lifecycles, args=(desto_store,), name="desto-lifecycles")
        worker.start()
        fm = DestoManager(client).favorites_manager  # favorites meanwhile, which only the archiver keeps
        for i in range(10):
            favorite = fm.add_favorite(f"fav-{i}", f"echo {i}")
            assert favorite is not None
            assert fm.increment_usage(favorite.favorite_id)
        worker.join(timeout=60)
        assert not worker.is_alive(), "desto's lifecycles did not finish"
        assert failures == []
        view = settle(redis, db_path)
    assert sqlite_failures(desto_errors) == []
    assert problems(archiver_events) == []

    assert len(view.sessions) == SESSIONS and len(view.favorites) == 10
    assert {sid: s.status for sid, s in view.sessions.items()} == expected
    for session_id, status in expected.items():
        assert desto_store.get_session(session_id).status is status
    counts = {s: desto_store.get_session_count(status=s) for s in ("finished", "failed", "scheduled", "running")}
    assert counts == {"finished": 12, "failed": 12, "scheduled": 6, "running": 0}
    assert desto_store.get_stats() == {"sessions": SESSIONS, "jobs": SESSIONS + 6, "favorites": 10}
    desto_store.close()


def test_a_status_desto_s_own_store_wrote_first_still_gets_its_history(db_path: Path) -> None:
    """desto's store may save a change before the archiver reads it: the read then finds the values
    it would write already there. Its status is still a change the history records, once, and the
    next change is measured from it."""
    store = Store.open(db_path)
    session = session_hash()
    sid = session["session_id"]
    record = job_hash(session_id=sid, status="failed", exit_code="1")
    jid = record["job_id"]
    store.apply(Batch([read(Kind.SESSION, sid, session, T0), read(Kind.JOB, jid, record, T0)]))
    desto = SQLiteStore(str(db_path))
    try:
        at = T0
        for status, exit_code in (("finished", "0"), ("failed", "1"), ("failed", "1"), ("finished", "0")):
            at += 1_000_000
            record = {**record, "status": status, "exit_code": exit_code}
            assert desto.save_job(DestoJob.from_dict(record))
            store.apply(Batch([read(Kind.JOB, jid, record, at)]))
    finally:
        desto.close()
        store.close()
    assert [(event, status) for event, status, *_ in history(db_path, jid)] == [
        ("first_seen", "failed"),
        ("status", "finished"),
        ("status", "failed"),
        ("status", "finished"),
    ]
