"""The deployment files: the image (docker/Dockerfile, .dockerignore), the compose override next to
desto's own compose file, and the systemd unit with its environment file.

No container engine is needed: compose merges the files with its own ``config``, hadolint lints the
Dockerfile, the image's entrypoint and health check run here as the image would run them, and
``systemd-analyze verify`` checks the unit.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from archiver.config import ENV_NAMES, ConfigError, load_settings
from tests.helpers import REPO, project_files

DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
OVERRIDE = REPO / "compose.override.yml"
DESTO_COMPOSE = REPO / "tests" / "fixtures" / "desto-compose.yml"
UNIT = REPO / "docker" / "systemd" / "desto-archiver.service"
UNIT_ENV = REPO / "docker" / "systemd" / "desto-archiver.env"
VENV_BIN = Path(sys.executable).parent

DESTO_DATA = "/app/desto_data"
ARCHIVER_UID = 1000


# ─── a Dockerfile reader ─────────────────────────────────────────────────────────────────────────


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if logical:
            keyword, _, rest = logical.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    assert not pending.strip(), "the Dockerfile ends inside a continued line"
    return instructions


class Stage:
    def __init__(self, image: str, name: str | None) -> None:
        self.image = image
        self.name = name
        self.instructions: list[tuple[str, str]] = []

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]


def dockerfile_stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif keyword != "ARG" or stages:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def stage_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    """The ENV a stage's processes see: its parent stages' first, then its own."""
    by_name = {s.name: s for s in stages if s.name}
    env = stage_env(stages, by_name[stage.image]) if stage.image in by_name else {}
    for rest in stage.all("ENV"):
        words = shlex.split(rest)
        if words and "=" not in words[0]:  # the legacy form: ENV KEY value
            env[words[0]] = rest.split(None, 1)[1]
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(rest: str, what: str) -> list[str]:
    try:
        value = json.loads(rest)
    except ValueError:
        pytest.fail(f"{what} is not in exec (JSON array) form: {rest}")
    assert isinstance(value, list), f"{what} is not in exec (JSON array) form: {rest}"
    assert value, f"{what} is empty"
    assert all(isinstance(v, str) for v in value), f"{what} holds a non-string: {rest}"
    return value


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its CMD in exec form."""
    rest = stage.last("HEALTHCHECK")
    match = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(.*)", rest)
    assert match, f"HEALTHCHECK without CMD: {rest}"
    options = dict(opt[2:].split("=", 1) for opt in match.group(1).split())
    return options, exec_form(match.group(2), "HEALTHCHECK CMD")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# ─── the Dockerfile ──────────────────────────────────────────────────────────────────────────────


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"{hadolint} is missing: the test extra installs it (pip install -e '.[test]', or scripts/test)")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_builds_wheels_and_installs_only_them(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2, "the image is built in stages"
    for stage in stages:
        if stage.image in {s.name for s in stages if s.name}:
            continue
        repo, _, tag = stage.image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"base image not pinned by tag: {stage.image}"
        image = stage.image.removeprefix("docker.io/library/")
        assert re.match(r"python:3\.(1[1-9]|[2-9]\d)-slim", image), f"not a slim Python 3.11+ image: {image}"
    builder = next(s for s in stages[:-1] if any("pip wheel" in r for r in s.all("RUN")))
    assert any("--wheel-dir /wheels" in r or "-w /wheels" in r for r in builder.all("RUN"))
    assert any(f"--from={builder.name}" in r for r in final.all("COPY")), "the final stage takes the builder's wheels"
    installs = [r for r in final.all("RUN") if "pip install" in r]
    assert installs and all("--no-index" in r and ".whl" in r for r in installs), installs
    assert not any(kw == "VOLUME" for s in stages for kw, _ in s.instructions), "volumes are compose's business"


def test_dockerfile_runs_the_daemon_as_pid_1_as_a_user(stages: list[Stage], final: Stage) -> None:
    assert exec_form(final.last("ENTRYPOINT"), "ENTRYPOINT") == ["desto-archiver"]
    assert exec_form(final.last("CMD"), "CMD") == ["run"]
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert final.last("WORKDIR") == "/app"

    user = final.last("USER").split(":")
    assert user[0] not in ("0", "root") and (len(user) == 1 or user[1] not in ("0", "root")), user
    assert user == [str(ARCHIVER_UID), str(ARCHIVER_UID)], "the fixed uid/gid compose.override.yml's init hands over"

    options, command = healthcheck(final)
    assert command == ["desto-archiver", "health"]
    assert options == {"interval": "30s", "timeout": "10s", "start-period": "30s", "retries": "3"}

    env = stage_env(stages, final)
    expected = {
        "DESTO_DATA_DIR": DESTO_DATA,
        "SQLITE_DB_PATH": f"{DESTO_DATA}/desto.db",
        "REDIS_HOST": "redis",
        "PYTHONUNBUFFERED": "1",
        "ARCHIVER_UMASK": "0007",
    }
    assert {k: env.get(k) for k in expected} == expected
    labels = " ".join(final.all("LABEL"))
    assert "org.opencontainers.image.title=" in labels and "org.opencontainers.image.description=" in labels


def image_labels(final: Stage) -> dict[str, str]:
    """The final stage's labels, its build arguments' defaults substituted."""
    args = {}
    for rest in final.all("ARG"):
        name, _, default = rest.partition("=")
        args[name.strip()] = default.strip().strip('"')
    labels = {}
    for rest in final.all("LABEL"):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            labels[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return labels


def test_the_image_labels_carry_the_package_s_version_licence_and_source(final: Stage) -> None:
    import tomllib

    from archiver import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    labels = image_labels(final)
    assert labels["org.opencontainers.image.version"] == __version__, "docker/Dockerfile's VERSION default"
    assert labels["org.opencontainers.image.licenses"] == project["license"] == "MIT"
    assert labels["org.opencontainers.image.source"] == project["urls"]["Source"]
    assert labels["org.opencontainers.image.documentation"] == project["urls"]["Documentation"]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_the_package_and_nothing_else(stages: list[Stage]) -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    sources = [
        word
        for stage in stages
        for rest in stage.all("COPY")
        if not rest.startswith("--from")
        for word in rest.split()[:-1]
    ]
    assert set(sources) == {"pyproject.toml", "README.md", "LICENSE", "archiver"}, sources
    listed = project_files()
    sent = {path for path in listed if not dockerignore_excludes(patterns, path)}
    needed = {p for p in listed if p in ("pyproject.toml", "README.md", "LICENSE") or p.startswith("archiver/")}
    assert needed <= sent, f"excluded but copied: {sorted(needed - sent)}"
    assert sent <= needed, f"sent for nothing: {sorted(sent - needed)}"
    for path in (".venv/bin/python", "desto_data/desto.db", "archiver/__pycache__/cli.cpython-312.pyc", ".git/HEAD"):
        assert dockerignore_excludes(patterns, path), path


# ─── the image's entrypoint and health check, run here as the image runs them ────────────────────


def test_entrypoint_and_healthcheck_as_the_image_runs_them(stages: list[Stage], final: Stage, tmp_path, fresh_redis):
    root = tmp_path / "image"

    def in_root(value: str) -> str:  # /app/... -> <tmp>/image/app/...
        return str(root) + value if value == "/app" or value.startswith("/app/") else value

    argv = exec_form(final.last("ENTRYPOINT"), "ENTRYPOINT") + exec_form(final.last("CMD"), "CMD")
    health_options, health_argv = healthcheck(final)
    health_timeout = float(health_options["timeout"].removesuffix("s"))
    start_period = float(health_options["start-period"].removesuffix("s"))

    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update({k: in_root(v) for k, v in stage_env(stages, final).items()})
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # where the image has its console script
    assert env["REDIS_HOST"] == "redis"  # compose's service name; here the test's own server
    env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(fresh_redis.port))
    # The image runs as its USER, never root; this stand-in may run as root, which needs saying.
    assert final.last("USER").split(":")[0] not in ("0", "root")
    if os.geteuid() == 0:
        env["ARCHIVER_ALLOW_ROOT"] = "true"
    workdir = Path(in_root(final.last("WORKDIR")))
    workdir.mkdir(parents=True)

    def resolve(command: list[str]) -> list[str]:
        found = shutil.which(command[0], path=str(VENV_BIN))
        assert found, f"{command[0]} is not installed in {VENV_BIN}"
        return [found, *command[1:]]

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            resolve(health_argv), cwd=workdir, env=env, capture_output=True, text=True, timeout=health_timeout
        )

    log_path = tmp_path / "archiver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(resolve(argv), cwd=workdir, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + start_period
        while True:
            result = health()
            if result.returncode == 0:
                break
            assert proc.poll() is None, f"the entrypoint exited with {proc.returncode}:\n{log_path.read_text()}"
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not healthy within the start period ({start_period:.0f} s): {result.stdout}{result.stderr}\n"
                    f"{log_path.read_text()}"
                )
            time.sleep(0.5)
        assert Path(env["SQLITE_DB_PATH"]).exists()

        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends (STOPSIGNAL)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 10 s after SIGTERM:\n{log_path.read_text()}")
        assert code == 0, f"exit code {code} after SIGTERM:\n{log_path.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    result = health()
    # Docker reads 1 as unhealthy (2 is reserved); the reason is one line for `docker inspect`.
    assert result.returncode == 1, (
        f"health after the daemon stopped: {result.returncode} {result.stdout}{result.stderr}"
    )
    reason = (result.stdout + result.stderr).strip()
    assert reason and "\n" not in reason, reason


