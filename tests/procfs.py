"""A process's memory figures from /proc. No other import: ``bench.peak_rss`` reads them in the
process it measures, where every module imported counts."""

from __future__ import annotations


def status_kb(pid: int | str, field: str) -> int:
    """One of a process's memory figures in ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...), in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def vm_hwm_kb(pid: int | str = "self") -> int:
    """A process's peak resident memory (the kernel's ``VmHWM``), in kB: this one's by default."""
    return status_kb(pid, "VmHWM")


def wakeups(pid: int | str) -> dict[str, int]:
    """Each thread's voluntary context switches so far (``/proc/<pid>/task/*/status``), by thread
    name: how often it went to sleep and was woken again."""
    import os

    counts: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                name = comm.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        counts[f"{name} ({tid})"] = int(line.split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return counts
