"""What every benchmark shares: figures and targets, the run's context, and the processes it owns
(redis-servers, archiver daemons, load writers), which are always stopped, even on failure."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archiver.archive.sql import read_only
from tests.helpers import REPO
from tests.redis_server import RedisServer

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Daemon log events that mean it did not keep up cleanly (see bench.ingest's definition of "sustained").
PROBLEM_EVENTS = frozenset(
    {
        "redis.disconnected",
        "redis.unreachable",
        "redis.read_failed",
        "events.overflow",
        "store.write_failed",
        "shutdown.flush_failed",
        "record.quarantined",
    }
)


# ─── figures ─────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Target:
    """A goal on a figure's value or on its ratio to the baseline."""

    on: str  # "value" or "ratio"
    op: str  # ">=" or "<="
    threshold: float

    def met(self, figure: Figure) -> bool | None:
        x = figure.value if self.on == "value" else figure.ratio
        if x is None:
            return None
        return x >= self.threshold if self.op == ">=" else x <= self.threshold

    def text(self, unit: str) -> str:
        sign = "≥" if self.op == ">=" else "≤"
        if self.on == "ratio":
            return f"ratio {sign} {fmt_ratio(self.threshold)}"
        return f"{sign} {fmt_number(self.threshold)} {unit}".rstrip()


@dataclass
class Figure:
    benchmark: str
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    targets: list[Target] = field(default_factory=list)
    note: str = ""
    error: str = ""  # the benchmark failed to produce this figure
    paired_ratio: float | None = None  # when set, the ratio (e.g. a median of per-round ratios)

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.error:
            return False
        if not self.targets:
            return None
        results = [t.met(self) for t in self.targets]
        if any(r is None for r in results):
            return False
        return all(results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "figure": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "ratio_is_paired": self.paired_ratio is not None,
            "targets": [{"on": t.on, "op": t.op, "threshold": t.threshold} for t in self.targets],
            "target": "; ".join(t.text(self.unit) for t in self.targets),
            "met": self.met,
            "note": self.note,
            "error": self.error,
        }


