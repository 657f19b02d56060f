"""The benchmark suite at smoke size, so it never rots: every benchmark runs to the end and
reports its figures with sane values (zero loss, every change seen, counts that add up).

Speeds are not asserted: the machine is shared, and the targets are for ``python -m bench``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench.profile import render, summarize
from bench.soak import slope
from tests.helpers import REPO

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    results = out / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(results), "--workdir", str(out / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"python -m bench --smoke failed:\n{proc.stderr[-4000:]}"
    document: dict[str, Any] = json.loads(results.read_text())
    document["stdout"] = proc.stdout
    return document


def test_a_kept_run_has_every_figure_and_no_sample_series(smoke: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({k: v for k, v in smoke.items() if k != "stdout"}))
    if not smoke["code"]["at_start"]["commit"] or smoke["code"]["at_start"]["uncommitted"]:
        refused = subprocess.run([sys.executable, "-m", "bench.keep", str(run), "--into", str(tmp_path)], cwd=REPO)
        assert refused.returncode != 0  # a run of uncommitted code is not kept
        return
    kept = subprocess.run(
        [sys.executable, "-m", "bench.keep", str(run), "--into", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert kept.returncode == 0, kept.stderr
    [path] = tmp_path.glob(f"{smoke['code']['at_start']['commit']}.json")
    document = json.loads(path.read_text())
    assert document["figures"] == smoke["figures"] and document["ceilings"] == smoke["ceilings"]
    trials = document["details"]["ingest"]["trials"]
    assert trials and all("backlog_samples" not in t and t["backlog_samples_dropped"] >= 0 for t in trials)


def test_json_alone_writes_a_new_file_git_ignores() -> None:
    path = bench_main._json_path(bench_main.RUNS, "abc1234")
    assert path.parent == REPO / "bench" / "runs" and path.name.startswith("abc1234-")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    assert ignored.returncode == 0, f"{path} would be committed"


def figures(document: dict[str, Any], benchmark: str) -> dict[str, dict[str, Any]]:
    return {f["figure"]: f for f in document["figures"] if f["benchmark"] == benchmark}


def test_the_run_prints_the_table_and_writes_every_figure_as_json(smoke: dict[str, Any]) -> None:
    assert smoke["mode"] == "smoke" and not smoke["errors"]
    assert smoke["duration_s"] < 180
    assert "| benchmark | figure | value | baseline | ratio | target | met? |" in smoke["stdout"]
    benchmarks = {"ceilings", "ingest", "latency", "backfill", "desto", "desto_tab", "idle", "central_lag", "soak"}
    assert {f["benchmark"] for f in smoke["figures"]} == benchmarks
    for figure in smoke["figures"]:
        assert figure["figure"] in smoke["stdout"]
        assert not figure["error"]
        if figure["baseline"] and figure["value"] is not None and not figure["ratio_is_paired"]:
            assert figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
    assert smoke["machine"]["nproc"] >= 1


def test_desto_s_tab_is_measured_with_and_without_the_indexes(smoke: dict[str, Any]) -> None:
    """Every query of desto's History tab, on both files, and the backfills that built them."""
    found = figures(smoke, "desto_tab")
    queries = [f for name, f in found.items() if "desto's tab at" in name]
    assert len(queries) == 6 and all(f["value"] > 0 and f["baseline"] > 0 for f in queries)
    details = smoke["details"]["desto_tab"]
    assert details["sessions"] == 10_000 and set(details["index_bytes"].values()) != {0}
    assert details["keys_per_s_with_indexes"] and details["keys_per_s_without"]


def test_ceilings_are_measured_and_the_smaller_is_the_ceiling(smoke: dict[str, Any]) -> None:
    found = figures(smoke, "ceilings")
    values = [f["value"] for f in found.values()]
    assert len(values) == 3 and all(v > 0 for v in values)
    ceilings = smoke["ceilings"]
    assert ceilings["min"] == min(ceilings["redis"], ceilings["sqlite"]) > 0


