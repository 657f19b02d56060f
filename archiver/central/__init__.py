"""Central: the PostgreSQL schema, shipping the file into it, the reads of it."""
