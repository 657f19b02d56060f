"""``restore favorites``: desto's favorites lost by a flush written back from the archive, so desto's
own FavoriteCommandsManager lists, runs and edits them again; what a person deleted stays deleted,
a name another favorite took meanwhile is never overwritten, and a Redis user without the grant
gets told which one it lacks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from desto.redis import DestoManager
from desto.redis.favorites_manager import FavoriteCommandsManager

from tests.desto_helpers import desto_client
from tests.fault_helpers import assert_archive_equals_redis, start_ready
from tests.helpers import REPO, daemon_env, query, wait_for


def restore(server, db_path: Path, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = daemon_env(server, db_path)
    if url is not None:
        env["REDIS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "archiver", "restore", "favorites", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(manager: FavoriteCommandsManager) -> dict[str, dict[str, Any]]:
    return {f.favorite_id: f.to_dict() for f in manager.list_favorites()}


def history(db_path: Path, favorite_id: str) -> list[tuple[str, Any]]:
    rows = query(db_path, "SELECT event, detail FROM status_history WHERE record_id = ? ORDER BY id", (favorite_id,))
    return [(r["event"], json.loads(r["detail"]) if r["detail"] else None) for r in rows]


def last_event(db_path: Path, favorite_id: str) -> str | None:
    events = history(db_path, favorite_id)
    return events[-1][0] if events else None


def favorites_in_archive(db_path: Path, ids: set[str]) -> bool:
    found = query(db_path, "SELECT favorite_id FROM favorites")
    return ids <= {r["favorite_id"] for r in found}


def the_outcomes(build, lint, deploy, old, other) -> dict[str, str]:
    """What the restore does with the flush scenario's favorites: two restored, the name another
    favorite took now a conflict, the one a person deleted left alone, the new one already there."""
    return {
        build.favorite_id: "restored",
        lint.favorite_id: "restored",
        deploy.favorite_id: "conflict",
        old.favorite_id: "deleted",
        other.favorite_id: "in redis",
    }


def test_favorites_flushed_come_back_as_desto_had_them(redis_server, redis, db_path, daemons):
    manager = FavoriteCommandsManager(desto_client(redis_server))
    daemon = start_ready(daemons, redis_server, db_path)
    build = manager.add_favorite("build", "make -j8")
    deploy = manager.add_favorite("deploy", "./deploy.sh prod")
    lint = manager.add_favorite("lint", "ruff check .")
    old = manager.add_favorite("old", "echo old")
    assert build and deploy and lint and old
    wait_for(lambda: favorites_in_archive(db_path, {old.favorite_id}), 5, what="the favorites archived")
    for _ in range(3):
        assert manager.increment_usage(build.favorite_id)
    assert manager.increment_usage(lint.favorite_id)
    assert manager.update_favorite(lint.favorite_id, name="check")
    assert manager.delete_favorite(old.favorite_id)
    before = listed(manager)
    assert set(before) == {build.favorite_id, deploy.favorite_id, lint.favorite_id}
    assert_archive_equals_redis(redis, db_path, timeout=10)
    wait_for(lambda: last_event(db_path, old.favorite_id) == "deleted", 5, what="desto's delete archived")

    redis.flushall()
    # the daemon notices at its next reconcile (a reconnect here): the favorites went missing
    assert redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    daemon.wait_reconcile("reconnect")
    assert last_event(db_path, build.favorite_id) == "missing"
    # meanwhile someone creates a favorite with the name of one the flush took
    other = manager.add_favorite("deploy", "./deploy.sh staging")
    assert other is not None

    done = restore(redis_server, db_path, "--json")
    assert done.returncode == 1, done.stderr  # the conflict is a problem to look at
    report = json.loads(done.stdout)
    outcomes = {f["favorite_id"]: f["outcome"] for f in report["favorites"]}
    assert outcomes == the_outcomes(build, lint, deploy, old, other)
    conflict = next(f for f in report["favorites"] if f["outcome"] == "conflict")
    assert other.favorite_id in conflict["detail"]

    after = listed(manager)
    assert after[build.favorite_id] == before[build.favorite_id]  # use count, times, name: as desto had them
    assert after[lint.favorite_id] == before[lint.favorite_id]  # under its new name
    assert after[build.favorite_id]["use_count"] == "3"
    assert after[other.favorite_id]["command"] == "./deploy.sh staging"  # never overwritten
    assert set(after) == {build.favorite_id, lint.favorite_id, other.favorite_id}  # the deleted one stays deleted
    assert manager.get_favorite_by_name("check").favorite_id == lint.favorite_id

    # the archive follows: every restored favorite reappeared, and says how
    assert_archive_equals_redis(redis, db_path, timeout=10)
    for favorite in (build, lint):
        events = history(db_path, favorite.favorite_id)
        assert events[-2][0] == "missing"
        assert events[-1] == ("reappeared", {"how": "restored", "by": "desto-archiver restore favorites"})
    assert last_event(db_path, old.favorite_id) == "deleted"
    assert not query(db_path, "SELECT name FROM archiver_state WHERE name LIKE 'restoring:%'")

    # desto runs and edits them as its own
    assert manager.increment_usage(build.favorite_id)
    assert manager.update_favorite(build.favorite_id, name="build-all")
    assert manager.get_favorite_by_name("build-all").use_count == 4
    wait_for(lambda: last_event(db_path, build.favorite_id) == "renamed", 5, what="the rename archived")

    again = restore(redis_server, db_path, "--json")
    assert {f["outcome"] for f in json.loads(again.stdout)["favorites"]} == {"in redis", "conflict", "deleted"}


def test_a_flush_the_daemon_has_not_seen_yet_is_restored_and_recorded(redis_server, redis, db_path, daemons):
    """No reconcile has run since the flush: the restore itself records the favorites leaving."""
    manager = FavoriteCommandsManager(desto_client(redis_server))
    start_ready(daemons, redis_server, db_path)
    kept = manager.add_favorite("kept", "true")
    assert kept
    wait_for(lambda: favorites_in_archive(db_path, {kept.favorite_id}), 5, what="the favorite archived")
    redis.flushall()

    done = restore(redis_server, db_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "restored 1 favorite"
    assert manager.get_favorite(kept.favorite_id).to_dict() == kept.to_dict()
    assert [e for e, _ in history(db_path, kept.favorite_id)] == ["first_seen", "missing", "reappeared"]


def test_dry_run_writes_nothing_and_shows_names_escaped(redis_server, redis, db_path, daemons):
    manager = FavoriteCommandsManager(desto_client(redis_server))
    start_ready(daemons, redis_server, db_path)
    odd = manager.add_favorite("red\x1b[31mname", "printf '\\033[2J'\x07")
    plain = manager.add_favorite("plain", "ls")
    assert odd and plain
    wait_for(lambda: favorites_in_archive(db_path, {odd.favorite_id, plain.favorite_id}), 5, what="archived")
    redis.flushall()
    events = len(query(db_path, "SELECT id FROM status_history"))

    text = restore(redis_server, db_path, "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "\x1b" not in text.stdout and "\x07" not in text.stdout
    assert "red\\x1b[31mname" in text.stdout
    assert text.stdout.splitlines()[0] == "would restore 2 favorites (dry run: nothing written)"

    data = json.loads(restore(redis_server, db_path, "--dry-run", "--json").stdout)
    assert data["dry_run"] and data["counts"]["would restore"] == 2
    shown = next(f for f in data["favorites"] if f["favorite_id"] == odd.favorite_id)
    assert shown["fields"] == odd.to_dict()  # exactly what desto's to_dict wrote
    assert shown["keys"]["name_index"] == "desto:favorite:name:red\x1b[31mname"

    assert redis.dbsize() == 0
    assert len(query(db_path, "SELECT id FROM status_history")) == events


def test_favorites_chosen_by_id_or_name(redis_server, redis, db_path, daemons):
    manager = FavoriteCommandsManager(desto_client(redis_server))
    start_ready(daemons, redis_server, db_path)
    a, b, gone = (manager.add_favorite(n, f"echo {n}") for n in ("a", "b", "gone"))
    assert a and b and gone
    wait_for(lambda: favorites_in_archive(db_path, {gone.favorite_id}), 5, what="the favorites archived")
    assert manager.delete_favorite(gone.favorite_id)
    wait_for(lambda: last_event(db_path, gone.favorite_id) == "deleted", 5, what="the delete archived")
    redis.flushall()

    by_id = restore(redis_server, db_path, "--id", a.favorite_id)
    assert by_id.returncode == 0, by_id.stderr
    assert manager.get_favorite(a.favorite_id) is not None and manager.get_favorite(b.favorite_id) is None

    deleted = restore(redis_server, db_path, "--name", "gone", "--json")
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["favorites"][0]["outcome"] == "deleted"
    assert manager.get_favorite(gone.favorite_id) is None
    asked = restore(redis_server, db_path, "--name", "gone", "--include-deleted")
    assert asked.returncode == 0, asked.stderr
    assert manager.get_favorite_by_name("gone").to_dict() == gone.to_dict()

    unknown = restore(redis_server, db_path, "--id", "no-such-id")
    assert unknown.returncode == 2 and "no favorite with id 'no-such-id'" in unknown.stderr
    mixed = restore(redis_server, db_path, "--all", "--name", "a")
    assert mixed.returncode == 2 and "--all" in mixed.stderr
    assert manager.get_favorite(b.favorite_id) is None  # neither wrote anything

    everything = restore(redis_server, db_path, "--all", "--json")
    assert everything.returncode == 0, everything.stderr
    outcomes = {f["favorite_id"]: f["outcome"] for f in json.loads(everything.stdout)["favorites"]}
    assert outcomes == {a.favorite_id: "in redis", b.favorite_id: "restored", gone.favorite_id: "in redis"}
    assert manager.get_favorite(b.favorite_id).to_dict() == b.to_dict()


class DestoWorkload(threading.Thread):
    """desto's own DestoManager at work: sessions started with a job, a second job chained, the
    jobs finished or failed, the sessions finished, one after another, until halted. After a flush
    the sessions under way are gone from Redis and desto's calls on them find nothing; it goes on
    with new ones."""

    def __init__(self, server) -> None:
        super().__init__(name="desto-workload", daemon=True)
        self.manager = DestoManager(desto_client(server))
        self.errors: list[BaseException] = []
        self.sessions: list[str] = []  # the ids of every session started
        self.jobs: list[str] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def started(self) -> tuple[list[str], list[str]]:
        with self._lock:
            return list(self.sessions), list(self.jobs)

    def run(self) -> None:
        number = 0
        try:
            while not self._halt.is_set():
                number += 1
                name = f"work-{number}"
                session, job = self.manager.start_session_with_job(name, "make", "/app/desto_scripts/make.sh")
                chained = self.manager.add_job_to_session(name, "make test", "/app/desto_scripts/test.sh")
                with self._lock:
                    self.sessions.append(session.session_id)
                    self.jobs.extend([job.job_id, *([chained.job_id] if chained else [])])
                self.manager.finish_job(name, 0)
                time.sleep(0.01)
                if number % 3 == 0:
                    self.manager.fail_job(name, "exit code 1")
                else:
                    self.manager.finish_job(name, 0)
                self.manager.finish_session(name)
                time.sleep(0.01)
        except BaseException as exc:  # surfaced by finish()
            self.errors.append(exc)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=15)

    def finish(self) -> None:
        self.stop()
        assert not self.is_alive(), "desto's workload did not stop"
        assert not self.errors, f"desto's workload failed: {self.errors[0]!r}"


@pytest.mark.slow
def test_favorites_flushed_under_desto_at_work_come_back_and_nothing_else_does(redis_server, redis, db_path, daemons):
    """desto's managers keep starting and ending sessions while its favorites are made, used,
    renamed and deleted, while Redis is flushed and while the favorites are written back: desto
    lists every favorite as it was, with its use count; the deleted one stays deleted, the name
    taken meanwhile is reported and not written, and no session or job is written back."""
    manager = FavoriteCommandsManager(desto_client(redis_server))
    daemon = start_ready(daemons, redis_server, db_path)
    workload = DestoWorkload(redis_server)
    try:
        workload.start()
        wait_for(lambda: len(workload.started()[0]) >= 5 or workload.errors, 15, what="desto's sessions under way")
        made = {name: manager.add_favorite(name, f"make {name}") for name in ("build", "deploy", "lint", "old")}
        assert all(made.values()), made
        build, deploy, lint, old = (made[n] for n in ("build", "deploy", "lint", "old"))
        assert build and deploy and lint and old
        ids = {f.favorite_id for f in (build, deploy, lint, old)}
        wait_for(lambda: favorites_in_archive(db_path, ids), 10, what="the favorites archived")
        for _ in range(4):
            assert manager.increment_usage(build.favorite_id)
        for _ in range(2):
            assert manager.increment_usage(deploy.favorite_id)
        assert manager.update_favorite(lint.favorite_id, name="check", command="ruff check .")
        assert manager.delete_favorite(old.favorite_id)
        before = listed(manager)
        assert set(before) == {build.favorite_id, deploy.favorite_id, lint.favorite_id}
        assert before[build.favorite_id]["use_count"] == "4"

        def archived_as_listed() -> bool:
            rows = query(db_path, "SELECT favorite_id, use_count, name FROM favorites WHERE gone_at IS NULL")
            return {r["favorite_id"]: (str(r["use_count"]), r["name"]) for r in rows} == {
                i: (f["use_count"], f["name"]) for i, f in before.items()
            }

        wait_for(archived_as_listed, 10, what="the favorites archived as desto lists them")
        wait_for(lambda: last_event(db_path, old.favorite_id) == "deleted", 10, what="desto's delete archived")

        sessions_before, jobs_before = workload.started()
        redis.flushall()
        assert redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        flushed = daemon.wait_reconcile("reconnect")
        # the flush sent no notification: the reconcile that found the favorites gone counts them
        assert flushed["missed_changes"]["favorite"] == 3, flushed
        assert last_event(db_path, build.favorite_id) == "missing"
        other = manager.add_favorite("deploy", "./deploy.sh staging")  # the name, taken meanwhile
        assert other is not None
        wait_for(lambda: len(workload.started()[0]) >= len(sessions_before) + 3, 15, what="desto at work again")

        def stale() -> set[str]:
            keys = [f"desto:session:{i}" for i in sessions_before] + [f"desto:job:{i}" for i in jobs_before]
            pipe = redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return {key for key, found in zip(keys, pipe.execute(), strict=True) if found}

        stale_before = stale()
        done = restore(redis_server, db_path, "--json")
        stale_after = stale()
        workload.finish()  # desto logs errors when the flush takes a session it is starting: not looked at
    finally:
        workload.stop()

    assert done.returncode == 1, done.stderr  # the conflict
    outcomes = {f["favorite_id"]: f["outcome"] for f in json.loads(done.stdout)["favorites"]}
    assert outcomes == the_outcomes(build, lint, deploy, old, other)
    after = listed(manager)
    assert after[build.favorite_id] == before[build.favorite_id]
    assert after[lint.favorite_id] == before[lint.favorite_id]
    assert after[build.favorite_id]["use_count"] == "4"
    assert after[other.favorite_id]["command"] == "./deploy.sh staging"  # never overwritten
    assert set(after) == {build.favorite_id, lint.favorite_id, other.favorite_id}  # the deleted one stays deleted
    assert stale_after <= stale_before, stale_after - stale_before  # no session or job written back
    for favorite in (build, lint):
        assert history(db_path, favorite.favorite_id)[-1] == (
            "reappeared",
            {"how": "restored", "by": "desto-archiver restore favorites"},
        )
    assert_archive_equals_redis(redis, db_path, timeout=15)


def archiver_acl() -> list[str]:
    """The rules of the least-privilege user docs/deployment.md gives the daemon, password ``pw``."""
    page = (REPO / "docs" / "deployment.md").read_text()
    [line] = [line for line in page.splitlines() if line.startswith("ACL SETUSER desto-archiver on ")]
    return line.replace(">CHANGE-ME", ">pw").split()[3:]


def archived_then_flushed(admin, fresh_redis, db_path, daemons, *extra_rules: str):
    """A daemon logged in as docs/deployment.md's user (``extra_rules`` added to its rules) archives
    a favorite, then Redis is flushed: (the user's URL, desto's manager, the favorite)."""
    admin.execute_command("ACL", "SETUSER", "desto-archiver", *archiver_acl())
    if extra_rules:
        admin.execute_command("ACL", "SETUSER", "desto-archiver", *extra_rules)
    url = f"redis://desto-archiver:pw@127.0.0.1:{fresh_redis.port}/0"
    manager = FavoriteCommandsManager(desto_client(fresh_redis))
    start_ready(daemons, fresh_redis, db_path, REDIS_URL=url)
    kept = manager.add_favorite("kept", "make")
    assert kept
    wait_for(lambda: favorites_in_archive(db_path, {kept.favorite_id}), 5, what="archived")
    admin.flushdb()
    return url, manager, kept


def test_a_user_without_the_grant_is_told_which_and_nothing_is_written(fresh_redis, db_path, daemons):
    """The least-privilege user of docs/deployment.md reads only: the restore names the grant it
    needs and writes nothing; with the grant added it restores."""
    admin = fresh_redis.client()
    try:
        docs = (REPO / "docs" / "deployment.md").read_text()
        assert "ACL SETUSER desto-archiver '(~desto:favorite* +hset +set +sadd)'" in docs
        url, manager, kept = archived_then_flushed(admin, fresh_redis, db_path, daemons)

        refused = restore(fresh_redis, db_path, url=url)
        assert refused.returncode == 1
        assert "+hset +set +sadd" in refused.stderr and "desto-archiver" in refused.stderr
        assert "HSET" in refused.stderr
        assert admin.dbsize() == 0  # not the hash, not the name index, not the set

        admin.execute_command("ACL", "SETUSER", "desto-archiver", "(~desto:favorite* +hset +set +sadd)")
        granted = restore(fresh_redis, db_path, url=url)
        assert granted.returncode == 0, granted.stderr
        assert manager.get_favorite_by_name("kept").to_dict() == kept.to_dict()
    finally:
        admin.close()


def test_a_user_that_may_not_run_scripts_is_told_that_and_nothing_is_written(fresh_redis, db_path, daemons):
    """The restore checks and writes in one script: a user with the favorite keys' grant but without
    EVAL and EVALSHA (the daemon itself reads with MULTI/EXEC then) is told to grant those, not
    the writes it already has."""
    admin = fresh_redis.client()
    try:
        url, manager, kept = archived_then_flushed(
            admin, fresh_redis, db_path, daemons, "(~desto:favorite* +hset +set +sadd)", "-eval", "-evalsha"
        )

        refused = restore(fresh_redis, db_path, url=url)
        assert refused.returncode == 1
        advice = refused.stderr.splitlines()[-1]
        assert "+eval +evalsha" in advice and "desto-archiver" in advice, advice
        assert "+hset +set +sadd" not in advice, advice  # the user has those
        assert admin.dbsize() == 0

        admin.execute_command("ACL", "SETUSER", "desto-archiver", "+eval", "+evalsha")
        granted = restore(fresh_redis, db_path, url=url)
        assert granted.returncode == 0, granted.stderr
        assert manager.get_favorite_by_name("kept").to_dict() == kept.to_dict()
    finally:
        admin.close()