def test_ingest_loses_nothing(smoke: dict[str, Any]) -> None:
    trials = smoke["details"]["ingest"]["trials"]
    assert trials and trials[0]["rate"] == 1_000
    assert trials[0]["lost"] == 0, "the slowest rung must be archived whole (it may be slow, never lossy)"
    for trial in trials:
        assert trial["sent"] > 0 and trial["exit_code"] == 0
        if trial["lost"] is not None:  # caught up: every key archived with its final value
            assert trial["lost"] == 0 and trial["archived"] == trial["sent"]
            assert trial["compared"] == trial["sent"] and trial["mismatched"] == 0, trial["mismatch_examples"]
        if trial["sustained"]:
            assert not trial["problems"] and trial["catch_up_s"] <= 2.0
        assert all(trial["cpu_us_per_change"][p] > 0 for p in ("redis_server", "load_writer", "daemon"))
        rss = trial["daemon_rss_mb"]  # the daemon's own high-water mark, ready and after the stream
        assert 10 < rss["ready"] <= rss["peak"] < 1_000
    found = figures(smoke, "ingest")
    headline = found["highest sustained rate (zero loss, catch-up ≤ 2 s)"]
    assert headline["baseline"] == smoke["ceilings"]["min"]
    assert [t["threshold"] for t in headline["targets"]] == [40_000, 0.4]
    if headline["value"] is not None:  # the machine's cores, against what each process spent
        best = max((t for t in trials if t["sustained"]), key=lambda t: t["rate"])
        cpu = best["cpu_us_per_change"]
        cores = smoke["machine"]["nproc"]
        limit = found[f"machine limit: redis-server and the load writer alone fill {cores} cores"]
        assert limit["value"] == pytest.approx(cores * 1e6 / (cpu["redis_server"] + cpu["load_writer"]))
        # SQLite's own upsert over as many rows as the sustained trial wrote
        at_size = smoke["details"]["ingest"]["sqlite_ceiling_at_sustained_size"]
        assert at_size["rows"] == best["sent"] and at_size["rows_per_s"] > 0
        versus = found["sustained rate vs 1(b)'s upsert over as many rows as its trial wrote"]
        assert versus["baseline"] == at_size["rows_per_s"]
        memory = found["daemon peak RSS at the sustained rate"]
        assert (memory["value"], memory["baseline"]) == (best["daemon_rss_mb"]["peak"], best["daemon_rss_mb"]["ready"])
    # ... and over as many rows as a trial at the target rate writes (smoke: 3 s of 40,000/s)
    at_target = smoke["details"]["ingest"]["sqlite_ceiling_at_target_size"]
    assert at_target["rows"] == 120_000 and at_target["rows_per_s"] > 0
    target_size = found["SQLite's own upsert over the 120,000 rows a trial at 40,000/s writes"]
    assert target_size["value"] == at_target["rows_per_s"] and target_size["baseline"] == 40_000
    # ... and over as many rows as a trial at 0.4 of the ceiling writes
    at_ratio = smoke["details"]["ingest"]["sqlite_ceiling_at_ratio_size"]
    assert at_ratio["rate"] == pytest.approx(0.4 * smoke["ceilings"]["min"])
    assert at_ratio["rows"] == round(at_ratio["rate"] * 3) and at_ratio["rows_per_s"] > 0
    ratio_size = found["SQLite's own upsert over the rows a trial at 0.4 of the ceiling writes"]
    assert (ratio_size["value"], ratio_size["baseline"]) == (at_ratio["rows_per_s"], at_ratio["rate"])
    # ... and the same with each record's first status-history row, as the archive holds it
    with_history = smoke["details"]["ingest"]["sqlite_ceiling_at_ratio_with_history_size"]
    assert {k: with_history[k] for k in ("rows", "rate")} == {k: at_ratio[k] for k in ("rows", "rate")}
    named = "SQLite's own upsert over the rows a trial at 0.4 of the ceiling writes and their first history rows"
    assert (found[named]["value"], found[named]["unit"]) == (with_history["rows_per_s"], "records/s")
    # ... and the daemon's own write path in one thread: its SQLite statements bound any split
    write_path = smoke["details"]["ingest"]["write_path_at_ratio_size"]
    assert write_path["rows"] == at_ratio["rows"] and write_path["measured"]["rows"] == at_ratio["rows"]
    assert 0 < write_path["write_path_records_per_s"] < write_path["statements_records_per_s"]
    statements = dict(write_path["measured"]["statements_us_per_row"])
    restarts = statements.pop("PRAGMA wal_checkpoint", 0.0)  # the checkpointing thread's, in the daemon
    assert write_path["statements_records_per_s"] == pytest.approx(1e6 / sum(statements.values()))
    assert write_path["write_path_records_per_s"] == pytest.approx(
        1e6 / (write_path["measured"]["us_per_row"] - restarts)
    )
    named = (
        "the daemon's write path over the rows a trial at 0.4 of the ceiling writes, one thread: "
        "its SQLite statements alone"
    )
    assert (found[named]["value"], found[named]["baseline"]) == (
        write_path["statements_records_per_s"],
        at_ratio["rate"],
    )


