"""Injected faults: what fails, and when, in virtual time.

    kill-socket:node0/socket3@request=500      the socket dies when request 500 arrives
    kill-socket:node0/socket3@virtual_ms=2000  ... or 2 s into the workload
    kill-node:node1@virtual_ms=2000            a whole node (its sockets and its DDR) is lost
    drop-link:node0/socket1-node0/socket2@p=0.01[,virtual_ms=T]
                                              messages between two sockets are lost with
                                              probability p (1 = the link is down) from time T

Faults fire at deterministic points, so a faulty run is as reproducible as a healthy one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rdu.base import UserError

__all__ = ["FaultSpec", "parse_fault", "parse_faults", "FAULT_KINDS", "RestartBudget"]

FAULT_KINDS = ("kill-socket", "kill-node", "drop-link")
MAX_VIRTUAL_MS = 1e12   # ~31 years of virtual time: far inside int64 ns
_SOCKET = r"node\d+/socket\d+"
_TARGETS = {"kill-socket": re.compile(rf"^{_SOCKET}$"), "kill-node": re.compile(r"^node\d+$"),
            "drop-link": re.compile(rf"^{_SOCKET}-{_SOCKET}$")}
_FORMAT = ("expected KIND:TARGET@WHEN, e.g. kill-socket:node0/socket3@request=500, "
           "kill-node:node1@virtual_ms=2000, drop-link:node0/socket1-node0/socket2@p=0.01")


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    target: str
    request: int | None = None        # fires when this request arrives
    virtual_ns: int | None = None     # ... or at this time after the workload starts
    probability: float | None = None  # drop-link: chance that a message is lost
    text: str = ""

    @property
    def link(self) -> tuple[str, str]:
        a, b = re.match(rf"^({_SOCKET})-({_SOCKET})$", self.target).groups()
        return a, b

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "request": self.request, "virtual_ns": self.virtual_ns,
                "probability": self.probability, "spec": self.text}


def parse_fault(text: str, where: str = "--fault") -> FaultSpec:
    def fail(message: str) -> None:
        raise UserError(f"{where} {text!r}: {message}")

    if not isinstance(text, str):
        raise UserError(f"{where}: expected a fault spec as text, got {text!r}")
    kind, sep, rest = text.partition(":")
    target, at, when = rest.partition("@")
    if not sep or not at or not target or not when:
        fail(_FORMAT)
    if kind not in FAULT_KINDS:
        fail(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
    if not _TARGETS[kind].match(target):
        expected = {"kill-socket": "a socket such as node0/socket3", "kill-node": "a node such as node1",
                    "drop-link": "two sockets such as node0/socket1-node0/socket2"}[kind]
        fail(f"target {target!r} is not {expected}")
    fields: dict[str, str] = {}
    for part in when.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            fail(f"{part!r} is not KEY=VALUE")
        fields[key.strip()] = value.strip()
    allowed = {"kill-socket": {"request", "virtual_ms"}, "kill-node": {"request", "virtual_ms"},
               "drop-link": {"p", "virtual_ms"}}[kind]
    unknown = set(fields) - allowed
    if unknown:
        fail(f"unknown trigger {sorted(unknown)[0]!r}; {kind} takes {', '.join(sorted(allowed))}")
    request = virtual_ns = probability = None
    try:
        if "request" in fields:
            request = int(fields["request"])
            if request < 0:
                fail("request must be >= 0")
        if "virtual_ms" in fields:
            virtual_ms = float(fields["virtual_ms"])
            if not 0.0 <= virtual_ms <= MAX_VIRTUAL_MS:
                fail(f"virtual_ms must be between 0 and {MAX_VIRTUAL_MS:g} (the emulator's clock), got "
                     f"{fields['virtual_ms']}")
            virtual_ns = int(round(virtual_ms * 1e6))
        if "p" in fields:
            probability = float(fields["p"])
            if not 0.0 < probability <= 1.0:
                fail("p must be in (0, 1]")
    except ValueError:
        fail("trigger values must be numbers")
    if kind == "drop-link":
        a, _, b = target.partition("-node")
        if a == "node" + b:
            fail("a link joins two different sockets")
        if probability is None:
            fail("drop-link needs p=PROBABILITY")
        virtual_ns = virtual_ns or 0
    elif (request is None) == (virtual_ns is None):
        fail("give exactly one of request=N or virtual_ms=T")
    return FaultSpec(kind, target, request, virtual_ns, probability, text)


def parse_faults(texts, where: str = "faults") -> tuple[FaultSpec, ...]:
    if texts is None:
        return ()
    if not isinstance(texts, (list, tuple)):
        raise UserError(f"{where}: expected a list of fault specs, got {texts!r}")
    return tuple(parse_fault(t, where) for t in texts)


class RestartBudget:
    """How many times each socket was killed; one kill more than the platform's
    `socket.max_restarts` stops the run (both engines, both backends)."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.kills: dict[str, int] = {}

    def spend(self, socket: str, now: int) -> None:
        """Count a kill of `socket` at `now`; raises ServingStopped past the limit."""
        from rdu.scheduler.serving_types import ServingStopped

        self.kills[socket] = self.kills.get(socket, 0) + 1
        if self.kills[socket] > self.max_restarts:
            raise ServingStopped(f"{socket} failed at {now} ns (kill {self.kills[socket]} of this socket), more than "
                                 f"the {self.max_restarts} restarts the platform allows (socket.max_restarts)", None)
