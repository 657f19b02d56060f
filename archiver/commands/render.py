"""What the commands print for people: tables and aligned summaries (``--json`` prints the data).

Every value from the archive, Redis or the central database is shown through
:func:`archiver.output.visible` (tables and summaries do it themselves): it holds what desto's
users typed, and a terminal must not take its control characters as commands."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from archiver.output import pairs, table, visible


def backfill(report: Any) -> str:
    verb = " would be" if report.dry_run else ""
    kinds = sorted(set(report.records) | set(report.written))
    rows = [{"kind": k, "records": report.records.get(k, 0), f"written{verb}": report.written.get(k, 0)} for k in kinds]
    summary = pairs(
        [
            ("keys read", f"{report.keys_read:,} in {report.elapsed_s:.2f} s ({report.keys_per_s:,.0f} keys/s)"),
            ("unchanged", f"{report.unchanged:,}"),
            (f"tombstoned{verb}", f"{report.tombstoned:,}"),
            (
                f"quarantined{verb}",
                f"{report.quarantined:,} new, {report.still_quarantined:,} already in quarantine"
                + (f", {report.not_kept:,} not kept (the quarantine is full)" if report.not_kept else ""),
            ),
            ("erased", f"{report.erased:,} in Redis, erased on purpose: not written"),
        ]
    )
    title = "backfill (dry run: nothing written):" if report.dry_run else "backfill done:"
    return "\n".join([title, table(rows, ["kind", "records", f"written{verb}"]), summary])


def check(findings: list[Any], report: Any, show_diffs: bool) -> str:
    rows = [
        {"check": f.check, "status": "ok" if f.status == "ok" else f.status.upper(), "detail": f.detail}
        for f in findings
    ]
    if report is not None:
        detail = (
            f"{report.records:,} live records: {report.missing} missing, {report.differing} differing, "
            f"{report.extra} extra; {report.quarantined} quarantined"
            + (f" ({report.not_kept} not kept: the quarantine is full)" if report.not_kept else "")
            + f"; {report.erased} erased on purpose"
        )
        rows.append({"check": "verify", "status": "ok" if report.ok else "FAIL", "detail": detail})
    lines = [_last_column_whole(rows, ["check", "status", "detail"])]
    lines += [f"  {f.check}: {visible(f.hint)}" for f in findings if f.status != "ok" and f.hint]
    if report is not None and not report.ok:
        lines.append("  verify: the archive differs from Redis; 'desto-archiver backfill' brings it in line")
        if not show_diffs:
            lines.append("  (add --show-diffs to list them)")
        # grouped as the summary counts them (missing, differing, extra), each by key: not in Redis' SCAN order
        order = {"missing": 0, "differing": 1, "extra": 2}
        differences = sorted(report.differences, key=lambda d: (order.get(d.problem, 3), d.key))
        for d in differences if show_diffs else []:
            lines.append(f"  {d.problem}: {visible(d.key)}")
            for column, (archived, in_redis) in d.columns.items():
                lines.append(f"      {column}: archive {archived!r} != redis {in_redis!r}")
    return "\n".join(lines)


def _last_column_whole(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A table whose last column is never cut: a doctor's details are for reading whole."""
    first = columns[:-1]
    shown = [{c: visible(str(r[c])) for c in columns} for r in rows]
    widths = [max(len(c), *(len(r[c]) for r in shown)) for c in first]

    def line(values: list[str], last: str) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + "  " + last

    return "\n".join([line(first, columns[-1]), *(line([r[c] for c in first], r[columns[-1]]) for r in shown)])


def stats(stats: dict[str, Any]) -> str:
    rows = _kind_rows(stats)
    q = stats["quarantine"]
    truncated = f", {q['truncated']:,} truncated" if q.get("truncated") else ""
    summary = pairs(
        [
            ("file", f"{stats['file']} ({stats['file_bytes']:,} bytes, schema {stats['schema_version']})"),
            ("history events", f"{stats['history_events']:,}"),
            ("quarantine", f"{q['total']:,} ({q['unresolved']:,} unresolved, {q['payload_bytes']:,} bytes{truncated})"),
            *([("not kept", not_kept_line(q["not_kept"]))] if q.get("not_kept") else []),
            ("erased", _erased_line(stats["erased"])),
            ("last event", stats["last_event_at"] or "-"),
            ("last reconcile", stats["last_reconcile_at"] or "-"),
            ("missed changes", _missed_line(stats.get("last_reconcile_missed_changes"))),
            ("last backfill", _backfill_line(stats["last_backfill"])),
        ]
    )
    return table(rows, ["kind", "total", "tombstoned", "by status", "oldest", "newest"]) + "\n\n" + summary