def test_latency_sees_every_change_at_every_rate(smoke: dict[str, Any]) -> None:
    latency = smoke["details"]["latency"]
    assert [run["rate"] for run in latency["runs"]] == [100, 1_000, 10_000]
    for run in latency["runs"]:
        assert run["lost"] == 0 and run["seen"] == run["sent"] > 0
        ms = run["latency_ms"]
        assert 0 < ms["p50"] <= ms["p95"] <= ms["p99"] <= ms["max"]
        assert run["floor_samples"] > 0 and run["floor_ms"]["p50"] > 0
    assert latency["daemon_exit_code"] == 0
    found = figures(smoke, "latency")
    assert sum(1 for name in found if name.startswith("p")) == 9
    assert found["p50 at 1,000 changes/s"]["targets"] == [{"on": "value", "op": "<=", "threshold": 20.0}]


def test_backfill_reads_every_record_and_reports_its_memory(smoke: dict[str, Any]) -> None:
    details = smoke["details"]["backfill"]
    runs = details["runs"]
    assert [run["records"] for run in runs] == [2_000, 10_000]
    for run in runs:
        assert run["keys_read"] == run["written"] == run["rows"] == run["records"] and run["lost"] == 0
        assert run["keys_per_s"] > 0
        assert details["import_only_rss_mb"] < run["peak_rss_mb"] < 1_000
        # CPU time is read in clock ticks (10 ms): at 2,000 keys redis-server's, and the backfill's
        # less its start-up's, may be under one
        assert run["cpu_us_per_key"]["backfill"] >= 0 and run["cpu_us_per_key"]["redis_server"] >= 0
    assert runs[1]["cpu_us_per_key"]["backfill"] > 0 and runs[1]["cpu_us_per_key"]["redis_server"] > 0
    found = figures(smoke, "backfill")
    assert len(found) == 25
    stages = details["stage_cpu_us_per_key"]  # the same keys, stage by stage, in one thread
    assert set(stages) == {"scan", "read", "normalize", "write", "pickle send", "pickle receive"}
    assert all(us > 0 for us in stages.values())
    cores = smoke["machine"]["nproc"]
    redis_us = runs[0]["cpu_us_per_key"]["redis_server"]
    split = found[f"two-process backfill limit over 2k ({cores} cores / CPU per key of its stages and redis-server)"]
    assert split["value"] == pytest.approx(cores * 1e6 / (sum(stages.values()) + redis_us))
    assert split["baseline"] == 50_000
    # SQLite's own, at each size
    for ceilings in ("sqlite_ceiling_at", "sqlite_bulk_ceiling_at", "sqlite_bulk_with_history_ceiling_at"):
        assert {int(size) for size in details[ceilings]} == {2_000, 10_000}
        assert all(rate > 0 for rate in details[ceilings].values())
    for size, label in ((2_000, "2k"), (10_000, "10k")):  # each comparison against its own baseline
        history = found[f"keys/s over {label} records vs SQLite's bulk load with history rows at that size"]
        assert history["baseline"] == details["sqlite_bulk_with_history_ceiling_at"][str(size)]
        bulk = found[f"keys/s over {label} records vs SQLite's bulk load at that size"]
        assert bulk["baseline"] == details["sqlite_bulk_ceiling_at"][str(size)]
    limit = found[f"keys/s over 10k records vs the machine limit ({cores} cores / CPU per key of both)"]
    cpu = runs[1]["cpu_us_per_key"]
    assert limit["baseline"] == pytest.approx(cores * 1e6 / (cpu["backfill"] + cpu["redis_server"]))


def test_desto_runs_in_all_three_configurations_and_the_archive_keeps_up(smoke: dict[str, Any]) -> None:
    details = smoke["details"]["desto"]
    for config in ("none", "desto-store", "archiver"):
        rounds = details["results"][config]
        assert len(rounds) == details["rounds"]
        assert all(r["ops"] == details["ops_per_round"] and r["ops_per_s"] > 0 for r in rounds)
    for r in details["results"]["archiver"]:
        assert r["archive_matches"], r["archive_differences"]
        assert r["daemon_exit_code"] == 0 and not r["daemon_problems"]
    ratio = figures(smoke, "desto")["ops/s, archiver daemon beside desto"]["ratio"]
    assert ratio is not None and math.isfinite(ratio) and ratio > 0