def fmt_number(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01 or x == 0:
        return f"{x:.2f}"
    return f"{x:.2g}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01 or x == 0:
        return f"{x:.3f}" if abs(x) < 1.5 else f"{x:.2f}"
    return f"{x:.2g}"


def markdown_table(figures: Sequence[Figure]) -> str:
    lines = [
        "| benchmark | figure | value | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        value = f"{fmt_number(f.value)} {f.unit}".strip() if f.value is not None else "—"
        if f.error:
            value = f"— (failed: {f.error})"
        elif f.note and f.value is None:
            value = f"— ({f.note})"
        baseline = "—"
        if f.baseline is not None:
            baseline = f"{fmt_number(f.baseline)} {f.unit}".strip()
            if f.baseline_name:
                baseline = f"{f.baseline_name}: {baseline}"
        target = "; ".join(t.text(f.unit) for t in f.targets) or "—"
        met = {True: "yes", False: "**no**", None: "—"}[f.met]
        lines.append(f"| {f.benchmark} | {f.name} | {value} | {baseline} | {fmt_ratio(f.ratio)} | {target} | {met} |")
    notes = [f"- {f.benchmark}, {f.name}: {f.note}" for f in figures if f.note and f.value is not None]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


# ─── the run's context ─────────────────────────────────────────────────────────────────────────


class Context:
    """One run of the suite: its size, its folder, its figures and raw details, its processes."""

    def __init__(self, smoke: bool, workdir: Path) -> None:
        self.smoke = smoke
        self.workdir = workdir
        self.figures: list[Figure] = []
        self.details: dict[str, Any] = {}
        self.ceilings: dict[str, float] = {}
        self.procs = Processes()
        self._started = time.monotonic()
        self._tags = 0
        self._dirs: dict[str, int] = {}

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self._started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def tag(self) -> str:
        """4 hex digits that keep one trial's keys distinct from every other's in this run."""
        self._tags += 1
        return f"{self._tags:04x}"

    def fresh_dir(self, name: str) -> Path:
        n = self._dirs.get(name, 0) + 1
        self._dirs[name] = n
        path = self.workdir / f"{name}-{n}"
        path.mkdir(parents=True, exist_ok=False)
        return path

    @contextlib.contextmanager
    def redis(self, name: str) -> Iterator[RedisServer]:
        """A redis-server of this run's own on a free port (never the machine's shared one)."""
        server = self.procs.redis(self.fresh_dir(f"redis-{name}"))
        try:
            yield server
        finally:
            self.procs.stop_redis(server)


class Processes:
    """Every process the run starts; ``stop_all`` ends whatever is still running."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._servers: list[RedisServer] = []

    def spawn(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("cwd", REPO)
        proc = subprocess.Popen(list(args), **kwargs)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
        """Signal ``proc`` (SIGTERM: the archiver flushes and exits), wait, kill if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.forget(proc)
        return int(proc.returncode)

    def redis(self, directory: Path) -> RedisServer:
        server = RedisServer(directory)
        self._servers.append(server)
        return server.start()

    def stop_redis(self, server: RedisServer) -> None:
        server.stop()
        with contextlib.suppress(ValueError):
            self._servers.remove(server)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, timeout=5.0)
        for server in list(self._servers):
            self.stop_redis(server)


# ─── the archiver as a real process ─────────────────────────────────────────────────────────────


def fresh_redis(server: RedisServer) -> None:
    """Empty the benchmark's Redis and turn notifications off, as on a fresh desto Redis: the
    daemon then sets the flags itself, as it would there."""
    client = server.client()
    try:
        client.flushall()
        client.config_set("notify-keyspace-events", "")
    finally:
        client.close()


def archiver_env(server: RedisServer, db_path: Path, **extra: str) -> dict[str, str]:
    """The daemon's environment: the shipped defaults, only Redis, the file and JSON logs set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "ARCHIVER_", "SQLITE_", "DESTO_"))}
    env.update(REDIS_URL=server.url, SQLITE_DB_PATH=str(db_path), ARCHIVER_LOG_FORMAT="json")
    if os.geteuid() == 0:  # a benchmark machine run as root: the daemon refuses root unless told
        env["ARCHIVER_ALLOW_ROOT"] = "true"
    env.update(extra)
    return env


class DaemonProcess:
    """``python -m archiver run`` with its JSON log in a file."""

    def __init__(
        self,
        ctx: Context,
        server: RedisServer,
        directory: Path,
        python_args: Sequence[str] = (),
        python: str = sys.executable,
        **env: str,
    ) -> None:
        self.ctx = ctx
        self.python = python  # another environment's interpreter: the daemon as that installation runs it
        self.python_args = list(python_args)  # e.g. a profiler's "-m pyinstrument ..." before "-m archiver"
        self.server = server
        self.db_path = directory / "desto.db"
        self.log_path = directory / "archiver.log"
        self.env = archiver_env(server, self.db_path, **env)
        self.proc: subprocess.Popen[Any] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 30.0) -> DaemonProcess:
        with open(self.log_path, "ab") as log_file:
            self.proc = self.ctx.procs.spawn(
                [self.python, *self.python_args, "-m", "archiver", "run"],
                env=self.env,
                # another environment runs its own installed copy, not the checkout's package
                cwd=REPO if self.python == sys.executable else self.db_path.parent,
                stdout=log_file,
                stderr=log_file,
            )
        deadline = time.monotonic() + ready_timeout
        while not any(e.get("event") == "reconcile.done" for e in self.events()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"the archiver did not become ready (exit {self.proc.returncode}):\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> int:
        if self.proc is not None and self.returncode is None:
            self.returncode = self.ctx.procs.stop(self.proc, timeout=30.0)
        return int(self.returncode or 0)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def problems(self) -> list[str]:
        """Log events that show the daemon did not keep up cleanly: a dropped or failed Redis
        connection, an overflowing dirty set, a failed write, or any reconcile after the first."""
        found = []
        for e in self.events():
            name = e.get("event")
            if name in PROBLEM_EVENTS or e.get("level") in ("error", "critical"):
                found.append(str(name))
            elif name == "reconcile.done" and e.get("reason") != "start":
                found.append(f"reconcile.done ({e.get('reason')})")
        return found


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ─── the load writer process ───────────────────────────────────────────────────────────────────


class WriterProcess:
    """``python -m bench.writer``: desto-shaped HSETs of distinct keys at a set rate (of ``keys``
    keys in turn, when given)."""

    def __init__(self, ctx: Context, port: int, rate: float, seconds: float, tag: str, keys: int | None = None) -> None:
        self.ctx = ctx
        self.rate = rate
        self.proc = ctx.procs.spawn(
            [
                sys.executable, "-m", "bench.writer",
                "--port", str(port), "--rate", str(rate), "--seconds", str(seconds), "--tag", tag,
                *(["--keys", str(keys)] if keys is not None else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.started = json.loads(self._line())  # the writer says when its first send is due

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the writer exited with {self.proc.returncode} before reporting")
        return line

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self, timeout: float = 600.0) -> dict[str, Any]:
        line = self._line()
        self.proc.wait(timeout=timeout)
        self.ctx.procs.forget(self.proc)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the writer failed with exit code {self.proc.returncode}")
        result: dict[str, Any] = json.loads(line)
        return result


# ─── SQLite and statistics ─────────────────────────────────────────────────────────────────────


def ro_connect(db_path: Path) -> sqlite3.Connection:
    """A read-only connection to the archive, as a reader of desto's history would open it."""
    return read_only(db_path, timeout=10)


def max_rowid(conn: sqlite3.Connection, table: str = "sessions") -> int:
    """Rows in a table that only ever gets inserts (a fresh archive, distinct keys): O(log n)."""
    return int(conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}").fetchone()[0])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 50)


# ─── the machine and the code ──────────────────────────────────────────────────────────────────


def code_version() -> dict[str, Any]:
    """Which archiver the run measures: the commit, the files of archiver/ changed since, and a
    digest of archiver/'s sources (compared at the end of a run, to catch edits made during it)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "archiver").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    info: dict[str, Any] = {"digest": digest.hexdigest()[:12], "commit": None, "uncommitted": []}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "archiver"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout
        info["uncommitted"] = [line[3:] for line in status.splitlines() if line.strip()]
    return info


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[name.strip()] = value.strip()
    redis_server = shutil.which("redis-server")
    if redis_server:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["redis_server"] = subprocess.run(
                [redis_server, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
    return info
