#!/usr/bin/env python3
"""Write the performance page's tables from the benchmark runs kept in bench/results/.

    .venv/bin/python scripts/bench_tables.py          # rewrite docs/performance.md's tables
    .venv/bin/python scripts/bench_tables.py --check  # exit 1 if the page differs from the runs

Each table sits between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` in the page.
The runs each table shows are named below; a figure a run did not measure is left blank. Numbers
are formatted as ``python -m bench`` prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import Figure, Target, fmt_number, fmt_ratio, markdown_table  # noqa: E402

RESULTS = REPO / "bench" / "results"
PAGE = REPO / "docs" / "performance.md"

LATEST = "f206e92"  # the latest full run: every benchmark
# The runs the history table compares: the first one kept, those that changed the picture, the latest.
HISTORY = {
    "cf07c01": "first kept",
    "f457b16": "",
    "7c602da": "quiet",
    "ff7040a": "",
    "9de7265": "slow day",
    "f206e92": "latest, fast day",
}
# The runs that measured what bounds live ingest at 0.4 of the ceiling, in the same run.
SAME_RUN = ["93247ac", "ff7040a", "51474ac", "9de7265", "f206e92", "be91af9-ingest"]

TARGET_RATE = 40_000  # the live-ingest target, changes/s
TRIAL_S = 30  # seconds each ingest trial writes


@cache
def run(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return document


def figure(name: str, title: str) -> dict[str, Any] | None:
    return next((f for f in run(name)["figures"] if f["figure"].startswith(title) and not f["error"]), None)


def value(name: str, title: str) -> float | None:
    f = figure(name, title)
    return None if f is None else f["value"]


def ratio(name: str, title: str) -> float | None:
    f = figure(name, title)
    return None if f is None else f["ratio"]


def num(x: float | None, unit: str = "") -> str:
    return "" if x is None else f"{fmt_number(x)}{unit}"


def machine(name: str) -> str:
    model = str(run(name)["machine"].get("Model name", "?"))
    return "Intel Xeon" if "Xeon" in model else model


def _ratio_cell(name: str, title: str, unit: str) -> str:
    v, r = value(name, title), ratio(name, title)
    return "" if v is None else f"{num(v, unit)} ({fmt_ratio(r)})"


def _rate(name: str) -> float | None:
    """The sustained rate as the trial's rate (a trial at 12,000/s achieves 11,999.1/s)."""
    v = value(name, "highest sustained rate")
    return None if v is None else round(v / 100) * 100


def _rate_cell(name: str) -> str:
    rate = _rate(name)
    return "" if rate is None else f"{num(rate)}/s ({fmt_ratio(ratio(name, 'highest sustained rate'))})"


def _pair(name: str, first: str, second: str, unit: str, sep: str = " / ") -> str:
    a, b = value(name, first), value(name, second)
    return "" if a is None or b is None else f"{num(a)}{sep}{num(b)}{unit}"


def _triple(name: str, titles: list[str], unit: str) -> str:
    values = [value(name, t) for t in titles]
    return "" if any(v is None for v in values) else " / ".join(num(v) for v in values) + unit


CPU = "CPU per change at the sustained rate: "
HISTORY_ROWS: list[tuple[str, Callable[[str], str], str]] = [
    ("ceiling 1(a): redis-py pipelined HGETALL", lambda r: num(value(r, "1(a) "), " keys/s"), "1(a) "),
    ("ceiling 1(b): sqlite3 upsert, 500 per transaction", lambda r: num(value(r, "1(b) "), " rows/s"), "1(b) "),
    (
        "live ingest: highest rate sustained 30 s with zero loss (ratio to the lower ceiling)",
        lambda r: _rate_cell(r),
        "highest sustained rate",
    ),
    (
        "the same, as a ratio to 1(b)'s upsert over as many rows as that trial wrote",
        lambda r: (
            fmt_ratio(ratio(r, "sustained rate vs 1(b)'s upsert")) if figure(r, "sustained rate vs 1(b)'s") else ""
        ),
        "sustained rate vs 1(b)'s upsert",
    ),
    (
        "SQLite's own upsert over the 1.2M rows a 30 s trial at 40,000/s writes (ratio to 40,000/s)",
        lambda r: _ratio_cell(r, "SQLite's own upsert over the 1,200,000 rows", " rows/s"),
        "SQLite's own upsert over the 1,200,000 rows",
    ),
    (
        "CPU per change at that rate: daemon / redis-server / load writer",
        lambda r: _triple(r, [CPU + "daemon", CPU + "redis-server", CPU + "load writer"], " µs"),
        CPU + "daemon",
    ),
    ("change→row latency at 1,000/s, p50 / p99", lambda r: _pair(r, "p50 at 1,000 ", "p99 at 1,000 ", " ms"), ""),
    ("change→row latency at 10,000/s, p50 / p99", lambda r: _pair(r, "p50 at 10,000 ", "p99 at 10,000 ", " ms"), ""),
    ("backfill, 100k records", lambda r: num(value(r, "keys/s over 100k records"), " keys/s"), "keys/s over 100k"),
    ("backfill, 1M records", lambda r: num(value(r, "keys/s over 1M records"), " keys/s"), "keys/s over 1M records"),
    (
        "backfill peak RSS, 100k → 1M",
        lambda r: _pair(r, "peak RSS over 100k records", "peak RSS over 1M records", " MB", " → "),
        "peak RSS over 1M records",
    ),
    (
        "desto's own ops/s with the archiver beside it, vs none (desto's built-in store)",
        lambda r: (
            f"{fmt_ratio(ratio(r, 'ops/s, archiver daemon'))} ({fmt_ratio(ratio(r, 'ops/s, desto'))})"
            if figure(r, "ops/s, archiver daemon")
            else ""
        ),
        "ops/s, archiver daemon",
    ),
    ("daemon CPU when idle", lambda r: num(value(r, "daemon CPU with no changes"), " CPU-s/min"), "daemon CPU with no"),
    (
        "daemon RSS after 240,000 changes to 2,000 records (ratio to after the first fifth)",
        lambda r: _ratio_cell(r, "daemon RSS after 240,000", " MB"),
        "daemon RSS after 240,000",
    ),
]


