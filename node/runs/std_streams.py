"""Keep stdout for what a command prints: Ray's own output goes to a log file.

Ray's processes (raylet, GCS, the driver's core worker) write warnings and C++ log lines straight
to file descriptors 1 and 2, which would land in the middle of `rdu run --json`. The CLI calls
`protect_std_streams()` once: Python's `sys.stdout` / `sys.stderr` move to private copies of the
user's streams, so everything the tool prints still reaches them. While a Ray session runs,
`native_output_to(path)` points descriptors 1 and 2 themselves at a log file (the run
directory's `ray.log`), and Python's `sys.stdout` too, where Ray's driver threads print the
raylet's warnings; Ray's children inherit the descriptors. What the tool draws meanwhile (the
dashboard, progress) goes through consoles bound to the user's streams when they were made. Outside the CLI (tests, notebooks) nothing
is protected and `native_output_to` does nothing: the caller's streams are left alone.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["protect_std_streams", "native_output_to"]

_saved: dict[int, int] = {}


def _wrap(fd: int, like: io.TextIOBase) -> io.TextIOWrapper:
    return io.TextIOWrapper(os.fdopen(fd, "wb"), encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "strict", line_buffering=True,
                            write_through=True)


def protect_std_streams() -> None:
    """Give Python's stdout/stderr their own copies of descriptors 1 and 2 (once per process)."""
    if _saved:
        return
    try:
        copies = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:
        return  # a closed stream: nothing to protect
    sys.stdout.flush()
    sys.stderr.flush()
    _saved.update(copies)
    sys.stdout = _wrap(copies[1], sys.stdout)
    sys.stderr = _wrap(copies[2], sys.stderr)


@contextmanager
def native_output_to(path: Path) -> Iterator[None]:
    """Descriptors 1 and 2 go to `path` (appended) for the duration, when the streams are protected."""
    if not _saved:
        yield
        return
    user_stdout = sys.stdout
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = log  # Ray's driver threads print the raylet's warnings to sys.stdout
            yield
        finally:
            sys.stdout = user_stdout
            os.dup2(_saved[1], 1)
            os.dup2(_saved[2], 2)
