"""The generated parts of the documentation, written into the markdown itself, so GitHub and the
site show the same pages:

    python scripts/docs_reference.py            # the reference tables and the sample outputs
    python scripts/docs_reference.py --tables   # the reference tables only (no Redis needed)

A page names each part between two markers:

- ``<!-- generated: settings -->`` ... ``<!-- end generated -->``: every field of
  ``archiver.config.Settings``, its variable, flag, default and meaning (docs/configuration.md);
- ``<!-- generated: commands -->`` ... ``<!-- end generated -->``: every command of
  ``archiver.commands.cli``'s parser with its options (docs/commands.md);
- ``<!-- sample: NAME -->`` ... ``<!-- end sample -->``: the output of the commands of sample NAME,
  run for real against a redis-server of its own and a desto-like history (docs/commands.md).

A setting or an option without a description fails the run. The test suite fails while a page
differs from what this script writes: the tables exactly, the samples but for what changes from
run to run (times, ids, sizes, counts of many digits).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's archiver, installed or not

from archiver.commands.cli import build_parser  # noqa: E402
from archiver.commands.options import config_options  # noqa: E402
from archiver.config import ENV_NAMES, Settings  # noqa: E402

DOCS = REPO / "docs"
PAGES = {"settings": DOCS / "configuration.md", "commands": DOCS / "commands.md"}
END_GENERATED = "<!-- end generated -->"
END_SAMPLE = "<!-- end sample -->"


class UndocumentedError(Exception):
    """A setting or an option of the code has no text to document it with."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def setting_flags() -> dict[str, tuple[str, list[str]]]:
    """Each setting a flag can give: the flag, and the commands that take it."""
    commands = _subcommands(build_parser())
    found: dict[str, tuple[str, list[str]]] = {}
    for name, sub in commands.items():
        for action in _options(sub):
            if action.dest in Settings.FIELDS:
                _, users = found.setdefault(action.dest, (action.option_strings[0], []))
                users.append(name)
    return found


def _default(name: str) -> str:
    field = Settings.FIELDS[name]
    if field.default_factory is not None:  # computed where the archiver runs
        return {socket.gethostname: "the host name"}[field.default_factory]  # type: ignore[index]
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if name == "umask":
        return f"`{value:04o}`"
    return f"`{value}`"


def settings_table() -> str:
    """One row per setting: variable, flag, default, meaning."""
    flags = setting_flags()
    every = set(_subcommands(build_parser()))
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.FIELDS.items():
        if not field.description:
            raise UndocumentedError(f"archiver.config.Settings.{name} has no description")
        flag = ""
        if name in flags:
            option, users = flags[name]
            flag = f"`{option}`" + ("" if set(users) == every else f" ({', '.join(f'`{u}`' for u in users)})")
        lines.append(f"| `{ENV_NAMES[name]}` | {flag} | {_default(name)} | {_cell(field.description)} |")
    return "\n".join(lines)


