#!/usr/bin/env python3
"""The model-based test (tests/test_model.py) for hours, before a release: round after round, each
with a new seed, until the time is up or a round fails.

    .venv/bin/python scripts/soak.py --hours 1
    .venv/bin/python scripts/soak.py --hours 8 --keep-going --examples 5 --steps 40

Each round prints its seed, its histories and steps, and how long it took; a failing round's whole
output (the shrunk history, and MODEL_SEED to replay it) is kept in soak-<seed>.log. The summary at
the end says how many histories and steps ran, and which seeds failed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=float, required=True, help="how long to run (rounds end at their own pace)")
    parser.add_argument("--examples", type=int, default=4, help="histories per round (default 4)")
    parser.add_argument("--steps", type=int, default=40, help="steps per history at most (default 40)")
    parser.add_argument("--keep-going", action="store_true", help="go on after a failing round")
    parser.add_argument(
        "--logs", type=Path, default=REPO, help="where failing rounds' logs go (default: the repository)"
    )
    args = parser.parse_args()

    deadline = time.monotonic() + args.hours * 3600
    rounds, histories, failed = 0, 0, []
    started = time.monotonic()
    while time.monotonic() < deadline:
        seed = random.SystemRandom().randrange(2**32)
        env = {
            **os.environ,
            "MODEL_SEED": str(seed),
            "MODEL_EXAMPLES": str(args.examples),
            "MODEL_STEPS": str(args.steps),
        }
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/test_model.py",
                "-q",
                "-s",
                "-p",
                "no:cacheprovider",
                "-o",
                "timeout=0",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        rounds += 1
        ok = proc.returncode == 0
        histories += args.examples if ok else 0
        took = time.monotonic() - t0
        print(f"round {rounds}: seed {seed}: {'passed' if ok else 'FAILED'} in {took:.0f} s", flush=True)
        if not ok:
            log = args.logs / f"soak-{seed}.log"
            log.write_text(proc.stdout + proc.stderr)
            steps = re.findall(r"^\s*(?:E\s+)?state\.\w+\(.*$", proc.stdout, re.M)
            print(f"  the failing history ({len(steps)} steps) and how to replay it: {log}", flush=True)
            failed.append(seed)
            if not args.keep_going:
                break
    hours = (time.monotonic() - started) / 3600
    print(
        f"soak: {rounds} rounds in {hours:.2f} h, {histories} histories passed"
        + (
            f"; failing seeds: {', '.join(map(str, failed))} (MODEL_SEED=<seed> replays one)"
            if failed
            else "; none failed"
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