def not_kept_line(noted: dict[str, Any]) -> str:
    """The file's note of rejected records the quarantine's total cap kept out, for people."""
    state = "the quarantine is full" if noted.get("full") else "there is room again"
    return (
        f"{int(noted.get('count', 0)):,} rejected records not stored: the quarantine reached its cap of "
        f"{int(noted.get('max_bytes', 0)):,} bytes (first at {noted.get('first_at', '-')}, last at "
        f"{noted.get('last_at', '-')}; {state})"
    )


_BY = {"desto": "desto", "forget": "forget", "retention": "retention"}


def _missed_line(missed: dict[str, int] | None) -> str:
    """The last reconcile's count of changes no notification had named."""
    if missed is None:
        return "- (not measured by the last reconcile)"
    total = sum(missed.values())
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in missed.items() if n)
    return f"{total:,} in the last reconcile" + (f" ({kinds})" if kinds else "")


def _erased_line(erased: dict[str, Any]) -> str:
    parts = [
        f"{sum(kinds.values()):,} by {_BY.get(how, how)} ("
        + ", ".join(f"{kind} {n:,}" for kind, n in sorted(kinds.items()))
        + ")"
        for how, kinds in sorted(erased["by_how"].items())
    ]
    if not parts:
        return "-"
    pending = f"; {erased['pending']:,} not yet scrubbed" if erased["pending"] else ""
    return "; ".join(parts) + f"; last at {erased['last_at']}{pending}"


def central_stats(stats: dict[str, Any]) -> str:
    """``stats --postgres-url``: the kinds across the hosts shipping there, then each host's shipping."""
    rows = _kind_rows(stats)
    q = stats["quarantine"]
    summary = pairs(
        [
            ("database", f"{stats['database']} (schema {stats['schema']}, version {stats['schema_version']})"),
            ("history events", f"{stats['history_events']:,}"),
            ("quarantine", f"{q['total']:,} ({q['unresolved']:,} unresolved, {q['payload_bytes']:,} bytes)"),
            ("erased", _erased_line(stats["erased"])),
        ]
    )
    sources = [
        {**s, "shipped at": s["shipped_at"] or "-", "copied at": s["copied_at"] or "-"} for s in stats["sources"]
    ]
    return (
        table(rows, ["kind", "total", "tombstoned", "by status", "oldest", "newest"])
        + "\n\n"
        + summary
        + "\n\n"
        + table(sources, ["source", "host", "file", "position", "shipped at", "copied at"])
    )


def _backfill_line(last: dict[str, Any] | None) -> str:
    if not last:
        return "-"
    return f"{last['keys_read']:,} keys in {last['elapsed_s']} s, {sum(last['written'].values()):,} written"


CENTRAL_HISTORY_COLUMNS = [
    "source_name",
    "id",
    "session_name",
    "status",
    "start_time",
    "end_time",
    "duration_s",
    "jobs",
    "gone",
]
HISTORY_COLUMNS = ["id", "session_name", "status", "start_time", "end_time", "duration_s", "jobs", "gone"]


