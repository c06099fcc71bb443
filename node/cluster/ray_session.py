"""Starting, joining and leaving Ray: one place that knows how this project uses it.

`local` (the default) starts a private in-process Ray sized for the run and shuts it down
afterwards; an address (`auto`, `host:port`, `ray://...`) joins an existing cluster whose nodes
advertise `rdu_socket` resources. When Ray is already up (e.g. a test session's), it is reused
and left running for its owner.

A local Ray gets a watchdog (`RayWatchdog`, Linux): a small process of ours that outlives the
driver and ends, by PID, the Ray processes this session started once the driver is gone, however
it went. Ray already fate-shares its direct children with the driver (PR_SET_PDEATHSIG), but not
the raylet's children: after a `kill -9` of the driver its agents lived on for about a minute
(each blocks 60 s publishing "raylet died" to the dead GCS) and its workers for a few seconds.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rdu.base import UserError

__all__ = ["ray_session", "RaySessionInfo", "socket_capacity", "RayWatchdog"]

SOCKET_RESOURCE = "rdu_socket"


@dataclass
class RaySessionInfo:
    started_here: bool
    address: str
    ray_nodes: int
    multi_host: bool     # sockets may sit on other machines: bind gRPC to the node IP

    @property
    def bind_host(self) -> str:
        """Where socket servers listen: loopback unless sockets sit on several machines."""
        return "node-ip" if self.multi_host else "127.0.0.1"

    def run_token(self) -> str:
        """A fresh secret for this run's interconnect (every call must carry it): on a cluster and
        on one machine alike, since any local process can reach a loopback port."""
        return secrets.token_hex(16)


def socket_capacity() -> int:
    import ray

    return int(ray.cluster_resources().get(SOCKET_RESOURCE, 0))


def _signal_handlers() -> dict:
    """The SIGINT/SIGTERM handlers in force (Ray's start-up replaces them with its own)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` that nobody answers on is a one-line error within `timeout_s`, not an
    endless retry inside Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or address.startswith("ray://") or address == "auto" or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------------------------
# The watchdog: its own process, so that it outlives a driver killed with SIGKILL.

_WATCHDOG_MODULE = "rdu.node.cluster.ray_session"
_WATCH_POLL_S = 0.5        # how often the watchdog refreshes its list while the driver lives
_REAP_SETTLE_S = 10.0      # a reap gives up on processes still there after this long (normally ~0.1 s)
_SESSION_DIR_ARG = re.compile(r"--session[-_]dir=(\S+)")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks since boot) of a live process of this user; None
    when it is gone, a zombie or another user's."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def _process_table() -> dict[int, tuple[int, int]]:
    """Every live process of this user: PID -> (parent PID, start ticks)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (entry := _stat(int(name))) is not None:
            table[int(name)] = entry
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _holds_file_under(pid: int, folders: tuple[str, ...]) -> bool:
    """Does `pid` hold a file open under one of `folders` (this session's Ray directory)?"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folders):
                return True
        except OSError:
            continue
    return False


def _kill_if_same(pid: int, start_ticks: int) -> bool:
    """SIGKILL `pid` only if it is still the process that started at `start_ticks` (a pidfd pins
    the process between the check and the signal, so a reused PID is never hit)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        entry = _stat(pid)
        if entry is None or entry[1] != start_ticks:
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


class _SessionProcesses:
    """The Ray processes one driver started, as its watchdog knows them: the driver's children
    that run a program from Ray's package (GCS, raylet, monitors) and were not running when the
    watchdog started, and all their descendants (workers, agents), each with its start time.
    Nothing else: not a Ray the driver joined, not another session's, not another user's."""

    def __init__(self, driver_pid: int, ray_dir: str) -> None:
        self.driver_pid = driver_pid
        self.ray_dir = ray_dir
        self.own_pid = os.getpid()
        # what ran before the watchdog is never a member (PID and start time: a PID reused later
        # is a new process)
        self.before = {(pid, start) for pid, (_ppid, start) in _process_table().items()}
        self.members: dict[int, int] = {}     # PID -> start ticks
        self.session_dirs: set[str] = set()   # from the GCS's and raylet's command lines

    def _candidate(self, pid: int, start: int) -> bool:
        """Not yet a member, not the watchdog or the driver, and not running before the watchdog."""
        return (pid not in self.members and pid not in (self.own_pid, self.driver_pid)
                and (pid, start) not in self.before)

    def refresh(self) -> None:
        """Forget members that are gone; add new Ray children of the driver and of members."""
        table = _process_table()
        self.members = {pid: start for pid, start in self.members.items() if table.get(pid, (0, -1))[1] == start}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, start) in table.items():
                if not self._candidate(pid, start):
                    continue
                if ppid in self.members or (ppid == self.driver_pid and self.ray_dir in _cmdline(pid)):
                    self.members[pid] = start
                    self.session_dirs.update(_SESSION_DIR_ARG.findall(_cmdline(pid)))
                    grew = True

    def sweep(self) -> None:
        """Add processes holding files in this session's directory: a raylet's children that its
        death reparented before a refresh saw them."""
        if not self.session_dirs:
            return
        folders = tuple(folder.rstrip("/") + "/" for folder in self.session_dirs)
        for pid, (_ppid, start) in _process_table().items():
            if self._candidate(pid, start) and _holds_file_under(pid, folders):
                self.members[pid] = start

    def reap(self) -> int:
        """SIGKILL every member still alive, until none is left (or `_REAP_SETTLE_S`); returns
        how many were killed. Known members go first; the sweep (every process's open files: the
        costly part on a busy machine) only adds stragglers."""
        killed: set[int] = set()
        deadline = time.monotonic() + _REAP_SETTLE_S
        self.refresh()
        self._kill_members(killed)
        self.sweep()
        while True:
            self.refresh()
            if not self.members or time.monotonic() > deadline:
                return len(killed)
            self._kill_members(killed)
            time.sleep(0.05)

    def _kill_members(self, killed: set[int]) -> None:
        for pid, start in list(self.members.items()):
            if _kill_if_same(pid, start):
                killed.add(pid)


def _watch(driver_pid: int, ray_dir: str) -> int:
    """The watchdog's life: follow the session's processes while the driver lives; when the
    driver closes the pipe or dies (end of file on stdin, or a new parent), kill what is left."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)   # a terminal's Ctrl-C or hang-up is the driver's
    session = _SessionProcesses(driver_pid, ray_dir)
    session.refresh()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while os.getppid() == driver_pid:
        readable, _, _ = select.select([sys.stdin], [], [], _WATCH_POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
        session.refresh()
    session.reap()
    return 0


class RayWatchdog:
    """The driver's end of a watchdog (Linux): a process of ours, in its own session, that knows
    the Ray processes this driver starts after it (and only those) and ends them by PID when the
    driver closes its pipe (`close`) or dies, even by SIGKILL. Start it before `ray.init`, so
    that an interrupted start-up is covered too."""

    def __init__(self, process: subprocess.Popen) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    def start(cls, ray_dir: str | None = None, ready_timeout_s: float = 60.0) -> RayWatchdog | None:
        """A watchdog following this process, or None where there is none (not Linux, or it did
        not come up: it is ready within a fraction of a second, unless the machine is swamped):
        a run never fails for want of one. `ray_dir`: where the programs of Ray that this process
        starts live (default: the installed Ray package)."""
        if not sys.platform.startswith("linux") or not sys.executable:
            return None
        if ray_dir is None:
            import ray

            ray_dir = os.path.abspath(os.path.dirname(ray.__file__))   # as Ray names its programs
        try:
            # its own session: a terminal's Ctrl-C or hang-up is for the driver; no inherited
            # stream or folder, so it never holds a terminal, a pipe or a mount open
            process = subprocess.Popen([sys.executable, "-m", _WATCHDOG_MODULE, "--watch", str(os.getpid()), ray_dir],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       cwd="/", start_new_session=True)
        except OSError:
            return None
        ready, _, _ = select.select([process.stdout], [], [], ready_timeout_s)
        if not ready or process.stdout.readline() != b"ready\n":
            process.kill()
            process.wait()
            return None
        process.stdout.close()
        return cls(process)

    def close(self, timeout_s: float = _REAP_SETTLE_S + 5.0) -> None:
        """The session is over: the watchdog kills what is left of it, and exits. Waits for that
        up to `timeout_s`; past it, the watchdog finishes on its own (never killed half-way)."""
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def ray_session(address: str | None, sockets_needed: int, object_store_bytes: int = 1 << 30) -> Iterator[RaySessionInfo]:
    """Ray for a run of `sockets_needed` socket actors; shuts down only what it started, and
    (local Ray) leaves none of it behind, even when the driver is killed.
    (The package sets Ray's environment defaults on import: see node/__init__.py.)"""
    import ray

    started = False
    watchdog: RayWatchdog | None = None
    if not ray.is_initialized():
        handlers = _signal_handlers()
        try:
            if address in (None, "", "local"):
                watchdog = RayWatchdog.start()
                ray.init(num_cpus=os.cpu_count() or 2, resources={SOCKET_RESOURCE: sockets_needed},
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                         object_store_memory=object_store_bytes)
            else:
                _check_reachable(address)
                try:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise UserError(f"--address {address}: cannot join a Ray cluster ({exc})") from exc
            started = True
        except BaseException:
            try:
                if ray.is_initialized():  # interrupted half-way through start-up: stop what started
                    ray.shutdown()
            finally:
                if watchdog is not None:  # and what a half-started Ray left, connected or not
                    watchdog.close()
            raise
        finally:
            _restore_signal_handlers(handlers)
    try:
        capacity = socket_capacity()
        if capacity < sockets_needed:
            raise UserError(f"the Ray cluster advertises {capacity} '{SOCKET_RESOURCE}' resources but the run "
                            f"needs {sockets_needed} socket actors")
        hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        yield RaySessionInfo(started_here=started, address=address or "local",
                             ray_nodes=sum(1 for n in ray.nodes() if n.get("Alive")), multi_host=len(hosts) > 1)
    finally:
        try:
            if started:
                ray.shutdown()
        finally:
            if watchdog is not None:
                watchdog.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    sys.exit(_watch(int(sys.argv[2]), sys.argv[3]))