def _target(title: str) -> tuple[str, str]:
    """The latest run's target for a figure, and whether that run met it."""
    f = figure(LATEST, title) if title else None
    if f is None or not f["target"]:
        return "", ""
    return f["target"], {True: "yes", False: "**no**", None: ""}[f["met"]]


def history_table() -> str:
    head = [f"{r} ({', '.join(x for x in (machine(r), label) if x)})" for r, label in HISTORY.items()]
    lines = [
        "| figure | " + " | ".join(head) + f" | target | met in {LATEST}? |",
        "|---|" + "--:|" * len(HISTORY) + "---|---|",
    ]
    for label, cell, target_of in HISTORY_ROWS:
        target, met = _target(target_of)
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in HISTORY) + f" | {target} | {met} |")
    return "\n".join(lines)


def same_run_table() -> str:
    """What bounds live ingest's ratio: each run's rate needed and SQLite's and the write path's own rates."""
    at_ratio = "over the rows a trial at 0.4 of the ceiling writes"
    lines = [
        "| same run | " + " | ".join(f"{r} ({machine(r)})" for r in SAME_RUN) + " |",
        "|---|" + "--:|" * len(SAME_RUN),
    ]

    def needed(r: str) -> str:
        ceiling = run(r)["ceilings"].get("min")
        if not ceiling:
            return ""
        rate = 0.4 * ceiling
        return f"{num(rate)}/s ({num(rate * TRIAL_S / 1000)}k rows)"

    def machine_limit(r: str) -> str:
        f = figure(r, "sustained rate vs the machine limit")
        return "" if f is None or not f["ratio"] else f"{num(f['value'] / f['ratio'])}/s"

    def whole_write_path(r: str) -> str:
        measured = (run(r).get("details") or {}).get("ingest", {}).get("write_path_at_ratio_size") or {}
        return num(measured.get("write_path_records_per_s"), " records/s")

    def cpu(r: str) -> str:
        return _triple(r, [CPU + "daemon", CPU + "redis-server", CPU + "load writer"], " µs").replace(" / ", "; ")

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("0.4 of the ceiling (the lower of 1(a) and 1(b)): the rate needed", needed),
        ("SQLite's own upsert, sessions rows", lambda r: num(value(r, f"SQLite's own upsert {at_ratio}"), " rows/s")),
        (
            "the same with each record's first history row",
            lambda r: num(value(r, f"SQLite's own upsert {at_ratio} and their first history"), " records/s"),
        ),
        ("the daemon's whole write path alone, one thread", whole_write_path),
        (
            "the same, its SQLite statements alone",
            lambda r: num(value(r, f"the daemon's write path {at_ratio}"), " records/s"),
        ),
        ("the daemon, sustained", lambda r: num(_rate(r), "/s")),
        (
            "its CPU per change; redis-server; load writer",
            lambda r: _triple(r, [CPU + "daemon", CPU + "redis-server", CPU + "load writer"], " µs").replace(
                " / ", "; "
            ),
        ),
        ("the machine limit: 2 cores / the three processes' CPU per change", machine_limit),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in SAME_RUN) + " |")
    return "\n".join(lines)


def latest_table() -> str:
    """Every figure of the latest full run, as ``python -m bench`` printed it."""
    figures = [
        Figure(
            f["benchmark"],
            f["figure"],
            f["value"],
            f["unit"],
            f["baseline"],
            f["baseline_name"],
            [Target(t["on"], t["op"], t["threshold"]) for t in f["targets"]],
            f["note"],
            f["error"],
            f["ratio"] if f["ratio_is_paired"] else None,
        )
        for f in run(LATEST)["figures"]
    ]
    m = run(LATEST)["machine"]
    head = (
        f"`bench/results/{LATEST}.json`: {run(LATEST)['started_at'][:10]}, {m.get('nproc')} CPUs "
        f"({m.get('Model name', '?')}), Python {m['python']}, SQLite {m['sqlite']}, "
        f"{str(m.get('redis_server', 'redis-server ?')).split(' sha=')[0]}."
    )
    # a blank line before the notes' list, which Python-Markdown needs to see a list
    return head + "\n\n" + markdown_table(figures).replace("\nNotes:\n- ", "\nNotes:\n\n- ")


TABLES: dict[str, Callable[[], str]] = {"history": history_table, "same-run": same_run_table, "latest": latest_table}


def render(page: str) -> str:
    """The page with each table regenerated between its markers."""
    for name, make in TABLES.items():
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        if start not in page or end not in page:
            raise SystemExit(f"{PAGE}: the markers {start} and {end} are missing")
        head, rest = page.split(start, 1)
        _, tail = rest.split(end, 1)
        page = f"{head}{start}\n{make()}\n{end}{tail}"
    return page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is out of date")
    args = parser.parse_args()
    current = PAGE.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{PAGE.relative_to(REPO)} is out of date: run scripts/bench_tables.py", file=sys.stderr)
            return 1
        return 0
    temporary = PAGE.with_name(PAGE.name + ".tmp")
    temporary.write_text(wanted)
    os.replace(temporary, PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
