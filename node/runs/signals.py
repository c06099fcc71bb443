"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM both stop a command cleanly.

Both become a `KeyboardInterrupt` in the main thread, so one path writes the results so far;
while a run serves, they only raise a flag that the serving loop checks between two rounds
(`stop_as_flag`), so a stop never lands half-way through recording a request;
the exit code says which signal it was (130 for SIGINT, 143 for SIGTERM). While a run's last
files are written, further signals are only noted (`deferred_interrupts`), so a second Ctrl-C
cannot strand a complete result in the hidden folder.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["install_stop_handlers", "deferred_interrupts", "stop_as_flag", "exit_code_for_stop"]

_last_signal = {"signum": signal.SIGINT}


def _raise_interrupt(signum: int, _frame) -> None:
    _last_signal["signum"] = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (main thread only; Ray may have replaced them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)


def exit_code_for_stop() -> int:
    """128 + the number of the signal that stopped the command (130 for Ctrl-C)."""
    return 128 + int(_last_signal["signum"])


@contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """Note SIGINT / SIGTERM instead of raising, for the duration; yields the list of those noted."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum: int, _frame) -> None:
        _last_signal["signum"] = signum
        noted.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def stop_as_flag() -> Iterator[Callable[[], bool]]:
    """For the duration, SIGINT / SIGTERM set a flag instead of raising; yields the function that
    tells whether one came (the serving loop then raises KeyboardInterrupt at a safe point)."""
    with deferred_interrupts() as noted:
        yield lambda: bool(noted)
