"""Small builders shared by tests (no Ray)."""

from __future__ import annotations

import contextlib

from rdu.interconnect.topology import Topology
from rdu.node.cluster.layout import nodes_for_tp, tp_groups
from rdu.node.cluster.platform import load_platform
from rdu.socket_actor.model_spec import load_model


def group_for(platform: str, tp: int, overrides: dict | None = None):
    spec = load_platform(platform, overrides).spec
    topology = Topology(spec.links, nodes_for_tp(spec, tp), spec.sockets_per_node)
    return tp_groups(spec, topology, tp)[0]


def cost_model(platform: str, model: str, tp: int, mode=None, orchestration=None):
    return group_for(platform, tp).cost_model(load_model(model), mode, orchestration)


@contextlib.contextmanager
def events_as_made(observe):
    """Within it, `observe(event)` sees each timeline event when an in-process engine makes it
    (engines pack their timeline in a `TimelineBuffer`; a run's sinks get it a round later, when
    the sockets' ledgers have moved on)."""
    from rdu.scheduler.timeline import TimelineBuffer

    packs = TimelineBuffer.__call__

    def made(buffer, event):
        packs(buffer, event)
        observe(event)
    TimelineBuffer.__call__ = made
    try:
        yield
    finally:
        TimelineBuffer.__call__ = packs


def wait_until_serving(process, folder, timeout_s: float = 120.0, min_bytes: int = 5_000) -> None:
    """Wait until the `rdu run` child `process` is serving: its hidden run folder under `folder`
    has a requests.csv of at least `min_bytes` (so a signal lands mid-run, not during start-up)."""
    import glob
    import os
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        partial = glob.glob(os.path.join(str(folder), ".*.partial-*", "requests.csv"))
        if partial and os.path.getsize(partial[0]) > min_bytes:
            return
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.2)
    raise AssertionError(f"the run did not start serving within {timeout_s:.0f} s")


def assert_each_request_once(run_dir) -> dict:
    """A completed run's requests.csv holds every request of the workload exactly once (ids 0 ..
    requests_in - 1), each finishing after it arrived, with its own times agreeing; and the
    engine served none twice (a second record never reaches the file: the counter says). The
    summary's `requests_lost` is no evidence of anything: a run that lost one raises instead of
    writing it. Returns the summary."""
    import csv
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "requests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(row["id"]) for row in rows) == list(range(summary["requests_in"])), \
        "a request lost, served twice or unknown"
    for row in rows:
        arrival_ns, finish_ns, e2e_ns = int(row["arrival_ns"]), int(row["finish_ns"]), int(row["e2e_ns"])
        assert finish_ns > arrival_ns and e2e_ns == finish_ns - arrival_ns and 0 < int(row["ttft_ns"]) <= e2e_ns, row
    assert summary["requests_duplicated"] == 0
    return summary
