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
