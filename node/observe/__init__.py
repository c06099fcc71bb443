"""Watching a run: the event log, the live statistics and dashboard, the Perfetto trace, plots and
progress. Reads events only; never drives a run."""