# ─── compose: the override merged with desto's own file ──────────────────────────────────────────


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.skip("no compose implementation (scripts/test installs Debian's docker-compose where apt-get exists)")


def compose_config(project: Path, *files: Path, env: dict[str, str] | None = None) -> str:
    args = [*compose_command()]
    for file in files:
        args += ["-f", str(file)]
    clean_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    clean_env.update(COMPOSE_PROJECT_NAME="desto", **(env or {}))
    result = subprocess.run([*args, "config"], cwd=project, env=clean_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} config:\n{result.stdout}{result.stderr}"
    return result.stdout


def service_block(text: str, name: str) -> str:
    """The exact text of one service in `config` output."""
    lines = text.splitlines()
    start = lines.index(f"  {name}:")
    end = start + 1
    while end < len(lines) and (lines[end].startswith("   ") or not lines[end].strip()):
        end += 1
    return "\n".join(lines[start:end])


def as_list(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def as_env(environment: Any) -> dict[str, str]:
    if isinstance(environment, dict):
        return {k: str(v) for k, v in environment.items()}
    return dict(item.split("=", 1) for item in environment)


def as_mounts(volumes: list[Any]) -> set[tuple[str, str]]:
    mounts = set()
    for volume in volumes:
        if isinstance(volume, dict):
            mounts.add((str(volume["source"]), str(volume["target"])))
        else:
            source, target = volume.split(":")[:2]
            mounts.add((source, target))
    return mounts


@pytest.fixture(scope="module")
def compose_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out as desto's checkout: its compose file, and this repository cloned inside."""
    project = tmp_path_factory.mktemp("desto")
    shutil.copy(DESTO_COMPOSE, project / "docker-compose.yml")
    (project / "desto-archiver").symlink_to(REPO, target_is_directory=True)
    return project


@pytest.fixture(scope="module")
def desto_alone(compose_project: Path) -> str:
    return compose_config(compose_project, compose_project / "docker-compose.yml")


@pytest.fixture(scope="module")
def merged_text(compose_project: Path) -> str:
    return compose_config(
        compose_project, compose_project / "docker-compose.yml", OVERRIDE, env={"DESTO_ARCHIVER_DIR": str(REPO)}
    )


@pytest.fixture(scope="module")
def merged(merged_text: str) -> dict[str, Any]:
    return yaml.safe_load(merged_text)


def test_override_adds_the_archiver_service(merged: dict[str, Any]) -> None:
    archiver = merged["services"]["archiver"]
    assert Path(archiver["build"]["context"]) == REPO
    assert archiver["build"]["dockerfile"] == "docker/Dockerfile"
    assert (REPO / archiver["build"]["dockerfile"]).resolve() == DOCKERFILE
    environment = as_env(archiver["environment"])
    assert {k: environment.get(k) for k in ("REDIS_HOST", "REDIS_PORT", "REDIS_DB", "SQLITE_DB_PATH")} == {
        "REDIS_HOST": "redis",
        "REDIS_PORT": "6379",
        "REDIS_DB": "0",
        "SQLITE_DB_PATH": f"{DESTO_DATA}/desto.db",
    }
    assert environment["DESTO_DATA_DIR"] == DESTO_DATA
    assert ("desto_data", DESTO_DATA) in as_mounts(archiver["volumes"])
    assert archiver["depends_on"]["redis"]["condition"] == "service_healthy"
    assert archiver["depends_on"]["archiver-init"]["condition"] == "service_completed_successfully"
    assert archiver["restart"] == "unless-stopped"
    assert archiver["mem_limit"] in ("1g", 1024**3, str(1024**3))  # as compose normalizes it
    check = archiver["healthcheck"]
    assert check["test"] == ["CMD", "desto-archiver", "health"]
    assert {k: check[k] for k in ("interval", "timeout", "retries", "start_period")} == {
        "interval": "30s",
        "timeout": "10s",
        "retries": 3,
        "start_period": "30s",
    }
    assert "user" not in archiver, "the image's own non-root user"
    assert {"desto_data", "redis_data"} <= set(merged["volumes"])


def test_override_keeps_desto_redis_and_turns_notifications_on(merged: dict[str, Any], desto_alone: str) -> None:
    before = yaml.safe_load(desto_alone)["services"]["redis"]
    after = merged["services"]["redis"]
    command = as_list(after["command"])
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options == {"--appendonly": "yes", "--notify-keyspace-events": "KEA"}
    flags = options["--notify-keyspace-events"]
    assert "K" in flags and ("A" in flags or set("hgxe") <= set(flags)), "what the archiver needs"
    assert {k: v for k, v in after.items() if k != "command"} == {k: v for k, v in before.items() if k != "command"}
    for key in ("ports", "volumes", "healthcheck", "image", "restart"):
        assert after[key] == before[key], key


def test_override_leaves_desto_dashboard_untouched(compose_project: Path, merged_text: str, desto_alone: str) -> None:
    assert "dashboard" not in yaml.safe_load(OVERRIDE.read_text())["services"]

    # Byte for byte, against desto's file merged with an override that changes nothing (compose
    # v1 re-sorts every service's mounts by target as soon as a second file is merged).
    neutral = compose_project / "neutral.yml"
    neutral.write_text("services:\n  redis: {}\n")
    baseline = compose_config(compose_project, compose_project / "docker-compose.yml", neutral)
    assert service_block(merged_text, "dashboard") == service_block(baseline, "dashboard")

    # And every setting equal to desto's file alone, the mounts in any order.
    def settings(text: str) -> dict[str, Any]:
        dashboard = yaml.safe_load(text)["services"]["dashboard"]
        dashboard["volumes"] = sorted(map(json.dumps, dashboard["volumes"]))
        return dashboard

    assert settings(merged_text) == settings(desto_alone)


def test_override_finds_the_clone_inside_desto_folder_by_default(compose_project: Path) -> None:
    text = compose_config(compose_project, compose_project / "docker-compose.yml", OVERRIDE)
    context = Path(yaml.safe_load(text)["services"]["archiver"]["build"]["context"])
    assert context.resolve() == REPO
    assert context.parent.resolve() == compose_project.resolve(), "relative to desto's folder, not this file's"


def init_script(merged: dict[str, Any], data_dir: Path) -> list[str]:
    init = merged["services"]["archiver-init"]
    assert str(init["user"]) in ("0:0", "0", "root")
    assert ("desto_data", DESTO_DATA) in as_mounts(init["volumes"])
    assert str(init.get("restart", "no")) == "no"
    argv = as_list(init["entrypoint"]) + as_list(init.get("command") or [])
    return [arg.replace(DESTO_DATA, str(data_dir)) for arg in argv]


def owners(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_gid) for p in [folder, *folder.iterdir()]}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing owners needs root")
def test_init_hands_the_data_folder_to_the_archiver_user(merged: dict[str, Any], tmp_path: Path) -> None:
    owner = (ARCHIVER_UID, ARCHIVER_UID)

    # A new volume first mounted by desto's dashboard: an empty folder of root's.
    fresh = tmp_path / "fresh" / "desto_data"
    fresh.mkdir(parents=True)
    subprocess.run(init_script(merged, fresh), check=True, timeout=30)
    db = fresh / "desto.db"
    assert db.stat().st_size == 0 and db.stat().st_mode & 0o777 == 0o660
    assert set(owners(fresh).values()) == {owner}
    # desto, as root, then opens it: SQLite gives the files it creates the database's owner.
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        assert {"desto.db-wal", "desto.db-shm"} <= set(owners(fresh))
        assert set(owners(fresh).values()) == {owner}
    conn.close()

    # A volume desto has used as root for a while: everything in it is handed over, nothing lost.
    used = tmp_path / "used" / "desto_data"
    used.mkdir(parents=True)
    conn = sqlite3.connect(used / "desto.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE sessions (id)")
    conn.execute("INSERT INTO sessions VALUES ('kept')")
    conn.commit()
    subprocess.run(init_script(merged, used), check=True, timeout=30)
    assert set(owners(used).values()) == {owner}
    assert not any(p.stat().st_mode & 0o007 for p in [used, *used.iterdir()]), "the world reads nothing"
    assert conn.execute("SELECT id FROM sessions").fetchall() == [("kept",)]
    conn.close()


