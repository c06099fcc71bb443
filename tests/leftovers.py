"""Did the test run leave Ray or gRPC processes of ours behind?

    python tests/leftovers.py snapshot FILE   # before the tests: remember what already runs
    python tests/leftovers.py check FILE      # after: fail if a new Ray process is still alive

Only processes of this user that appeared after the snapshot count, so somebody else's Ray (or
the developer's own, started before) is never blamed, and nothing is killed.

`RunProcesses` follows the processes of one command run as a child (tests/test_clean_exit.py):
its descendants and whatever holds files in its Ray session directory, so that a test blames a
run only for its own processes, even while other test sessions start Rays on the same machine.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

MARKERS = ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard", "ray/autoscaler", "default_worker.py")


def _own_processes():
    """/proc entries of this user's processes (any may vanish while read: callers catch OSError)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == os.getuid():
                yield entry
        except OSError:
            continue


def ray_processes() -> dict[int, str]:
    found = {}
    for entry in _own_processes():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(marker in cmdline for marker in MARKERS):
            found[int(entry.name)] = cmdline[:160]
    return found


def process_table() -> dict[int, tuple[int, int]]:
    """This user's live processes (not zombies): PID -> (parent PID, start time in clock ticks)."""
    table = {}
    for entry in _own_processes():
        try:
            data = (entry / "stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] not in (b"Z", b"X"):
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


_SESSION_DIR = re.compile(r"--session[-_]dir=(\S+)")


class RunProcesses:
    """The processes of one child command (an `rdu run`): its descendants, as seen by `follow`
    while it lives, and any process of this user holding files in the Ray session directories
    named on their command lines (a raylet's children, reparented when it dies)."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.seen: dict[int, int] = {}   # PID -> start ticks
        self.command_lines: dict[int, str] = {}
        self.session_dirs: set[str] = set()

    def follow(self) -> set[int]:
        """Add the root's current descendants; returns them."""
        table = process_table()
        now: set[int] = set()
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _start) in table.items():
                if pid not in now and (ppid == self.root_pid or ppid in now):
                    now.add(pid)
                    grew = True
        for pid in now - set(self.seen):
            self.seen[pid] = table[pid][1]
            self.command_lines[pid] = command_line(pid)
            self.session_dirs.update(_SESSION_DIR.findall(self.command_lines[pid]))
        return now

    def commands(self) -> list[str]:
        """The command lines of every descendant seen (as first seen)."""
        return list(self.command_lines.values())

    def alive(self) -> dict[int, str]:
        """Those still alive (the same processes, not reused PIDs), with their command lines."""
        table = process_table()
        found = {pid for pid, start in self.seen.items() if table.get(pid, (0, -1))[1] == start}
        folders = tuple(folder.rstrip("/") + "/" for folder in self.session_dirs)
        for pid in set(table) - found - {os.getpid()} if folders else ():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folders) for fd in fds):
                    found.add(pid)
            except OSError:
                continue
        return {pid: command_line(pid)[:160] for pid in found}

    def wait_gone(self, timeout_s: float) -> dict[int, str]:
        """Wait up to `timeout_s` for all of them to be gone; returns those left."""
        deadline = time.monotonic() + timeout_s
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def main() -> int:
    action, path = sys.argv[1], Path(sys.argv[2])
    if action == "snapshot":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(str(pid) for pid in ray_processes()))
        return 0
    before = {int(line) for line in path.read_text().split()} if path.exists() else set()
    deadline = time.monotonic() + 20  # Ray's processes take a few seconds to exit after shutdown
    while True:
        new = {pid: cmd for pid, cmd in ray_processes().items() if pid not in before}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if new:
        print("processes left behind by the tests:", file=sys.stderr)
        for pid, cmd in sorted(new.items()):
            print(f"  {pid} {cmd}", file=sys.stderr)
        return 1
    print("no Ray or gRPC process left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
