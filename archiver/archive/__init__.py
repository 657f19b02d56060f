"""The archive: the SQLite file, its schema, its writes, erasure, its change log, its reads."""
