"""``python -m bench``: run the suite (or profile the daemon) and print a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import backfill, ceilings, central_lag, desto_cost, desto_tab, idle, ingest, latency, profile, soak
from bench.common import Context, Figure, code_version, machine, markdown_table
from tests.helpers import REPO

BENCHMARKS: dict[str, Callable[[Context], None]] = {
    "ceilings": ceilings.run,
    "ingest": ingest.run,
    "latency": latency.run,
    "backfill": backfill.run,
    "desto": desto_cost.run,
    "desto_tab": desto_tab.run,
    "idle": idle.run,
    "central_lag": central_lag.run,
    "soak": soak.run,
}
NEEDS_CEILINGS = {"ingest", "backfill"}
# Where runs go unless told otherwise: never a committed file (bench/results/ holds the runs the
# documentation cites, summarised by ``python -m bench.keep``).
RUNS = REPO / "bench" / "runs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="desto-archiver's benchmarks: each figure with its same-run baseline, ratio and target.",
        epilog="Example: .venv/bin/python -m bench --smoke --json",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (under a minute), to check the suite runs")
    parser.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        nargs="?",
        const=RUNS,
        help="also write the figures and raw details as JSON (default: a new file in bench/runs/, which git ignores)",
    )
    parser.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(BENCHMARKS)} (default: all)"
    )
    parser.add_argument("--workdir", metavar="DIR", type=Path, help="where files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (archives, daemon logs)")
    parser.add_argument("--note", metavar="TEXT", help="a note stored in the JSON (e.g. which build was measured)")
    group = parser.add_argument_group("profiling (instead of the suite)")
    group.add_argument("--profile", action="store_true", help="profile the daemon at a fixed ingest rate")
    group.add_argument("--rate", type=float, help="changes/s while profiling (default 8000; smoke 1000)")
    group.add_argument("--seconds", type=float, help="seconds of writing while profiling (default 20; smoke 2)")
    group.add_argument("--profiler", choices=["py-spy", "pyinstrument"], default="py-spy")
    group.add_argument("--gil", action="store_true", help="py-spy: only samples of the thread holding the GIL")
    group.add_argument("--idle", action="store_true", help="py-spy: idle samples too (each thread's wall clock)")
    group.add_argument(
        "--profile-out",
        metavar="PATH",
        type=Path,
        help="the profile file (default bench/profiles/ingest-<rate>.<profiler>.txt or .html)",
    )
    return parser


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        known = ", ".join(BENCHMARKS)
        raise SystemExit(f"python -m bench: unknown benchmark(s): {', '.join(unknown)} (known: {known})")
    if NEEDS_CEILINGS & set(names) and "ceilings" not in names:
        names.insert(0, "ceilings")
    return [n for n in BENCHMARKS if n in names]


def _json_path(given: Path, stem: str) -> Path:
    """``--json`` alone: a new file named after the commit and the time in bench/runs/."""
    if given == RUNS:
        given = RUNS / f"{stem}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    given.parent.mkdir(parents=True, exist_ok=True)
    return given


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = _selected(args.only)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="desto-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.smoke, workdir)
    try:
        if args.profile:
            rate = args.rate or (1_000.0 if args.smoke else 8_000.0)
            seconds = args.seconds or (2.0 if args.smoke else 20.0)
            suffix = "html" if args.profiler == "pyinstrument" else "txt"
            variant = ("-gil" if args.gil else "") + ("-idle" if args.idle else "")
            name = f"ingest-{rate:.0f}{variant}.{args.profiler}.{suffix}"
            out = args.profile_out or Path("bench/profiles") / name
            info = profile.run(ctx, rate, seconds, out.resolve(), args.profiler, args.gil, args.idle)
            if args.json:
                _json_path(args.json, "profile").write_text(json.dumps(info, indent=2) + "\n")
            return 0
        return _suite(ctx, names, args)
    finally:
        ctx.procs.stop_all()
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"work folder kept: {workdir}", file=sys.stderr)


def _suite(ctx: Context, names: list[str], args: argparse.Namespace) -> int:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    info = machine()
    code_at_start = code_version()
    errors: dict[str, str] = {}
    for name in names:
        ctx.log(f"== {name}")
        try:
            BENCHMARKS[name](ctx)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            ctx.add(Figure(name, "(benchmark failed)", None, "", error=str(exc).splitlines()[0][:160]))
        finally:
            ctx.procs.stop_all()
    duration = time.monotonic() - t0
    info["loadavg_at_end"] = os.getloadavg()
    code_at_end = code_version()
    mode = "smoke" if ctx.smoke else "full"
    print(f"## desto-archiver benchmarks ({mode}, {duration:.0f} s)\n")
    print(
        f"Machine: {info.get('nproc')} CPUs ({info.get('Model name', '?')}), Python {info['python']}, "
        f"SQLite {info['sqlite']}, {info.get('redis_server', 'redis-server ?').split(' sha=')[0]}; "
        f"load average at start {info['loadavg_at_start'][0]:.2f}, at end {info['loadavg_at_end'][0]:.2f}\n"
    )
    changed = f" + {len(code_at_start['uncommitted'])} uncommitted file(s)" if code_at_start["uncommitted"] else ""
    print(f"Code: archiver at {code_at_start['commit'] or '?'}{changed}, sources digest {code_at_start['digest']}\n")
    if code_at_end["digest"] != code_at_start["digest"]:
        print(
            f"**Warning: archiver/ changed during the run (digest {code_at_start['digest']} -> "
            f"{code_at_end['digest']}): the figures mix two versions.**\n"
        )
    print(markdown_table(ctx.figures))
    if args.json:
        document: dict[str, Any] = {
            "mode": mode,
            "note": args.note,
            "command": ["python", "-m", "bench", *sys.argv[1:]],
            "started_at": started_at,
            "duration_s": round(duration, 1),
            "machine": info,
            "code": {"at_start": code_at_start, "at_end": code_at_end},
            "ceilings": ctx.ceilings,
            "figures": [f.as_dict() for f in ctx.figures],
            "details": ctx.details,
            "errors": errors,
        }
        path = _json_path(args.json, code_at_start["commit"] or "run")
        path.write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"figures written to {path}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