def test_idle_cpu_is_measured_against_the_busy_daemon(smoke: dict[str, Any]) -> None:
    details = smoke["details"]["idle"]
    assert details["idle_cpu_s_per_min"] >= 0
    assert details["busy_cpu_s_per_min"] > 0
    assert details["daemon_exit_code"] == 0 and not details["daemon_problems"]
    assert figures(smoke, "idle")["daemon CPU with no changes"]["baseline"] == details["busy_cpu_s_per_min"]


def test_central_lag_follows_every_row_from_the_file_into_postgresql(smoke: dict[str, Any]) -> None:
    """Each row the writer sent is timed from the file into PostgreSQL, with the backlog between."""
    (run,) = smoke["details"]["central_lag"]["runs"]
    assert run["rate"] == 1_000 and run["shipped"] == run["sent"] > 0 and run["not_shipped_in_time"] == 0
    assert 0 <= run["lag_ms"]["p50"] <= run["lag_ms"]["p99"] <= run["lag_ms"]["max"]
    assert run["backlog_rows"]["max"] >= 0
    assert smoke["details"]["central_lag"]["daemon_exit_code"] == 0
    assert not smoke["details"]["central_lag"]["daemon_problems"]
    assert figures(smoke, "central_lag")["p99 at 1,000 changes/s"]["value"] == run["lag_ms"]["p99"]


def test_soak_samples_the_daemons_memory_while_every_key_ends_as_in_redis(smoke: dict[str, Any]) -> None:
    details = smoke["details"]["soak"]
    assert details["sent"] == round(details["rate"] * details["seconds"]) > details["keys"]
    # the writer rewrote the same keys: the file holds one row per key, each as Redis has it
    assert details["rows"] == details["compared"] == details["keys"]
    assert details["mismatched"] == 0, details["mismatch_examples"]
    assert details["daemon_exit_code"] == 0 and not details["daemon_problems"]
    assert details["reconciles"] >= 2  # the first, and the periodic ones the run goes through
    sent_by = [x for x, _ in details["samples"]]
    assert len(sent_by) >= 5 and sent_by == sorted(sent_by) and sent_by[-1] == details["sent"]
    assert all(mb > 10 for _, mb in details["samples"])
    assert len(details["wal_mb"]) == len(sent_by) and details["db_mb"] > 0
    warm = next(mb for x, mb in details["samples"] if x >= 0.2 * details["sent"])
    figure = figures(smoke, "soak")[f"daemon RSS after {details['sent']:,} changes to {details['keys']:,} records"]
    assert (figure["value"], figure["baseline"]) == (details["end_rss_mb"], details["warm_rss_mb"])
    assert details["warm_rss_mb"] == pytest.approx(warm, abs=0.01)
    assert details["end_rss_mb"] == pytest.approx(details["samples"][-1][1], abs=0.01)
    # the growth is the slope after the warm-up; the JSON's samples are rounded to 0.01 MB
    after = [(x, mb) for x, mb in details["samples"] if x >= 0.2 * details["sent"]]
    mean_x = sum(x for x, _ in after) / len(after)
    spread = sum((x - mean_x) ** 2 for x, _ in after)
    rounding = 0.005 * sum(abs(x - mean_x) for x, _ in after) / spread * 1e6
    assert details["growth_mb_per_million"] == pytest.approx(slope(after) * 1e6, abs=rounding + 1e-6)


def test_soak_growth_is_the_least_squares_slope() -> None:
    assert slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert slope([(0, 5.0), (10, 5.0), (20, 5.0)]) == 0.0
    assert slope([(0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0)]) == pytest.approx(0.2)
    assert slope([(3, 7.0)]) == 0.0 and slope([(3, 7.0), (3, 9.0)]) == 0.0


def test_profile_summary_counts_self_and_total_time() -> None:
    raw = (
        "thread (1): MainThread;run (archiver/daemon/pipeline.py:10);flush (archiver/daemon/pipeline.py:20) 6\n"
        "thread (1): MainThread;run (archiver/daemon/pipeline.py:10);write (archiver/archive/store.py:5) 3\n"
        "thread (2): archiver-listener;pump (archiver/redis_side/source.py:300) 1\n"
    )
    summary = summarize(raw)
    assert summary["samples"] == 10
    assert dict(summary["threads"]) == {"MainThread": 90.0, "archiver-listener": 10.0}
    assert dict(summary["self"])["flush (archiver/daemon/pipeline.py)"] == 60.0
    assert dict(summary["total"])["run (archiver/daemon/pipeline.py)"] == 90.0
    assert "top functions by self time" in render(summary)


