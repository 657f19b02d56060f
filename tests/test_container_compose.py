"""desto's own docker-compose.yml with compose.override.yml, run as a user runs it: the images built,
the stack started in both orders, desto's managers working inside desto's container while the
archiver keeps everything, its health check, `check`, `docker stop`, `down` and `up` again, and
desto's Session History tab in a real browser.

The tests of this module share one stack and run in order."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser_helpers import chromium_unavailable, history_tab
from tests.container_helpers import (
    ARTIFACTS,
    ComposeProject,
    Image,
    docker,
    in_netns,
    inspect,
    mb,
    wait_healthy,
)
from tests.helpers import REPO, wait_for

pytestmark = pytest.mark.container

DESTO_COMPOSE = REPO / "tests" / "fixtures" / "desto-compose.yml"
DASHBOARD_CONTEXT = REPO / "tests" / "fixtures" / "desto-dashboard"
SCENARIO = REPO / "tests" / "fixtures" / "desto_scenario.py"
PROJECT = "destoarchivertier"
ARCHIVER, DASHBOARD, REDIS = "desto-archiver", "desto-dashboard", "desto-redis"  # desto's container names
DATA = "/app/desto_data"
# Docker runs the first health check one interval (30 s) after the start: a healthy archiver
# takes that long to be reported, however fast it is.
HEALTHY_WITHIN = 90


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, archiver_image: Image, dashboard_image: Image):
    """desto's checkout: its compose file, unchanged but for the dashboard's build (desto's own
    Dockerfile needs downloads this tier cannot make), and this repository cloned inside."""
    folder = tmp_path_factory.mktemp("desto")
    text = DESTO_COMPOSE.read_text()
    desto_build = "    build:\n      context: .\n      dockerfile: Dockerfile\n"
    assert text.count(desto_build) == 1
    (folder / "docker-compose.yml").write_text(
        text.replace(desto_build, f"    build:\n      context: {DASHBOARD_CONTEXT}\n      dockerfile: Dockerfile\n")
    )
    (folder / "desto-archiver").symlink_to(REPO, target_is_directory=True)
    stack = ComposeProject(folder, PROJECT)
    # The images under the names compose gives them, built once with the host's network.
    for service, image in (
        ("archiver", archiver_image),
        ("archiver-init", archiver_image),
        ("dashboard", dashboard_image),
    ):
        for name in stack.image_names(service):
            docker("tag", image.name, name)
    stack.down(volumes=True)  # what an interrupted run may have left
    yield stack
    logs = stack.compose("logs", "--no-color", "--tail", "200", check=False)
    (ARTIFACTS / "compose.log").parent.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "compose.log").write_text(logs.stdout + logs.stderr)
    stack.down(volumes=True)


def desto_python(code: str) -> Any:
    """Python in desto's container, as desto's processes run there; returns the JSON it prints last."""
    result = docker("exec", DASHBOARD, "python3", "-c", code, timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


ARCHIVE_QUERY = """
import json, sqlite3, sys
conn = sqlite3.connect("file:/app/desto_data/desto.db?mode=ro", uri=True)
out = {}
for table, key in (("sessions", "session_id"), ("jobs", "job_id"), ("favorites", "favorite_id")):
    extra = ", status" if table != "favorites" else ", name"
    out[table] = {row[0]: {"value": row[1], "read_at_us": row[2]}
                  for row in conn.execute(f"SELECT {key}{extra}, read_at_us FROM {table}")}
