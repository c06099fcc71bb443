"""Progress of a run without the dashboard, on stderr (stdout stays for what the command prints).

At a terminal: a `rich.progress` bar over the workload's requests with virtual time, wall time
and an estimate of the time left. Elsewhere (a pipe, CI, a log file): one plain line every
`line_interval_s`, and one at the end. It observes the run's set-up and end events and
every completed request (a counter each).
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rdu.base import UserError
from rdu.scheduler.metrics import RequestRecord
from rdu.scheduler.timeline import End, Event, Setup

__all__ = ["RunProgress"]


class RunProgress:
    """Counts requests done and follows the virtual clock; shows them at most a few times a second."""

    def __init__(self, console: Console | None = None, line_interval_s: float = 5.0) -> None:
        self.console = console or Console(file=sys.stderr)  # bound now, like the CLI's stdout console
        self.line_interval_s = line_interval_s
        self.total = 0
        self.done = 0
        self.clock_ns = 0
        self.name = ""
        self._progress: Progress | None = None
        self._task = None
        self._started = time.perf_counter()
        self._last_line = self._started

    def __enter__(self) -> "RunProgress":
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("requests, virtual {task.fields[virtual]}"), TimeElapsedColumn(),
                TextColumn("left"), TimeRemainingColumn(), console=self.console, transient=True,
                refresh_per_second=4)
            self._progress.start()
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.total and not (exc_type is not None and issubclass(exc_type, UserError)):
            self._line(final=True)   # a refused run says so in one line: no progress line before it

    event_types = (Setup, End)   # the run's own events; completed requests come through `on_record`

    def __call__(self, event: Event) -> None:
        if isinstance(event, Setup):
            self.total, self.name = event.requests, event.name
            self._started = self._last_line = time.perf_counter()
            if self._progress is not None:
                self._task = self._progress.add_task(self.name, total=self.total, virtual="0.000 s")
        self.clock_ns = max(self.clock_ns, event.t_ns)
        self._show()

    def on_record(self, record: RequestRecord) -> None:
        self.done += 1
        self.clock_ns = max(self.clock_ns, record.finish_ns)
        if self.done % 64 == 0:
            self._show()

    def _show(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.done, virtual=f"{self.clock_ns / 1e9:,.3f} s")
        elif self._progress is None and time.perf_counter() - self._last_line >= self.line_interval_s:
            self._line()

    def _line(self, final: bool = False) -> None:
        now = time.perf_counter()
        self._last_line = now
        wall_s = now - self._started
        left = ""
        if not final and self.done and self.total > self.done:
            left = f", ~{wall_s * (self.total - self.done) / self.done:,.0f} s left"
        self.console.print(f"{self.name}: {self.done:,}/{self.total:,} requests done, virtual "
                           f"{self.clock_ns / 1e9:,.3f} s, wall {wall_s:,.1f} s{left}", highlight=False,
                           soft_wrap=True)