def _option_text(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.metavar or (action.nargs != 0 and action.choices is None):
        names += f" `{action.metavar or action.dest.upper()}`"
    elif action.choices is not None:
        names += " `{" + ",".join(str(c) for c in action.choices) + "}`"
    return names


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line at a fixed width, whatever the terminal building the site."""
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def commands_reference() -> str:
    """Every command: what it does, its usage, its own options and its example."""
    parser = build_parser()
    shared = {a.dest for a in _options(config_options())}
    out: list[str] = []
    for name, sub in _subcommands(parser).items():
        if not sub.description or not sub.epilog:
            raise UndocumentedError(f"the command '{name}' has no description or example")
        out += [f"### `desto-archiver {name}`", "", sub.description, "", "```", _usage(sub), "```", ""]
        rows: list[str] = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.dest in shared:
                continue
            if not action.help:
                raise UndocumentedError(f"'{name}': {action.dest} has no help text")
            label = _option_text(action) if action.option_strings else f"`{action.metavar or action.dest}`"
            choices = (
                "" if action.option_strings or action.choices is None else f" (one of: {', '.join(action.choices)})"
            )
            rows.append(f"| {label} | {_cell(action.help)}{choices} |")
        if rows:
            out += ["| argument | meaning |", "|---|---|", *rows, ""]
        example = sub.epilog.removeprefix("Example:").strip()
        out += ["Example:", "", "```sh", example, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def shared_options() -> str:
    """The configuration options every command takes."""
    rows = [f"| {_option_text(a)} | {_cell(a.help or '')} |" for a in _options(config_options())]
    return "\n".join(["| option | meaning |", "|---|---|", *rows])


def tables() -> dict[str, str]:
    """The generated tables by marker name."""
    return {"settings": settings_table(), "commands": shared_options() + "\n\n" + commands_reference().rstrip()}


def _replace(page: str, opening: str, closing: str, body: str, where: str) -> str:
    """The page with the text between ``opening`` and ``closing`` (each on a line of its own) made ``body``."""
    start = page.find(opening + "\n")
    end = page.find("\n" + closing, start)
    if start < 0 or end < 0:
        raise UndocumentedError(f"{where}: no {opening} ... {closing} region")
    return page[: start + len(opening) + 1] + body.rstrip("\n") + page[end:]


def render_tables(page: str, where: str = "the page") -> str:
    """``page`` with each generated table region it holds written anew."""
    for name, body in tables().items():
        opening = f"<!-- generated: {name} -->"
        if opening in page:
            page = _replace(page, opening, END_GENERATED, body, where)
    return page


# ─── sample outputs ──────────────────────────────────────────────────────────────────────────────

# What changes from one run to the next, masked by normalize() (the samples' test compares the rest).
_VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<sha256>"),
    (re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8}\b"), "<id>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?Z?)?"), "<time>"),
    (re.compile(r"\d+(?:,\d{3})*"), "0"),
    (re.compile(r"[ \t]+"), " "),
]


def normalize(text: str) -> str:
    """``text`` without what differs between two runs of the same sample: ids, times, numbers
    (their digits), and the column widths they bring."""
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def _session(sid: str, name: str, status: str, start: str, end: str = "", jobs: str = "") -> dict[str, str]:
    return {
        "session_id": sid,
        "session_name": name,
        "tmux_session_name": name,
        "status": status,
        "start_time": start,
        "end_time": end,
        "last_heartbeat": end or start,
        "job_ids": jobs,
        "tmux_active": "False" if end else "True",
        "at_job_id": "",
    }


def _job(jid: str, sid: str, command: str, status: str, start: str, end: str = "", code: str = "") -> dict[str, str]:
    return {
        "job_id": jid,
        "session_id": sid,
        "command": command,
        "script_path": f"/app/desto_scripts/{command.split()[-1]}",
        "status": status,
        "start_time": start,
        "end_time": end,
        "exit_code": code,
        "error_message": "" if code in ("", "0") else f"exit code {code}",
    }


class _Sandbox:
    """A redis-server of its own on a free port, a folder, and the commands run there."""

    def __init__(self, folder: Path) -> None:
        from tests.redis_server import RedisServer

        self.folder = folder
        self.server = RedisServer(folder / "redis").start()
        self.redis = self.server.client()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "SQLITE_", "ARCHIVER_", "DESTO_"))
        }
        self.env.update(
            REDIS_URL=self.server.url,
            ARCHIVER_LOG_FORMAT="json",
            ARCHIVER_FLUSH_INTERVAL="0.02",
            ARCHIVER_HEARTBEAT_INTERVAL="0.5",
            ARCHIVER_ALLOW_ROOT="true",  # where the docs are generated as root; the samples are the same
        )

    def shown(self, text: str) -> str:
        """What a reader of the docs would see: desto's default Redis, folders as in the examples."""
        text = text.replace(f"127.0.0.1:{self.server.port}", "localhost:6379")
        text = text.replace(str(self.folder / "backups"), "/backups")
        return text.replace(str(self.folder), "/home/alice/desto")

    def run(self, *args: str, ok: tuple[int, ...] = (0,)) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "archiver", *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode not in ok:
            raise RuntimeError(f"desto-archiver {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        # what a person sees: the output, or what the command said on stderr besides its log lines
        said = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("{"))
        return result.stdout or said

    def close(self) -> None:
        self.redis.close()
        self.server.stop()


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the file may not be there yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _archived(db: Path, sql: str, params: tuple[Any, ...] = ()) -> Any:
    from archiver.archive.sql import read_only

    conn = read_only(db)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


def _desto_history(box: _Sandbox, db: Path) -> None:
    """What desto writes for a nightly backup of two jobs, a failed ETL run, a favorite and a
    session desto could not read; each change waits until the daemon archived it, so every
    status change is in the status history."""
    from datetime import datetime

    def now() -> str:
        return datetime.now().isoformat()

    def put(key: str, mapping: dict[str, str], sql: str, params: tuple[Any, ...]) -> None:
        """Write the record, and publish its status on desto's channel with desto's own time, as desto does."""
        kind = key.split(":")[1]
        with box.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=mapping)
            if kind in ("session", "job") and key != "desto:session:broken":
                message = {f"{kind}_id": key.rsplit(":", 1)[1], "status": mapping["status"], "timestamp": now()}
                pipe.publish(f"desto:{kind}_updates", json.dumps(message))
            pipe.execute()
        _wait(lambda: _archived(db, sql, params), f"{key} archived")

    nightly, etl = "ea457121-61ef-461e-9b6a-4e1a26954d83", "314e21e4-0b6c-4f35-8d62-36c4fa8c3c41"
    backup, verify, load = (
        "d9ab2389-4fae-4711-bbad-5e75ab7512d7",
        "29e4d2c7-c126-4f03-b329-92e0a3005e2f",
        "5b0f8a7e-6a4c-4b8e-9d3f-2c1e7a9b4d60",
    )
    begun = now()
    status = "SELECT count(*) FROM sessions WHERE session_id = ? AND status = ?"
    job_status = "SELECT count(*) FROM jobs WHERE job_id = ? AND status = ?"
    put(
        f"desto:session:{nightly}",
        _session(nightly, "nightly-backup", "starting", begun),
        status,
        (nightly, "starting"),
    )
    first = now()
    put(
        f"desto:job:{backup}",
        _job(backup, nightly, "bash backup.sh", "running", first),
        job_status,
        (backup, "running"),
    )
    put(f"desto:session:{nightly}", _session(nightly, "nightly-backup", "running", begun, jobs=backup),
        status, (nightly, "running"))  # fmt: skip
    time.sleep(0.3)
    second = now()
    put(f"desto:job:{backup}", _job(backup, nightly, "bash backup.sh", "finished", first, second, "0"),
        job_status, (backup, "finished"))  # fmt: skip
    put(
        f"desto:job:{verify}",
        _job(verify, nightly, "bash verify.sh", "running", second),
        job_status,
        (verify, "running"),
    )
    time.sleep(0.2)
    ended = now()
    put(f"desto:job:{verify}", _job(verify, nightly, "bash verify.sh", "finished", second, ended, "0"),
        job_status, (verify, "finished"))  # fmt: skip
    put(f"desto:session:{nightly}", _session(nightly, "nightly-backup", "finished", begun, ended, f"{backup},{verify}"),
        status, (nightly, "finished"))  # fmt: skip
    started = now()
    put(f"desto:session:{etl}", _session(etl, "etl", "running", started, jobs=load), status, (etl, "running"))
    put(f"desto:job:{load}", _job(load, etl, "python load.py", "running", started), job_status, (load, "running"))
    time.sleep(0.2)
    failed = now()
    put(f"desto:job:{load}", _job(load, etl, "python load.py", "failed", started, failed, "1"),
        job_status, (load, "failed"))  # fmt: skip
    put(f"desto:session:{etl}", _session(etl, "etl", "failed", started, failed, load), status, (etl, "failed"))
    favorite = "8c3d2e1f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
    put(
        f"desto:favorite:{favorite}",
        {"favorite_id": favorite, "name": "backup now", "command": "bash backup.sh", "created_at": now(),
         "last_used_at": "", "use_count": "0"},
        "SELECT count(*) FROM favorites WHERE favorite_id = ?",
        (favorite,),
    )  # fmt: skip
    put(
        "desto:session:broken",
        {"session_id": "broken", "session_name": "x", "status": "paused"},
        "SELECT count(*) FROM quarantine WHERE key_text = ?",
        ("desto:session:broken",),
    )