def history(sessions: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows of ``history``'s table (HISTORY_COLUMNS), one per session, as they come."""
    for s in sessions:
        yield {**s, "id": s["session_id"][:8], "gone": s["gone_reason"] or ""}


def show(shown: dict[str, Any]) -> str:
    if "erased" in shown:
        return "\n".join(
            f"{e['kind']} {visible(e['record_id'])}: erased at {e['erased_at']} by {e['by']}; the archive keeps only "
            "its id, when and how"
            for e in shown["erased"]
        )
    s = shown["session"]
    header = pairs(
        [
            ("session", f"{s['session_name']} ({s['session_id']})"),
            ("status", s["status"]),
            ("started", s["start_time"] or "-"),
            ("ended", s["end_time"] or "-"),
            ("duration", f"{s['duration_s']} s" if s["duration_s"] is not None else "-"),
            ("tmux session", s["tmux_session_name"] or "-"),
            ("at job", s["at_job_id"] or "-"),
            ("in Redis", f"gone: {s['gone_reason']} at {s['gone_at']}" if s["gone_at"] else "yes"),
        ]
    )
    jobs = table(shown["jobs"], ["job_id", "status", "command", "start_time", "end_time", "duration_s", "exit_code"])
    events = [{**e, "record": f"{e['kind']} {e['record_id'][:8]}"} for e in shown["history"]]
    columns = ["observed_at", "record", "event", "previous_status", "status", "duration_s", "desto_timestamp"]
    return "\n".join([header, "", "jobs:", jobs, "", "status history:", table(events, columns)])


def forget(targets: list[Any], already: list[str], done: Any, dry_run: bool) -> str:
    lines = []
    if targets:
        verb = "would erase" if dry_run else "erased"
        lines.append(f"{verb} {len(targets)} record{'s' if len(targets) != 1 else ''}:")
        rows = [{"kind": t.kind.value, "id": t.record_id, "what": t.label, "via": t.via or ""} for t in targets]
        lines.append(table(rows, ["kind", "id", "what", "via"]))
    lines += [f"already erased: {visible(text)}" for text in already]
    if done is not None:
        scrub = {
            "pages": "free space of every page zeroed, WAL emptied",
            "vacuum": "file vacuumed, WAL emptied",
            "truncate": "WAL emptied",
        }.get(done.scrub or "", "nothing")
        if not done.scrub_done:
            scrub += " (pending: another process scrubs the file, or a reader held the WAL; the daemon finishes it)"
        lines.append(
            pairs(
                [
                    ("history rows", f"{done.history:,}"),
                    ("quarantine rows", f"{done.quarantine:,}"),
                    ("scrub", f"{scrub} in {done.scrub_s:.2f} s"),
                ]
            )
        )
    return "\n".join(lines) or "nothing to erase"


def restore(report: Any, every: bool) -> str:
    """What ``restore favorites`` wrote (or would write). Favorites already in Redis are listed
    only when named (``every``): otherwise they are a count. Names are desto's users' text: the
    table shows their control characters escaped (output.visible), never sends them to the terminal."""
    listed = [f for f in report.favorites if every or f.outcome != "in redis"]
    rows = [
        {
            "outcome": f.outcome,
            "favorite_id": f.favorite_id,
            "name": f.name,
            "uses": f.use_count,
            "left redis": _left_redis(f),
            "detail": f.detail or "",
        }
        for f in listed
    ]
    verb = "would restore" if report.dry_run else "restored"
    counted = report.count("would restore" if report.dry_run else "restored")
    lines = [
        f"{verb} {counted} favorite{'s' if counted != 1 else ''}"
        + (" (dry run: nothing written)" if report.dry_run else "")
    ]
    if rows:
        lines.append(_last_column_whole(rows, ["outcome", "favorite_id", "name", "uses", "left redis", "detail"]))
    hidden = len(report.favorites) - len(listed)
    if hidden:
        lines.append(f"{hidden} other archived favorite{'s are' if hidden != 1 else ' is'} in Redis: left as they are")
    return "\n".join(lines)


def _left_redis(favorite: Any) -> str:
    """How the favorite left Redis, as the archive recorded it (a dry run records nothing)."""
    if favorite.gone_reason is not None:
        return f"{favorite.gone_reason} {favorite.gone_at or ''}".strip()
    return "-" if favorite.outcome == "in redis" else "missing (not recorded yet)"


def prune(data: dict[str, Any]) -> str:
    records = data["records"]
    listed = ", ".join(f"{kind} {n:,}" for kind, n in sorted(records.items())) or "none"
    if data["dry_run"]:
        return f"would erase records that left Redis before {data['cutoff']}: {listed}"
    return "\n".join(
        [
            f"erased records that left Redis before {data['cutoff']}: {listed}",
            pairs(
                [
                    ("history rows", f"{data['history']:,}"),
                    ("quarantine rows", f"{data['quarantine']:,}"),
                    ("file", f"{data['bytes_before']:,} -> {data['bytes_after']:,} bytes in {data['seconds']:.2f} s"),
                ]
            ),
        ]
    )


def _kind_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per record kind of a ``stats`` result, the file's or the central database's."""
    return [
        {
            "kind": kind,
            "total": data["total"],
            "tombstoned": data["tombstoned"],
            "by status": ", ".join(f"{s} {n}" for s, n in data["by_status"].items()) or "-",
            "oldest": data["oldest"],
            "newest": data["newest"],
        }
        for kind, data in stats["records"].items()
    ]
