"""The Grafana dashboard and the Prometheus rules in docs/ against a running daemon: every metric
they use is one the daemon exports, and the daemon's failure metrics move when its writes fail."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fault_helpers import start_ready
from tests.helpers import REPO, count, lock_holder, session_hash, wait_for
from tests.redis_server import free_port

DASHBOARD = REPO / "docs" / "grafana" / "desto-archiver.json"
RULES = REPO / "docs" / "prometheus" / "desto-archiver-rules.yml"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself records for every scrape target
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, label names, keywords, numbers removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings, e.g. label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, Grafana's $__rate_interval included
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set(re.findall(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text))
    return names - PROMQL_WORDS


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["expr"]] if isinstance(node.get("expr"), str) else []
            return found + [e for value in node.values() for e in walk(value)]
        if isinstance(node, list):
            return [e for item in node for e in walk(item)]
        return []

    return walk(json.loads(DASHBOARD.read_text()))


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_expression_parser_finds_names_and_nothing_else() -> None:
    quantile = 'histogram_quantile(0.99, sum by (le) (rate(desto_archiver_batch_seconds_bucket{job=~"$job"}[5m])))'
    assert metric_names(quantile) == {"desto_archiver_batch_seconds_bucket"}
    assert metric_names("rate(desto_archiver_keys_read_total[$__rate_interval])") == {"desto_archiver_keys_read_total"}
    assert metric_names('up{job="x"} == 0 and on (instance) desto_archiver_lag_seconds > 60') == {
        "up",
        "desto_archiver_lag_seconds",
    }


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "desto-archiver"
    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    for needed in (
        "desto_archiver_lag_seconds",
        "desto_archiver_pending_keys",
        "desto_archiver_rows_written_total",
        "desto_archiver_reconciles_total",
        "desto_archiver_reconnects_total",
        "desto_archiver_quarantined_total",
        "desto_archiver_batch_seconds_bucket",
        "desto_archiver_redis_subscribed",
        "desto_archiver_failing",
        "desto_archiver_missed_changes_total",
        "desto_archiver_missed_changes_streak",
    ):
        assert needed in used, f"the dashboard shows no {needed}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "two panels share an id"


def test_the_rules_alert_on_lag_subscription_writes_and_a_daemon_down() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    assert {
        "DestoArchiverDown",
        "DestoArchiverLagHigh",
        "DestoArchiverNotSubscribed",
        "DestoArchiverWritesFailing",
        "DestoArchiverNotificationsLosingChanges",
    } <= set(alerts)
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = shutil.which("promtool", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/test takes it out of Debian's prometheus package)")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # each alert fires when it should and not before, on series shaped like the daemon's
    tests = REPO / "tests" / "fixtures" / "prometheus-rules-test.yml"
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample the daemon serves: {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_every_metric_the_dashboard_and_rules_use_is_exported_and_failures_show(
    redis_server, redis, db_path: Path, daemons
) -> None:
    port = free_port()
    daemon = start_ready(
        daemons, redis_server, db_path, ARCHIVER_METRICS_PORT=str(port), ARCHIVER_SQLITE_BUSY_TIMEOUT="0.05"
    )
    try:
        record = session_hash()
        redis.hset(f"desto:session:{record['session_id']}", mapping=record)
        wait_for(lambda: count(db_path, "sessions") == 1)
        exported = wait_for(lambda: (s := scrape(port)).get("desto_archiver_batch_seconds_bucket") and s)
        used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
        used |= {name for rule in rules() for name in metric_names(rule["expr"])}
        missing = used - set(exported) - PROMETHEUS_OWN
        assert not missing, f"used but not exported by the daemon: {sorted(missing)}"
        assert exported["desto_archiver_failing"] == {(("operation", "redis"),): 0.0, (("operation", "sqlite"),): 0.0}
        assert exported["desto_archiver_write_failures_total"] == {(): 0.0}

        # Another writer holds the file's lock: the daemon's writes fail, and the metrics say so.
        with lock_holder(db_path, hold_s=30, gap_s=0):
            second = session_hash()
            redis.hset(f"desto:session:{second['session_id']}", mapping=second)
            failing = wait_for(
                lambda: (s := scrape(port))["desto_archiver_failing"][(("operation", "sqlite"),)] == 1.0 and s
            )
            assert failing["desto_archiver_write_failures_total"][()] >= 1
        recovered = wait_for(
            lambda: (s := scrape(port))["desto_archiver_failing"][(("operation", "sqlite"),)] == 0 and s
        )
        assert recovered["desto_archiver_write_failures_total"][()] >= 1  # a counter: it keeps what happened
        wait_for(lambda: count(db_path, "sessions") == 2)
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=15) == 0