@contextmanager
def _daemon(box: _Sandbox, log: list[dict[str, Any]]) -> Iterator[subprocess.Popen[str]]:
    """``desto-archiver run`` until the block ends with a Ctrl-C (SIGINT); its log lines into ``log``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "archiver", "run"],
        cwd=box.folder,
        env=box.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            log.append(json.loads(line))
            if log[-1]["event"] == "reconcile.done":
                break
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
        log.extend(json.loads(line) for line in rest.splitlines() if line.startswith("{"))
        if proc.returncode != 0:
            raise RuntimeError(f"the daemon exited {proc.returncode}: {log[-3:]}")


RUN_EVENTS = ("archive.created", "archiver.started", "reconcile.done", "record.quarantined")


def samples() -> dict[str, str]:
    """Each sample's text: the commands of docs/commands.md, run on a desto-like history."""
    out: dict[str, list[str]] = {}

    def shell(name: str, box: _Sandbox, *args: str, ok: tuple[int, ...] = (0,)) -> None:
        text = box.run(*args, ok=ok)
        out.setdefault(name, []).append(box.shown(f"$ desto-archiver {' '.join(args)}\n{text}").rstrip())

    with tempfile.TemporaryDirectory(prefix="desto-archiver-docs-") as tmp:
        folder = Path(tmp)
        box = _Sandbox(folder)
        try:
            db = folder / "desto_data" / "desto.db"
            log: list[dict[str, Any]] = []
            with _daemon(box, log):
                _desto_history(box, db)
                shell("check", box, "check")
                shell("health", box, "health")
                shell("stats", box, "stats")
                shell("history", box, "history", "--since", "7d")
                shell("show", box, "show", "nightly-backup")
                shell("export", box, "export", "sessions", "--format", "csv", "--status", "finished",
                      "--output", "finished.csv")  # fmt: skip
                shell("export", box, "export", "quarantine")
                (folder / "backups").mkdir()
                shell("backup", box, "backup", str(folder / "backups" / "desto-2026-11-26.db"))
            picked = [e for e in log if e["event"] in RUN_EVENTS][: len(RUN_EVENTS)]
            lines = [json.dumps(e) for e in picked] + ["^C", json.dumps(log[-1])]
            out["run"] = ["$ desto-archiver run\n" + box.shown("\n".join(lines))]
            # the same history into a new file, by a backfill, then a dry run over it
            box.env["SQLITE_DB_PATH"] = "desto_data/backfilled.db"
            for args in (("backfill",), ("backfill", "--dry-run")):
                text = box.run(*args)
                out.setdefault("backfill", []).append(f"$ desto-archiver {' '.join(args)}\n{text.rstrip()}")
            # the archive behind Redis: a new session it never saw, a job changed while no daemon ran
            del box.env["SQLITE_DB_PATH"]
            adhoc = "f729c4b4-268e-4e8c-a1bc-ca9f553858f2"
            box.redis.hset(f"desto:session:{adhoc}", mapping=_session(adhoc, "adhoc", "running", "2026-11-26T23:41:00"))
            box.redis.hset("desto:job:29e4d2c7-c126-4f03-b329-92e0a3005e2f", "exit_code", "3")
            shell("check-diffs", box, "check", "--no-daemon", "--show-diffs", "--settle", "0", ok=(1,))
            # Redis restarted empty: the favorite written back from the archive
            box.redis.flushall()
            shell("restore", box, "restore", "favorites", "--dry-run")
            shell("restore", box, "restore", "favorites")
        finally:
            box.close()
    return {name: "```\n" + "\n".join(texts) + "\n```" for name, texts in out.items()}


def render_samples(page: str, found: dict[str, str], where: str = "the page") -> str:
    for name, body in found.items():
        opening = f"<!-- sample: {name} -->"
        if opening in page:
            page = _replace(page, opening, END_SAMPLE, body, where)
    return page


def sample_names(page: str) -> list[str]:
    return re.findall(r"^<!-- sample: ([\w-]+) -->$", page, re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/docs_reference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", action="store_true", help="the reference tables only (no Redis needed)")
    args = parser.parse_args(argv)
    found = {} if args.tables else samples()
    for path in PAGES.values():
        page = path.read_text()
        new = render_samples(render_tables(page, path.name), found, path.name)
        if new != page:
            path.write_text(new)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
