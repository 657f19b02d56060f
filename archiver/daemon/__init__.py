"""The daemon: its main loop and the parts it drives (threads, reconciles, housekeeping)."""
