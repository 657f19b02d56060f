"""``python -m bench.peak_rss OUT MODULE [ARGS...]``: run ``MODULE`` as ``python -m`` would, then
write the process's peak RSS (and its CPU time, start-up included) to ``OUT`` as JSON.

The peak is the kernel's high-water mark of this process's own memory (``VmHWM`` in
``/proc/self/status``), read after the module is done, so it is exact. ``ru_maxrss`` from
``wait4`` would not be: when a large parent forks the child, the high-water mark of the
parent's pages, shared until ``exec``, is folded into the child's.
"""

from __future__ import annotations

import json
import runpy
import sys
import time

from tests.procfs import vm_hwm_kb


def main() -> int:
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    with open(out, "w") as f:
        json.dump({"vm_hwm_kb": vm_hwm_kb(), "cpu_s": time.process_time(), "exit_code": code}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