# ─── systemd ─────────────────────────────────────────────────────────────────────────────────────


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given to it, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def env_file(text: str) -> tuple[dict[str, str], set[str]]:
    """Its settings, and the names of the ones given commented out as examples."""
    values, examples = {}, set()
    for raw in text.splitlines():
        line = raw.strip()
        example = re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=.*", line)
        if example:
            examples.add(example.group(1))
        elif line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line), f"not VARIABLE=value: {line!r}"
            key, _, value = line.partition("=")
            values[key] = value
    return values, examples


def test_systemd_unit_settings() -> None:
    unit = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        assert len(unit.get(key, [])) == 1, f"{key}: {unit.get(key)}"
        return unit[key][0]

    expected = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.WatchdogSec": "30",
        "Service.Restart": "on-failure",
        "Service.RestartSec": "5",
        "Service.TimeoutStopSec": "30",
        "Service.MemoryMax": "1G",
        "Service.EnvironmentFile": "-/etc/desto-archiver/desto-archiver.env",
        "Service.ExecStart": "/opt/desto-archiver/.venv/bin/desto-archiver run",
        "Service.User": "desto",
        "Service.Group": "desto",
        "Service.NoNewPrivileges": "yes",
        "Service.ProtectSystem": "strict",
        "Service.PrivateTmp": "yes",
        "Service.ProtectHome": "yes",
        "Service.ProtectKernelTunables": "yes",
        "Service.ProtectKernelModules": "yes",
        "Service.ProtectControlGroups": "yes",
        "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Service.LockPersonality": "yes",
        "Service.MemoryDenyWriteExecute": "yes",
        "Service.SystemCallArchitectures": "native",
        "Service.CapabilityBoundingSet": "",
        "Service.UMask": "0007",
        "Service.TimeoutStartSec": "300",
        "Unit.Documentation": "file:/opt/desto-archiver/README.md",
        "Install.WantedBy": "multi-user.target",
    }
    assert {key: one(key) for key in expected} == expected
    assert Path(one("Service.EnvironmentFile").lstrip("-")).name == UNIT_ENV.name

    # The only writable folder is the archive's, in the unit's defaults and in the example file.
    writable = one("Service.ReadWritePaths")
    defaults = dict(word.split("=", 1) for word in shlex.split(" ".join(unit["Service.Environment"])))
    values, _ = env_file(UNIT_ENV.read_text())
    for where, env in (("unit", defaults), ("env file", values)):
        assert str(Path(env["SQLITE_DB_PATH"]).parent) == writable, where
        assert env["DESTO_DATA_DIR"] == writable, where


