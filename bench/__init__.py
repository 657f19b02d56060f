"""desto-archiver's benchmark suite.

    .venv/bin/python -m bench                     # full size, about 20 minutes
    .venv/bin/python -m bench --smoke             # tiny sizes, under a minute
    .venv/bin/python -m bench --json results.json # also write every figure and raw detail as JSON
    .venv/bin/python -m bench --only ingest,idle  # some benchmarks (ceilings run too when needed)
    .venv/bin/python -m bench --profile --rate 8000 --seconds 20   # profile the daemon's hot path

Every benchmark starts its own redis-server on a free port and its own processes (the archiver
daemon, a load writer), and stops them all, even on failure. The machine is shared and noisy,
so each figure is judged as a ratio against a baseline measured in the same run; absolute
numbers are printed too. One module per benchmark, each with its method in its docstring:

- ``bench.ceilings``: 1. what redis-py and sqlite3 can do at best (the ceilings)
- ``bench.ingest``: 2. the highest change rate the daemon sustains with zero loss
- ``bench.latency``: 3. change-to-row latency at 100, 1 000 and 10 000 changes/s
- ``bench.backfill``: 4. ``desto-archiver backfill``: keys/s and peak RSS
- ``bench.desto_cost``: 5. desto's own operations/s with and without the archiver beside it
- ``bench.idle``: 6. the daemon's CPU time when nothing changes
- ``bench.soak``: 7. the daemon's memory over a few hundred thousand changes to live records
- ``bench.profile``: the daemon under a sampling profiler at a fixed ingest rate
"""
