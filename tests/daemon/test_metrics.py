"""The metrics the daemon serves, as Prometheus reads them: the build information, and a row in
docs/metrics.md for every family."""

from __future__ import annotations

import platform
import re
import sqlite3
import subprocess
import sys

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from archiver import __version__
from archiver.daemon.metrics import Metrics, Snapshot
from tests.helpers import REPO

pytestmark = pytest.mark.unit

SHIPPING = {"shipped": 3, "copies": 1, "backlog": 0, "failing": False, "refused": False}


def families(snapshot: Snapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(Metrics(lambda: snapshot).registry).decode()
    return {
        family.name: [(sample.labels, sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_build_info_names_the_version_and_what_it_runs_on() -> None:
    [(labels, value)] = families(Snapshot())["desto_archiver_build_info"]
    assert value == 1
    assert labels == {
        "version": __version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "redis_py": redis.__version__,
    }


def test_every_metric_family_is_in_the_metrics_page() -> None:
    page = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(desto_archiver_\w+)", page, re.MULTILINE))
    text = generate_latest(Metrics(lambda: Snapshot(ship=SHIPPING)).registry).decode()
    # the histogram's own _created series is prometheus_client's, not one of the daemon's
    served = {n for n in re.findall(r"^# TYPE (\S+)", text, re.MULTILINE) if not n.endswith("_created")}
    assert {"desto_archiver_build_info", "desto_archiver_ship_backlog", "desto_archiver_batch_seconds"} <= served
    missing = sorted(served - documented)
    assert not missing, f"served but not in docs/metrics.md's table: {missing}"


def test_the_daemon_loads_prometheus_client_only_to_serve_metrics() -> None:
    """Metrics are off by default, and their library is 2 MB of an idle daemon's memory: the
    daemon's modules do not import it until ARCHIVER_METRICS_PORT asks for the metrics."""
    probe = (
        "import sys, archiver.commands.cli, archiver.daemon.pipeline, archiver.daemon.reporter; "
        "print('prometheus_client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"
