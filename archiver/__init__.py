"""desto-archiver: keeps desto's Redis history forever in a desto-readable SQLite file."""

# The one place the version is written: the package metadata (pyproject.toml's dynamic version),
# --version, the daemon's start log line, the metrics' build_info and the image's labels read it.
__version__ = "0.2.0"
