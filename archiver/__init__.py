"""desto-archiver: keeps desto's Redis history forever in a desto-readable SQLite file."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("desto-archiver")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