def test_systemd_env_file_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    values, examples = env_file(UNIT_ENV.read_text())
    known = set(ENV_NAMES.values())
    assert set(values) | examples <= known, f"unknown variables: {sorted((set(values) | examples) - known)}"
    for name in known:
        monkeypatch.delenv(name, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    try:
        settings = load_settings()
    except ConfigError as exc:
        pytest.fail(str(exc))
    assert settings.db_path == Path(values["SQLITE_DB_PATH"])


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    executable = shutil.which("desto-archiver", path=str(VENV_BIN))
    assert executable, f"desto-archiver is not installed in {VENV_BIN}"
    # verify checks that ExecStart's program exists, and the user may not: point both at this machine's.
    text = UNIT.read_text()
    text = text.replace("/opt/desto-archiver/.venv/bin/desto-archiver", executable)
    text = re.sub(r"(?m)^User=.*$", f"User={pwd.getpwuid(os.getuid()).pw_name}", text)
    text = re.sub(r"(?m)^Group=.*$", f"Group={grp.getgrgid(os.getgid()).gr_name}", text)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    # Unknown keys or bad values are only warnings to verify (exit 0): any message fails the test.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify ({result.returncode}):\n{output}"


def test_systemd_analyze_verify_reports_unit_errors(tmp_path: Path) -> None:
    """The check above would see a broken unit: a misspelt directive is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    executable = shutil.which("desto-archiver", path=str(VENV_BIN))
    unit = tmp_path / "broken.service"
    unit.write_text(f"[Service]\nType=notify\nExecStart={executable} run\nWatchdogSecs=30\n")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "WatchdogSecs" in result.stdout + result.stderr


SECURITY_GOAL = 2.0


def security_exposure(unit: Path) -> tuple[float, str]:
    """``systemd-analyze security``'s overall exposure for a unit file (0 best, 10 worst)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, f"systemd-analyze security ({result.returncode}):\n{output}"
    return float(match.group(1)), output


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    score, output = security_exposure(UNIT)
    print(f"systemd-analyze security {UNIT.name}: {score}")
    assert score <= SECURITY_GOAL, output


def test_systemd_security_score_sees_a_weaker_unit(tmp_path: Path) -> None:
    """The check above can fail: the same unit without its capability and system call limits scores worse."""
    text = re.sub(r"(?m)^(CapabilityBoundingSet|SystemCallFilter|UMask|ProtectProc)=.*\n", "", UNIT.read_text())
    weaker = tmp_path / UNIT.name
    weaker.write_text(text)
    score, output = security_exposure(weaker)
    assert score > SECURITY_GOAL, output
