"""How the test suite itself is laid out: what a developer relies on when running part of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_the_unit_tests_run_without_desto_and_without_servers(tmp_path: Path) -> None:
    """``pytest -m unit`` is the quick loop: it must not need desto installed (its classes drive
    only the integration tests) nor start a redis-server or a daemon."""
    blocked = tmp_path / "blocked" / "desto"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("desto is not installed here")\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "unit", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        # no redis-server on this PATH (nor anything else): a unit test that starts one fails
        env={"PATH": str(tmp_path / "empty"), "PYTHONPATH": str(blocked.parent), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
