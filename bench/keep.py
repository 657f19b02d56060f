"""``python -m bench.keep RUN.json``: keep a run of ``python -m bench --json`` for the documentation.

A run's JSON holds every sample it took (a backlog sample every 0.2 s of each ingest trial, ...):
megabytes nobody reads. The kept copy, ``bench/results/<commit>[-<suffix>].json``, has every figure,
the ceilings, the machine and the code, and each trial's own summary; sample series are replaced
by their length. ``scripts/bench_tables.py`` then regenerates the performance page's tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO

RESULTS = REPO / "bench" / "results"
SAMPLE_SERIES = ("backlog_samples",)  # per-trial series the trial's own figures already summarise


def summarise(document: dict[str, Any]) -> dict[str, Any]:
    """The run without its sample series (each replaced by how many samples it had)."""
    kept = json.loads(json.dumps(document, default=str))
    for trial in (kept.get("details") or {}).get("ingest", {}).get("trials", []):
        for name in SAMPLE_SERIES:
            if name in trial:
                trial[f"{name}_dropped"] = len(trial.pop(name))
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.keep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: .venv/bin/python -m bench.keep bench/runs/f206e92-20261127T142920Z.json",
    )
    parser.add_argument("run", type=Path, help="a JSON file written by python -m bench --json")
    parser.add_argument("--suffix", help="e.g. 'ingest' for a run of some benchmarks only: <commit>-ingest.json")
    parser.add_argument("--force", action="store_true", help="replace a kept run of the same name")
    parser.add_argument("--into", metavar="DIR", type=Path, default=RESULTS, help="where to keep it (bench/results/)")
    args = parser.parse_args(argv)
    document = json.loads(args.run.read_text())
    commit = (document.get("code") or {}).get("at_start", {}).get("commit")
    if not commit or (document.get("code") or {}).get("at_start", {}).get("uncommitted"):
        raise SystemExit(f"{args.run}: the run names no commit (uncommitted code is not kept)")
    target = args.into / (f"{commit}-{args.suffix}.json" if args.suffix else f"{commit}.json")
    if target.exists() and not args.force:
        raise SystemExit(f"{target} exists (--force to replace it)")
    target.write_text(json.dumps(summarise(document), indent=2) + "\n")
    print(f"kept as {target}; cite it in docs/performance.md, then run scripts/bench_tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