def bench_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` from the repository, as its documentation shows it; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(
    shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None, reason="py-spy (the bench extra)"
)
def test_profile_writes_a_profile_and_its_summary(tmp_path: Path) -> None:
    out = tmp_path / "ingest.txt"
    bench_module("bench", "--profile", "--smoke", "--profile-out", str(out), "--workdir", str(tmp_path), timeout=240)
    summary = Path(f"{out}.top.txt").read_text()
    assert out.stat().st_size > 0
    assert "top functions by self time" in summary and "(archiver/daemon/pipeline.py)" in summary


def test_write_cost_times_every_statement_of_the_write_path(tmp_path: Path) -> None:
    out = tmp_path / "write-cost.json"
    proc = bench_module("bench.write_cost", "--rows", "3000", "--per-transaction", "1000", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["rows"] == 3000 and result["per_transaction"] == 1000
    statements = result["statements_us_per_row"]
    assert {"INSERT sessions", "INSERT status_history", "SELECT sessions", "COMMIT"} <= set(statements)
    assert all(us > 0 for us in statements.values())
    assert result["us_per_row"] == pytest.approx(sum(statements.values()) + result["python_us_per_row"])
    assert "INSERT sessions" in proc.stdout and "Python" in proc.stdout


def test_write_cost_with_erased_ids_times_their_lookup(tmp_path: Path) -> None:
    out = tmp_path / "write-cost.json"
    bench_module(
        "bench.write_cost", "--rows", "2000", "--per-transaction", "1000", "--erased", "5000", "--json", str(out)
    )
    result = json.loads(out.read_text())
    assert result["erased"] == 5000 and result["statements_us_per_row"]["SELECT archiver_erased"] > 0


def test_erase_cost_measures_size_and_every_way_of_erasing(tmp_path: Path) -> None:
    out = tmp_path / "erase-cost.json"
    proc = bench_module("bench.erase_cost", "--sessions", "600", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["history_rows"] == 600 * 3 * 2 and result["bytes_per_1000_sessions"] > 0
    scrubbed = result["finish_without_secure_delete"]
    assert scrubbed["scrub"] == "pages" and scrubbed["scrub_pages"]["transactions"] > 0
    assert scrubbed["desto"]["failed"] == 0 and result["vacuum"]["seconds"] > 0
    assert result["finish_with_secure_delete"]["scrub"] == "truncate"
    pruned = result["prune_half"]["records"]
    assert 290 <= pruned["session"] <= 300 and 580 <= pruned["job"] <= 600  # half, less the three erased before
    assert result["prune_half"]["bytes_after"] < result["prune_half"]["bytes_before"]
    assert result["clear_history_s"] > 0 and result["clear_history_without_triggers_s"] > 0
    assert "per 1,000 sessions" in proc.stdout and "Clear History" in proc.stdout and "a VACUUM instead" in proc.stdout


def test_rewrite_cost_compares_secure_delete_off_and_on() -> None:
    proc = bench_module("bench.rewrite_cost", "--rows", "2000", "--rounds", "1")
    assert "secure_delete off:" in proc.stdout and "secure_delete on :" in proc.stdout


def test_ship_benchmark_prints_its_three_ratios(tmp_path: Path) -> None:
    """``python -m bench.ship`` at a tiny size: every figure is measured, and the shipped rows are all there."""
    from tests.pg_helpers import skip_without_postgres

    skip_without_postgres()
    out = tmp_path / "ship.json"
    result = bench_module(
        "bench.ship", "--rows", "600", "--rate", "1000", "--seconds", "1", "--trials", "1", "--json", str(out),
        timeout=300,
    )  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["shipping"]["rows"] == 1200 and figures["shipping"]["log_entries"] >= 1200
    assert figures["write_path"]["ratio"] > 0 and figures["ingest"]["ratio"] > 0
    runs = [*figures["ingest"]["on"]["runs"], *figures["ingest"]["off"]["runs"]]
    assert [r["exit_code"] for r in runs] == [0, 0]
    assert "ratio" in result.stdout and "target >= 0.9" in result.stdout
