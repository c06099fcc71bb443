"""Progress of a bench run, always on stderr: stdout carries only the table, so
`make bench > table.txt` stays clean while the person watching still sees what runs.

At a terminal it is a transient rich.progress display (the benchmark running, k/N, its elapsed
time); elsewhere (CI, a log file) one plain line when a benchmark starts and one when it ends,
with its wall time, because a live display would fill a log with redraws.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class BenchProgress:
    """k/N over the benchmark groups of one run. Use as a context manager, then wrap each group
    in `with progress.group(name):`."""

    def __init__(self, total: int, stream: TextIO | None = None, terminal: bool | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.console = Console(file=self.stream, force_terminal=terminal)
        self.live = self.console.is_terminal if terminal is None else terminal
        self.done = 0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "BenchProgress":
        if self.live:
            self._progress = Progress(SpinnerColumn(), TextColumn("bench [bold]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _say(self, text: str) -> None:
        """A permanent line on stderr (above the live display at a terminal)."""
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def group(self, name: str) -> Iterator[None]:
        """Announce a benchmark group, time it, and count it as done however it ends."""
        k = self.done + 1
        if self._progress is not None:
            self._progress.update(self._task, description=f"{name} ({k}/{self.total})")
            self._progress.reset(self._task, total=self.total, completed=self.done)
        else:
            self._say(f"bench [{k}/{self.total}] {name}: started")
        started = time.perf_counter()
        outcome = "crashed"
        try:
            yield
            outcome = "finished"
        finally:
            wall_s = time.perf_counter() - started
            self.done += 1
            if self._progress is not None:
                self._progress.update(self._task, completed=self.done)
            self._say(f"bench [{k}/{self.total}] {name}: {outcome} in {wall_s:.1f} s")


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr while benchmarks run: Ray, gRPC and the processes they
    start may print to stdout, which must carry only the table. Done at the descriptor level too,
    so native code and child processes started meanwhile write to stderr as well."""
    sys.stdout.flush()
    saved_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):  # Python-level writers too, wherever sys.stdout points
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
