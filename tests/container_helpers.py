"""The container tier's tools: is an engine there, build an image once, drive a compose project,
run a program inside a container's network namespace.

The tier runs where a Docker engine answers (``.ci/run`` starts one with the shared
``container-engine`` tool, or installs Debian's). Such an engine may have no outbound NAT (no
iptables), so images are built with the host's network and compose is told not to build."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import REPO, wait_for

ARTIFACTS = REPO / "test-artifacts"  # git-ignored: screenshots and logs the tier keeps


@functools.cache
def engine_unavailable() -> str | None:
    """Why the container tier cannot run here, in one line; None when it can."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (.ci/run prepares a container engine)"
    try:
        info = subprocess.run(
            ["docker", "info", "-f", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "the container engine does not answer (docker info timed out)"
    if info.returncode != 0:
        return "no container engine answers (docker info failed; .ci/run starts one)"
    if compose_command() is None:
        return "no compose implementation (docker-compose or docker compose)"
    return None


@functools.cache
def compose_command() -> tuple[str, ...] | None:
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    return ("docker", "compose") if probe.returncode == 0 else None


def run(
    argv: Sequence[str], *, timeout: float = 300, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """A command whose failure shows what it said."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    return result


def docker(*args: str, timeout: float = 300, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout, check=check, **kwargs)


@dataclass
class Image:
    name: str
    size: int  # bytes, as the engine counts it (the base image's layers included)
    base_size: int  # the bytes of the image it was built FROM
    build_s: float

    @property
    def added(self) -> int:
        return self.size - self.base_size


def image_size(name: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", name).stdout.strip())


def build_image(name: str, context: Path, dockerfile: Path | None = None, base: str | None = None) -> Image:
    """``docker build`` with the host's network (an engine without NAT gives builds none)."""
    started = time.monotonic()
    args = ["build", "--network=host", "-q", "-t", name]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    docker(*args, str(context), timeout=1800)
    took = time.monotonic() - started
    return Image(name, image_size(name), image_size(base) if base else 0, took)


def mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def inspect(container: str) -> dict[str, Any]:
    result: list[dict[str, Any]] = json.loads(docker("inspect", container).stdout)
    return result[0]


def health(container: str) -> str:
    state = inspect(container)["State"]
    return str(state.get("Health", {}).get("Status") or state["Status"])


def wait_healthy(container: str, timeout: float = 120) -> float:
    """Seconds until the engine's health check reports healthy; fails at once on an exit."""

    def healthy() -> bool:
        state = inspect(container)["State"]
        if state["Status"] == "exited":
            logs = docker("logs", "--tail", "50", container, check=False)
            raise AssertionError(f"{container} exited ({state['ExitCode']}):\n{logs.stdout}{logs.stderr}")
        return bool(state.get("Health", {}).get("Status") == "healthy")

    started = time.monotonic()
    wait_for(healthy, timeout, interval=0.5, what=f"{container} healthy")
    return time.monotonic() - started


def in_netns(container: str) -> list[str]:
    """The prefix that runs a host program inside a container's network namespace, where the
    container's services listen on 127.0.0.1 (published ports need iptables, which the engine
    may run without)."""
    pid = inspect(container)["State"]["Pid"]
    return ["nsenter", "-t", str(pid), "-n"]


@dataclass
class ComposeProject:
    """A compose project laid out as a user has it: desto's checkout with its docker-compose.yml,
    this repository cloned inside as desto-archiver, driven with both files."""

    folder: Path
    name: str
    files: list[str] = field(default_factory=lambda: ["docker-compose.yml", "desto-archiver/compose.override.yml"])

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = compose_command()
        assert command is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
        env["COMPOSE_PROJECT_NAME"] = self.name
        argv = [*command]
        for file in self.files:
            argv += ["-f", file]
        return run([*argv, *args], timeout=timeout, check=check, cwd=self.folder, env=env)

    def image_names(self, service: str) -> list[str]:
        """The names compose v1 and v2 give a service's built image."""
        return [f"{self.name}_{service}", f"{self.name}-{service}"]

    def up(self, *services: str) -> None:
        self.compose("up", "-d", "--no-build", *services)

    def down(self, volumes: bool = False) -> None:
        self.compose("down", "--remove-orphans", *(["-v"] if volumes else []), timeout=180, check=False)

    def container(self, service: str) -> str:
        """The id of a service's container, running or exited."""
        found = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(found) == 1, f"{service}: {found}"
        return found[0]

    def volume(self, name: str) -> str:
        return f"{self.name}_{name}"
