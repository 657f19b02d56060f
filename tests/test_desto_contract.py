"""The desto contract: desto 0.7.0's own managers drive full lifecycles against Redis while the
daemon runs, and desto's own SQLiteStore, opened on the archive, reads back exactly what desto's
models read from Redis, the History tab's queries work, deleted records keep their last state
under a tombstone, and the status history holds the transitions that were observed."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import redis as redis_py
from desto.redis import DestoJob, DestoManager, DestoSession, SessionStatus, SQLiteStore
from desto.redis.models import FavoriteCommand

from tests.desto_helpers import (
    RedisView,
    archived_atjob,
    archived_favorites,
    desto_client,
    desto_log,
    history,
    redis_favorite,
    redis_job,
    redis_session,
    renames,
    settle,
    sqlite_failures,
    start_session,
    transitions,
)
from tests.fault_helpers import archive_differences
from tests.helpers import atjob_hash, daemon_thread, query, row, settings_for, wait_for

AT_JOB_NUMBER = "42"


@dataclass
class Scenario:
    r: redis_py.Redis
    db_path: Path
    store: SQLiteStore
    sessions: dict[str, str]  # role -> session id
    jobs: dict[str, str]  # role -> job id
    favorites: dict[str, str]  # role -> favorite id
    deleted_session: DestoSession  # its last state in Redis before desto deleted it
    deleted_favorite: FavoriteCommand  # same
    view: RedisView  # Redis when the archive settled
    desto_errors: list[str]


def _archived_like_redis(store: SQLiteStore, r: redis_py.Redis, kind: str, record_id: str) -> bool:
    if kind == "session":
        return store.get_session(record_id) == redis_session(r, record_id)
    if kind == "job":
        return store.get_job(record_id) == redis_job(r, record_id)
    return archived_favorites(store).get(record_id) == redis_favorite(r, record_id)


@pytest.fixture(scope="module")
def scenario(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    r = redis_server.client()
    r.flushall()
    r.config_set("notify-keyspace-events", "")  # the daemon turns on what it needs
    db_path = tmp_path_factory.mktemp("contract") / "desto_data" / "desto.db"
    with desto_log() as desto_errors, daemon_thread(settings_for(redis_server, db_path)):
        store = SQLiteStore(db_path=str(db_path))
        manager = DestoManager(desto_client(redis_server), sqlite_store=None)
        sm, fm = manager.session_manager, manager.favorites_manager

        def archived(kind: str, record_id: str, what: str) -> None:
            wait_for(lambda: _archived_like_redis(store, r, kind, record_id), 10, what=what)

        # A session with a chained second job: the chained job starts when the first finishes.
        build, build_first = start_session(manager, r, "nightly-build", "bash build.sh", "/app/desto_scripts/build.sh")
        build_chained = manager.add_job_to_session("nightly-build", "bash deploy.sh", "/app/desto_scripts/deploy.sh")
        assert build_chained is not None
        archived("job", build_chained.job_id, "the chained job archived while queued")
        assert manager.finish_job("nightly-build", 0)
        assert redis_job(r, build_chained.job_id).status.value == "running"
        assert manager.finish_job("nightly-build", 0)
        assert manager.finish_session("nightly-build")

        # A session whose job fails, failed the way desto's mark_job_finished.py does it.
        broken, broken_job = start_session(manager, r, "flaky-tests", "pytest -x", "/app/desto_scripts/tests.sh")
        assert manager.fail_job("flaky-tests", "exit code 1")
        assert sm.fail_session(broken.session_id, "job exited with code 1")

        # A scheduled session, with the at-job that will start it, later cancelled.
        report, report_job = start_session(
            manager, r, "weekly-report", "bash report.sh", "/app/desto_scripts/report.sh", SessionStatus.SCHEDULED
        )
        atjob_key = f"desto:atjob:{AT_JOB_NUMBER}"
        r.hset(
            atjob_key,
            mapping=atjob_hash(
                AT_JOB_NUMBER,
                command="tmux new-session -d -s weekly-report 'bash report.sh'",
                session_name="weekly-report",
                script_path=json.dumps(["/app/desto_scripts/report.sh"]),
                user="desto",
            ),
        )
        r.hset(f"desto:session:{report.session_id}", "at_job_id", AT_JOB_NUMBER)
        wait_for(
            lambda: (archived_atjob(db_path, AT_JOB_NUMBER) or {}).get("status") == "scheduled",
            10,
            what="the at-job archived while scheduled",
        )
        r.hset(atjob_key, "status", "cancelled")

        # A finished session that desto's per-session delete removes from Redis.
        scratch, scratch_job = start_session(manager, r, "scratch-build", "make", "/app/desto_scripts/make.sh")
        assert manager.finish_job("scratch-build", 0)
        assert manager.finish_session("scratch-build")
        archived("session", scratch.session_id, "the finished session archived before its delete")
        deleted_session = redis_session(r, scratch.session_id)
        assert r.delete(f"desto:session:{scratch.session_id}") == 1

        # Favorites: used, renamed, its command changed; another deleted and its name reused.
        deploy = fm.add_favorite("deploy", "make deploy")
        assert deploy is not None
        assert fm.increment_usage(deploy.favorite_id)
        assert fm.increment_usage(deploy.favorite_id)
        archived("favorite", deploy.favorite_id, "the favorite archived under its first name")
        assert fm.update_favorite(deploy.favorite_id, name="deploy-prod") is not None
        assert fm.update_favorite(deploy.favorite_id, command="make deploy ENV=prod") is not None
        cleanup = fm.add_favorite("cleanup", "rm -rf build")
        assert cleanup is not None
        assert fm.increment_usage(cleanup.favorite_id)
        archived("favorite", cleanup.favorite_id, "the favorite archived before its delete")
        deleted_favorite = redis_favorite(r, cleanup.favorite_id)
        assert fm.delete_favorite(cleanup.favorite_id)
        cleanup_again = fm.add_favorite("cleanup", "rm -rf build dist")
        deploy_again = fm.add_favorite("deploy", "make deploy ENV=staging")
        assert cleanup_again is not None and deploy_again is not None

        view = settle(r, db_path)
        yield Scenario(
            r=r,
            db_path=db_path,
            store=store,
            sessions={
                "chained": build.session_id,
                "failed": broken.session_id,
                "scheduled": report.session_id,
                "deleted": scratch.session_id,
            },
            jobs={
                "first": build_first.job_id,
                "chained": build_chained.job_id,
                "failed": broken_job.job_id,
                "scheduled": report_job.job_id,
                "deleted_session": scratch_job.job_id,
            },
            favorites={
                "renamed": deploy.favorite_id,
                "deleted": cleanup.favorite_id,
                "reused": cleanup_again.favorite_id,
                "reused_after_rename": deploy_again.favorite_id,
            },
            deleted_session=deleted_session,
            deleted_favorite=deleted_favorite,
            view=view,
            desto_errors=desto_errors,
        )
        store.close()
    r.flushall()
    r.close()


def test_every_live_record_reads_back_through_desto_store_as_from_redis(scenario: Scenario) -> None:
    view = scenario.view
    assert view.unknown == [], "desto wrote keys that no comparison covers"
    assert set(view.sessions) == {scenario.sessions[k] for k in ("chained", "failed", "scheduled")}
    assert set(view.jobs) == set(scenario.jobs.values())
    assert set(view.favorites) == {scenario.favorites[k] for k in ("renamed", "reused", "reused_after_rename")}
    assert set(view.atjobs) == {AT_JOB_NUMBER}
    # The records are read again now, one by one, with desto's readers on both sides.
    store, r = scenario.store, scenario.r
    for session_id in view.sessions:
        assert store.get_session(session_id) == redis_session(r, session_id)
    for job_id in view.jobs:
        assert store.get_job(job_id) == redis_job(r, job_id)
    archived = archived_favorites(store)
    for favorite_id in view.favorites:
        assert archived[favorite_id] == redis_favorite(r, favorite_id)
    assert archive_differences(r, scenario.db_path) == []
    assert sqlite_failures(scenario.desto_errors) == []


def test_lifecycle_end_states_are_archived(scenario: Scenario) -> None:
    store = scenario.store
    chained = store.get_session(scenario.sessions["chained"])
    assert chained is not None
    assert chained.status is SessionStatus.FINISHED and chained.end_time is not None
    assert chained.job_ids == [scenario.jobs["first"], scenario.jobs["chained"]]
    for role in ("first", "chained"):
        job = store.get_job(scenario.jobs[role])
        assert job is not None and job.status.value == "finished" and job.exit_code == 0 and job.end_time is not None
    failed = store.get_session(scenario.sessions["failed"])
    assert failed is not None and failed.status is SessionStatus.FAILED and failed.end_time is not None
    failed_job = store.get_job(scenario.jobs["failed"])
    assert failed_job is not None
    assert (failed_job.status.value, failed_job.error_message) == ("failed", "exit code 1")
    scheduled = store.get_session(scenario.sessions["scheduled"])
    assert scheduled is not None
    assert (scheduled.status, scheduled.at_job_id) == (SessionStatus.SCHEDULED, AT_JOB_NUMBER)
    renamed = archived_favorites(store)[scenario.favorites["renamed"]]
    assert (renamed.name, renamed.command, renamed.use_count) == ("deploy-prod", "make deploy ENV=prod", 2)
    assert renamed.last_used_at is not None


def test_atjob_row_holds_the_hash_fields_as_text(scenario: Scenario) -> None:
    fields = scenario.r.hgetall(f"desto:atjob:{AT_JOB_NUMBER}")
    assert fields["status"] == "cancelled"
    assert archived_atjob(scenario.db_path, AT_JOB_NUMBER) == fields
    at_row = row(scenario.db_path, "at_jobs", "at_job_id", AT_JOB_NUMBER)
    assert at_row is not None and at_row["gone_at"] is None
    assert json.loads(at_row["script_path"]) == ["/app/desto_scripts/report.sh"]
    assert transitions(scenario.db_path, "atjob", AT_JOB_NUMBER) == [("scheduled", None), ("cancelled", "scheduled")]


def test_history_tab_queries_work_on_the_archive(scenario: Scenario) -> None:
    store, ids = scenario.store, scenario.sessions
    everything = store.get_all_sessions(limit=100)
    assert {s.session_id for s in everything} == set(ids.values())
    for session in everything:
        assert store.get_session(session.session_id) == session
    assert {s.session_id for s in store.search_sessions("build")} == {ids["chained"], ids["deleted"]}
    assert {s.session_id for s in store.search_sessions("build", status="finished")} == {ids["chained"], ids["deleted"]}
    assert [s.session_id for s in store.search_sessions("flaky")] == [ids["failed"]]
    assert [s.session_id for s in store.get_all_sessions(status="scheduled")] == [ids["scheduled"]]
    assert store.get_session_count() == 4
    counts = {
        status: store.get_session_count(status=status) for status in ("finished", "failed", "running", "scheduled")
    }
    assert counts == {"finished": 2, "failed": 1, "running": 0, "scheduled": 1}

    def by_id(jobs: list[DestoJob]) -> list[DestoJob]:
        return sorted(jobs, key=lambda job: job.job_id)

    jobs = store.get_jobs_for_session(ids["chained"])
    assert by_id(jobs) == by_id([redis_job(scenario.r, scenario.jobs[k]) for k in ("first", "chained")])
    assert [j.job_id for j in store.get_jobs_for_session(ids["failed"])] == [scenario.jobs["failed"]]
    # The deleted session's job is still in Redis, and its session still in the History tab.
    assert [j.job_id for j in store.get_jobs_for_session(ids["deleted"])] == [scenario.jobs["deleted_session"]]
    assert store.get_stats() == {"sessions": 4, "jobs": 5, "favorites": 4}


def test_deleted_records_keep_their_last_state_under_a_tombstone(scenario: Scenario) -> None:
    db_path, store = scenario.db_path, scenario.store
    session_id = scenario.sessions["deleted"]
    assert scenario.r.exists(f"desto:session:{session_id}") == 0
    assert scenario.deleted_session.status is SessionStatus.FINISHED
    assert store.get_session(session_id) == scenario.deleted_session
    session_row = row(db_path, "sessions", "session_id", session_id)
    assert session_row is not None and session_row["gone_at"] is not None
    assert session_row["gone_reason"] == "deleted"
    assert history(db_path, "session", session_id)[-1].event == "deleted"

    favorite_id = scenario.favorites["deleted"]
    assert scenario.r.exists(f"desto:favorite:{favorite_id}") == 0
    favorite_row = row(db_path, "favorites", "favorite_id", favorite_id)
    assert favorite_row is not None and favorite_row["gone_at"] is not None
    assert favorite_row["gone_reason"] == "deleted"
    assert favorite_row["real_name"] == "cleanup"
    archived = archived_favorites(store)[favorite_id]
    # desto's favorites.name is UNIQUE and the live favorite now holds "cleanup": only the
    # archived name of the deleted one differs from its last state; real_name keeps the original.
    assert archived.name != "cleanup"
    assert archived == dataclasses.replace(scenario.deleted_favorite, name=archived.name)
    assert archived_favorites(store)[scenario.favorites["reused"]].name == "cleanup"
    assert history(db_path, "favorite", favorite_id)[-1].event == "deleted"
    live = {r[0] for r in query(db_path, "SELECT favorite_id FROM favorites WHERE gone_at IS NULL")}
    assert live == {scenario.favorites[k] for k in ("renamed", "reused", "reused_after_rename")}


def test_status_history_holds_the_observed_transitions(scenario: Scenario) -> None:
    db_path, sessions, jobs = scenario.db_path, scenario.sessions, scenario.jobs
    run_then = [("starting", None), ("running", "starting")]
    assert transitions(db_path, "session", sessions["chained"]) == [*run_then, ("finished", "running")]
    assert transitions(db_path, "session", sessions["failed"]) == [*run_then, ("failed", "running")]
    assert transitions(db_path, "session", sessions["deleted"]) == [*run_then, ("finished", "running")]
    assert transitions(db_path, "session", sessions["scheduled"]) == [("scheduled", None)]
    assert transitions(db_path, "job", jobs["chained"]) == [
        ("queued", None),
        ("running", "queued"),
        ("finished", "running"),
    ]
    assert transitions(db_path, "job", jobs["first"])[-1] == ("finished", "running")
    assert transitions(db_path, "job", jobs["failed"])[-1] == ("failed", "running")

    # The failure carries desto's own time of the change, from its message on desto:session_updates.
    failed_end = scenario.store.get_session(sessions["failed"]).end_time

    def failed_entry():
        entries = [e for e in history(db_path, "session", sessions["failed"]) if e.status == "failed"]
        return entries[0] if entries and entries[0].desto_timestamp else None

    entry = wait_for(failed_entry, 10, what="desto's timestamp on the failed transition")
    assert 0 <= (datetime.fromisoformat(entry.desto_timestamp) - failed_end).total_seconds() < 5

    assert renames(db_path, scenario.favorites["renamed"]) == [{"from": "deploy", "to": "deploy-prod"}]
