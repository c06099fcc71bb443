"""Did the test run leave Ray or gRPC processes of ours behind?

    python tests/leftovers.py snapshot FILE   # before the tests: remember what already runs
    python tests/leftovers.py check FILE      # after: fail if a new Ray process is still alive

Only processes of this user that appeared after the snapshot count, so somebody else's Ray (or
the developer's own, started before) is never blamed, and nothing is killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

MARKERS = ("raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard", "ray/autoscaler", "default_worker.py")


def ray_processes() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(marker in cmdline for marker in MARKERS):
            found[int(entry.name)] = cmdline[:160]
    return found


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