out["history"] = conn.execute("SELECT count(*) FROM status_history").fetchone()[0]
print(json.dumps(out))
"""


def archive() -> dict[str, Any]:
    """The archive's rows, read in desto's container: the status (a favorite's name) and the read
    version only the archiver writes (desto's own store, writing the same file, leaves it empty)."""
    return desto_python(ARCHIVE_QUERY)


def scenario(prefix: str) -> dict[str, Any]:
    options = ["-e", f"SCENARIO_PREFIX={prefix}"]
    result = docker("exec", "-i", *options, DASHBOARD, "python3", "-", input=SCENARIO.read_text(), timeout=180)
    return json.loads(result.stdout.strip().splitlines()[-1])


def archived_by_the_archiver(done: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Wait until every session, job and favorite of a scenario is in the archive as the archiver
    read it from Redis, each session in its final status."""

    def settled() -> dict[str, Any] | None:
        rows = archive()
        sessions = rows["sessions"]
        for session_id, status in done["sessions"].values():
            row = sessions.get(session_id)
            if row is None or row["value"] != status or not row["read_at_us"]:
                return None
        for table, ids in (("jobs", done["jobs"]), ("favorites", done["favorites"])):
            if any(not rows[table].get(i, {}).get("read_at_us") for i in ids):
                return None
        return rows

    return wait_for(settled, timeout, interval=0.5, what="the scenario in the archive")


def volume_files(container: str) -> dict[str, tuple[int, int, int]]:
    """name -> (uid, gid, mode) of the desto_data volume's folder and files, as a container that
    mounts it sees them (stat only: nothing opens the archive's files)."""
    listing = docker("exec", container, "sh", "-c", f"stat -c '%n %u %g %a' {DATA} {DATA}/*").stdout
    files = {}
    for line in listing.splitlines():
        path, uid, gid, mode = line.rsplit(" ", 3)
        files["desto_data" if path == DATA else path.rsplit("/", 1)[1]] = (int(uid), int(gid), int(mode, 8))
    return files


def logged_events(container: str) -> list[dict[str, Any]]:
    result = docker("logs", container, check=False)
    events = []
    for line in (result.stdout + result.stderr).splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


# ─── the image ───────────────────────────────────────────────────────────────────────────────────


def test_image_builds_and_runs_as_a_user_with_its_health_check(archiver_image: Image) -> None:
    config = inspect(archiver_image.name)["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["desto-archiver"] and config["Cmd"] == ["run"]
    assert config["Healthcheck"]["Test"] == ["CMD", "desto-archiver", "health"]
    print(f"\nimage {archiver_image.name}: {mb(archiver_image.size)}, {mb(archiver_image.added)} over its base")
    # The wheels and nothing else on top of the slim base: no compiler, no source tree.
    assert archiver_image.added < 60e6, mb(archiver_image.added)
    listing = docker("run", "--rm", "--entrypoint", "sh", archiver_image.name, "-c", "ls /app; command -v gcc || true")
    assert listing.stdout.split() == ["desto_data"], listing.stdout


# ─── the stack, archiver first ───────────────────────────────────────────────────────────────────


def test_archiver_first_turns_healthy_and_owns_the_volume(project: ComposeProject) -> None:
    started = time.monotonic()
    project.up("archiver")  # with Redis and archiver-init, as depends_on says
    wait_healthy(ARCHIVER, HEALTHY_WITHIN)
    took = time.monotonic() - started
    print(f"\nstart to healthy (archiver first, fresh volumes): {took:.1f} s")
    assert inspect(project.container("archiver-init"))["State"]["ExitCode"] == 0
    files = volume_files(ARCHIVER)
    assert files["desto_data"][:2] == (1000, 1000) and files["desto.db"][:2] == (1000, 1000), files
    assert not any(mode & 0o007 for _, _, mode in files.values()), f"world access: {files}"

    project.up("dashboard")
    wait_for(
        lambda: docker("exec", DASHBOARD, "curl", "-sf", "http://localhost:8809", check=False).returncode == 0,
        60,
        interval=0.5,
        what="desto's dashboard answering",
    )


def test_desto_managers_in_desto_container_are_all_archived(project: ComposeProject) -> None:
    done = scenario("")
    rows = archived_by_the_archiver(done)
    assert {rows["sessions"][sid]["value"] for sid, _ in done["sessions"].values()} == {
        "finished",
        "failed",
        "running",
        "scheduled",
    }
    assert rows["history"] > 0
    names = {row["value"] for row in rows["favorites"].values()}
    assert {"disk usage", "tail syslog"} <= names
    # desto's own reader, in desto's container, opens the archive and lists them.
    listed = desto_python(
        "import json; from desto.redis.sqlite_store import SQLiteStore; "
        "s = SQLiteStore(db_path='/app/desto_data/desto.db'); "
        "print(json.dumps({x.session_id: x.status.value for x in s.get_all_sessions(limit=100)}))"
    )
    assert {sid: status for sid, status in done["sessions"].values()}.items() <= listed.items()


def test_check_passes_inside_the_container(project: ComposeProject) -> None:
    result = docker("exec", ARCHIVER, "desto-archiver", "check", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    health = docker("exec", ARCHIVER, "desto-archiver", "health")
    assert health.stdout.startswith("healthy"), health.stdout


def test_the_container_is_read_only_and_not_root(project: ComposeProject) -> None:
    host = inspect(ARCHIVER)["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] or "ALL" in host["CapDrop"]
    assert docker("exec", ARCHIVER, "id", "-u").stdout.strip() == "1000"
    status = docker("exec", ARCHIVER, "cat", "/proc/1/status").stdout
    assert "\nUid:\t1000\t1000\t1000\t1000" in status, "PID 1, the daemon, runs as 1000"
    refused = docker("exec", ARCHIVER, "touch", "/app/written", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused.stderr


def test_history_tab_shows_the_archived_sessions(project: ComposeProject, tmp_path: Path) -> None:
    reason = chromium_unavailable()
    if reason:
        pytest.skip(reason)
    expected = archive()["sessions"]
    names = desto_python(
        "import json, sqlite3; c = sqlite3.connect('file:/app/desto_data/desto.db?mode=ro', uri=True); "
        "print(json.dumps(dict(c.execute('SELECT session_name, status FROM sessions'))))"
    )
    assert len(names) == len(expected) >= 4
    with history_tab(in_netns(DASHBOARD), tmp_path) as tab:
        wait_for(lambda: len(tab.sessions()) >= len(names), 20, interval=0.5, what="the history cards")
        assert tab.sessions() == names
        assert tab.stat("Total") == len(names)
        assert tab.stat("Failed") == sum(status == "failed" for status in names.values())
        assert tab.delete_button(next(iter(names))).count() == 1
        tab.screenshot(ARTIFACTS / "dashboard.png", whole_page=True)
        shot = tab.screenshot(ARTIFACTS / "history-tab.png")
    print(f"\nscreenshots: {shot} and dashboard.png beside it")


ERASED_QUERY = """
import json, sqlite3
conn = sqlite3.connect("file:/app/desto_data/desto.db?mode=ro", uri=True)
print(json.dumps({
    "sessions": dict(conn.execute("SELECT session_id, session_name FROM sessions")),
    "erased": {r[0]: r[1] for r in conn.execute("SELECT record_id, how FROM archiver_erased WHERE kind = 'session'")},
}))
"""


def reconciled_after_restart() -> None:
    """Restart the archiver and wait for its start reconcile: everything Redis holds read again."""
    before = sum(e.get("event") == "reconcile.done" for e in logged_events(ARCHIVER))
    docker("restart", ARCHIVER, timeout=90)
    wait_for(
        lambda: sum(e.get("event") == "reconcile.done" for e in logged_events(ARCHIVER)) > before,
        60,
        interval=0.5,
        what="the restarted archiver's reconcile",
    )


def touch_in_redis(session_ids: list[str]) -> None:
    """A change to each session in Redis, as desto's heartbeat makes: a keyspace event for each."""
    desto_python(
        "import json, datetime; from desto.redis import DestoRedisClient; r = DestoRedisClient().redis; "
        "now = datetime.datetime.now().isoformat(); "
        f"[r.hset(f'desto:session:{{s}}', 'last_heartbeat', now) for s in {session_ids!r}]; "
        "print(json.dumps(True))"
    )


def test_history_tab_delete_and_clear_history_stick(project: ComposeProject, tmp_path: Path) -> None:
    """desto's dialog promises the session is permanently removed: the archiver must not bring it
    back, not at the session's next change in Redis, nor when it reconciles everything Redis holds."""
    reason = chromium_unavailable()
    if reason:
        pytest.skip(reason)
    before = desto_python(ERASED_QUERY)["sessions"]
    assert len(before) >= 2
    gone_id, gone_name = next(iter(before.items()))
    with history_tab(in_netns(DASHBOARD), tmp_path) as tab:
        wait_for(lambda: gone_name in tab.sessions(), 20, interval=0.5, what="the card to delete")
        tab.delete(gone_name)
        wait_for(lambda: gone_name not in tab.sessions(), 10, interval=0.5, what="desto to drop the card")
    touch_in_redis([gone_id])
    reconciled_after_restart()
    after = desto_python(ERASED_QUERY)
    assert gone_id not in after["sessions"] and after["erased"].get(gone_id) == "desto", after
    assert set(after["sessions"]) == set(before) - {gone_id}
    with history_tab(in_netns(DASHBOARD), tmp_path) as tab:
        wait_for(lambda: len(tab.sessions()) == len(before) - 1, 20, interval=0.5, what="the other cards")
        assert gone_name not in tab.sessions()
        tab.clear_history()
        wait_for(lambda: not tab.sessions(), 10, interval=0.5, what="desto to clear the tab")
    touch_in_redis(list(before))
    reconciled_after_restart()
    cleared = desto_python(ERASED_QUERY)
    assert cleared["sessions"] == {}, cleared
    assert set(cleared["erased"]) == set(before)
    with history_tab(in_netns(DASHBOARD), tmp_path) as tab:
        tab.page.wait_for_timeout(2000)  # the tab has rendered its (empty) list
        assert tab.sessions() == {} and tab.stat("Total") == 0
        tab.screenshot(ARTIFACTS / "history-tab-cleared.png")


def test_docker_stop_writes_the_pending_batch_and_exits_0(project: ComposeProject) -> None:
    # A batch held back for 30 s (one more file over the two, for this test only), so the changes
    # below are surely still pending in the daemon when `docker stop` sends SIGTERM.
    (project.folder / "hold-batches.yml").write_text(
        "services:\n  archiver:\n    environment:\n      - ARCHIVER_FLUSH_INTERVAL=30\n"
    )
    holding = ComposeProject(project.folder, project.name, [*project.files, "hold-batches.yml"])
    holding.up("archiver")
    wait_for(
        lambda: any(e.get("event") == "reconcile.done" for e in logged_events(ARCHIVER)),
        60,
        interval=0.5,
        what="the held archiver's first reconcile",
    )
    added = desto_python(
        "import json; from desto.redis import DestoRedisClient; "
        "from desto.redis.favorites_manager import FavoriteCommandsManager as F; "
        "m = F(DestoRedisClient()); "
        "print(json.dumps([m.add_favorite(f'pending {i}', f'echo {i}').favorite_id for i in range(50)]))"
    )
    time.sleep(1)
    assert not any(archive()["favorites"].get(i) for i in added), "written before the stop: nothing was pending"
    docker("stop", ARCHIVER, timeout=60)
    state = inspect(ARCHIVER)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    stopped = [e for e in logged_events(ARCHIVER) if e.get("event") == "archiver.stopped"][-1]
    print(f"\ndocker stop: exit 0, {stopped['flushed_at_stop']} keys flushed at the stop")
    assert stopped["flushed_at_stop"] >= len(added) and stopped["left_for_next_start"] == 0, stopped
    favorites = archive()["favorites"]
    assert all(favorites.get(i, {}).get("read_at_us") for i in added), "every pending change written at the stop"


def test_down_then_up_keeps_the_archive(project: ComposeProject) -> None:
    before = archive()
    project.down()
    project.up("archiver", "dashboard")
    # The health command itself, not Docker's schedule of it (measured above): the daemon is back.
    wait_for(
        lambda: docker("exec", ARCHIVER, "desto-archiver", "health", check=False).returncode == 0,
        60,
        interval=0.5,
        what="the archiver healthy again",
    )
    after = archive()
    for table in ("sessions", "jobs", "favorites"):
        assert set(before[table]) <= set(after[table]), table
    assert after["history"] >= before["history"]


# ─── the stack, desto's dashboard first ──────────────────────────────────────────────────────────


def test_dashboard_first_then_archiver_gets_the_volume(project: ComposeProject) -> None:
    project.down(volumes=True)
    project.up("dashboard")
    # desto, as root, creates desto_data and its database in it before the archiver exists.
    wait_for(
        lambda: docker("exec", DASHBOARD, "test", "-s", f"{DATA}/desto.db", check=False).returncode == 0,
        60,
        interval=0.5,
        what="desto's own database",
    )
    assert volume_files(DASHBOARD)["desto.db"][:2] == (0, 0)
    started = time.monotonic()
    project.up("archiver")
    wait_healthy(ARCHIVER, HEALTHY_WITHIN)
    print(f"\nstart to healthy (dashboard first): {time.monotonic() - started:.1f} s")
    files = volume_files(ARCHIVER)
    assert {owner[:2] for owner in files.values()} == {(1000, 1000)}, files
    assert not any(mode & 0o007 for _, _, mode in files.values()), f"world access: {files}"
    done = scenario("second-")
    archived_by_the_archiver(done)
    assert docker("exec", ARCHIVER, "desto-archiver", "check", check=False).returncode == 0
