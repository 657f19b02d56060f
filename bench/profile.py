"""Profile the daemon on the live-ingest path at a fixed rate, to find what to optimise.

``python -m bench --profile --rate 8000 --seconds 20`` starts a redis-server and the daemon as in
the ingest benchmark, attaches a sampling profiler to the daemon, has the writer process send
``rate`` changes/s for ``seconds``, waits until every change is archived, and stops the
profiler. Profilers (``pip install -e '.[bench]'``):

- ``py-spy`` (default): ``py-spy record --pid <daemon> --threads --format raw`` at 250 Hz, both
  threads (the listener and the main loop), idle samples excluded. Writes the collapsed stacks
  (``<out>``: flamegraph.pl and speedscope read them) and a summary (``<out>.top.txt``):
  samples per thread, the top functions by self time and by total (inclusive) time, and the
  top lines by self time, each as % of all samples. With ``--gil``, only samples of the thread
  holding the GIL: where the interpreter's one core of Python goes. With ``--idle``, idle samples
  too: each thread's wall clock, waits on Redis, SQLite and the GIL included.
- ``pyinstrument``: runs the daemon under ``python -m pyinstrument`` and writes its HTML
  report (``<out>``); pyinstrument samples the main thread only, so the listener is not seen.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Context, DaemonProcess, WriterProcess, max_rowid, ro_connect

_LINE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r".*/(site-packages|lib/python3\.\d+)/")


def _frame(frame: str) -> tuple[str, str]:
    """('func (file)', 'func (file:line)') of one py-spy frame, paths shortened."""
    m = _LINE.match(frame.strip())
    if m is None:
        return frame, frame
    path = _SITE.sub("", m["file"])
    return f"{m['func']} ({path})", f"{m['func']} ({path}:{m['line']})" if m["line"] else f"{m['func']} ({path})"


def summarize(raw: str, top: int = 25) -> dict[str, Any]:
    """Self and total time per function from py-spy's collapsed stacks (``--format raw``), over
    all samples and, for each thread, over that thread's samples."""
    self_fn: dict[str, Counter[str]] = {}
    total_fn: dict[str, Counter[str]] = {}
    self_line: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            frames = frames[1:]
            thread = thread.split(":", 1)[1].strip() if ":" in thread else thread
        else:
            thread = "all"
        if not frames:
            continue
        threads[thread] += count
        parsed = [_frame(f) for f in frames]
        self_fn.setdefault(thread, Counter())[parsed[-1][0]] += count
        self_line[parsed[-1][1]] += count
        totals = total_fn.setdefault(thread, Counter())
        for name in {p[0] for p in parsed}:
            totals[name] += count
    samples = sum(threads.values())

    def pct(counter: Counter[str], of: int, n: int = top) -> list[tuple[str, float]]:
        return [(name, 100.0 * k / of) for name, k in counter.most_common(n)] if of else []

    def merged(by_thread: dict[str, Counter[str]]) -> Counter[str]:
        out: Counter[str] = Counter()
        for counter in by_thread.values():
            out.update(counter)
        return out

    return {
        "samples": samples,
        "threads": pct(threads, samples),
        "self": pct(merged(self_fn), samples),
        "total": pct(merged(total_fn), samples),
        "self_lines": pct(self_line, samples),
        "per_thread": {
            thread: {
                "samples": n,
                "self": pct(self_fn[thread], n, 15),
                "total": pct(total_fn[thread], n, 20),
            }
            for thread, n in threads.most_common()
        },
    }


def render(summary: dict[str, Any], header: str = "") -> str:
    out = [header] if header else []
    out.append(f"{summary['samples']} samples (all threads); % of all samples")
    for title, key in (
        ("per thread", "threads"),
        ("top functions by self time", "self"),
        ("top functions by total time (inclusive)", "total"),
        ("top lines by self time", "self_lines"),
    ):
        out.append(f"\n{title}:")
        out += [f"  {share:6.2f}%  {name}" for name, share in summary[key]]
    for thread, view in summary.get("per_thread", {}).items():
        if len(summary["per_thread"]) < 2:
            break
        out.append(f"\n── thread {thread}: {view['samples']} samples; % of this thread's samples")
        out.append("self:")
        out += [f"  {share:6.2f}%  {name}" for name, share in view["self"]]
        out.append("total (inclusive):")
        out += [f"  {share:6.2f}%  {name}" for name, share in view["total"]]
    return "\n".join(out) + "\n"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install -e '.[bench]'")
    return found


def run(
    ctx: Context, rate: float, seconds: float, out_path: Path, profiler: str, gil: bool = False, idle: bool = False
) -> dict[str, Any]:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if profiler == "pyinstrument":
        _tool("pyinstrument")
        prefix = ["-m", "pyinstrument", "-r", "html", "-o", str(out_path)]
    with (
        ctx.redis("profile") as server,
        DaemonProcess(ctx, server, ctx.fresh_dir("profile"), python_args=prefix) as daemon,
    ):
        daemon.start()
        spy = None
        if profiler == "py-spy":
            spy = ctx.procs.spawn(
                [
                    _tool("py-spy"), "record", "--pid", str(daemon.pid), "--rate", "250", "--threads",
                    "--format", "raw", "-o", str(out_path), *(["--gil"] if gil else []), *(["--idle"] if idle else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            if spy.poll() is not None:
                raise RuntimeError(f"py-spy could not attach: {spy.communicate()[1][-1000:]}")
        ctx.log(f"profile: {profiler} on the daemon, {rate:,.0f} changes/s for {seconds:g} s")
        writer = WriterProcess(ctx, server.port, rate, seconds, ctx.tag())
        result = writer.result()
        conn = ro_connect(daemon.db_path)
        try:
            deadline = time.monotonic() + 120
            while max_rowid(conn) < result["sent"] and time.monotonic() < deadline:
                time.sleep(0.01)
            caught_up_s = time.time() - result["wall_last"]
            archived = max_rowid(conn)
        finally:
            conn.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            _, err = spy.communicate(timeout=60)
            ctx.procs.forget(spy)
            if not out_path.exists():
                raise RuntimeError(f"py-spy wrote no profile: {err[-1000:]}")
        daemon.stop()
    info = {
        "rate": rate,
        "seconds": seconds,
        "sent": result["sent"],
        "achieved_rate": result["achieved_rate"],
        "archived": archived,
        "catch_up_s": caught_up_s,
        "profiler": profiler,
        "gil_only": gil,
        "idle_included": idle,
        "profile": str(out_path),
    }
    what = profiler + (", GIL holders only" if gil else "") + (", idle samples included (wall clock)" if idle else "")
    header = (
        f"daemon profile ({what}): {result['achieved_rate']:,.0f} changes/s for {seconds:g} s, "
        f"{archived:,} of {result['sent']:,} archived, caught up {caught_up_s:.2f} s after the last send"
    )
    if profiler == "py-spy":
        summary = summarize(out_path.read_text())
        text = render(summary, header)
        top_path = out_path.with_name(out_path.name + ".top.txt")
        top_path.write_text(text)
        info.update(summary=summary, summary_file=str(top_path))
        print(text)
    else:
        print(header + f"\nreport: {out_path}")
    return info
