"""Bad input fuzzed rather than listed: every generated input either works or is refused with one
line and exit code 2 — never a traceback, a hang, a negative or non-finite time, or a change to
files the tool did not make. `make test` runs a few dozen examples per target; `make test-scale`
runs many more (HYPOTHESIS_PROFILE=scale)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdu.node.cli.main import main
from rdu.node.cluster.platform import load_platform
from rdu.scheduler.timeline import EVENT_TYPES, Setup

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("scale", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

MODELS = Path(__file__).resolve().parent.parent / "socket_actor" / "models"


def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


PLATFORM_FIELDS = sorted(k for k, v in _flat(load_platform("sn40l-node").values)
                         if isinstance(v, (int, float, str)) and not isinstance(v, bool))

numbers = st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 1e-300, 1e300, 2**63, 2**64, 0.5, 1e25]))
scalars = st.one_of(numbers, st.text(max_size=12), st.booleans(), st.none())


def rdu(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(code: int, out: str, err: str) -> None:
    """Exit 0, exit 1 for a run the emulated cluster could not finish (a dead link, a socket past
    its restart limit: results kept), or exit 2 with exactly one `rdu: error:` line on stderr."""
    assert "Traceback" not in out + err
    assert code in (0, 2) or (code == 1 and "rdu: run stopped" in err), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rdu: error:"), err


def assert_times_sane(data: object) -> None:
    """Every `*_ns` number in a JSON result is finite and not negative."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key.endswith("_ns") and isinstance(value, (int, float)):
                assert math.isfinite(value) and value >= 0, (key, value)
            assert_times_sane(value)
    elif isinstance(data, list):
        for value in data:
            assert_times_sane(value)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@given(field=st.sampled_from(PLATFORM_FIELDS), value=scalars)
def test_platform_overrides(capsys, field, value):
    code, out, err = rdu(capsys, ["estimate", "--set", f"{field}={json.dumps(value)}", "--json"])
    assert_clean(code, out, err)
    if code == 0:
        assert_times_sane(json.loads(out))


@given(prompt=st.integers(1, 10**9), output=st.integers(1, 10**6), batch=st.integers(1, 10**6),
       tp=st.sampled_from([1, 2, 3, 4, 8, 16, 64]))
def test_estimate_shapes(capsys, prompt, output, batch, tp):
    code, out, err = rdu(capsys, ["estimate", "--prompt", str(prompt), "--output", str(output), "--batch", str(batch),
                                  "--tp", str(tp), "--json"])
    assert_clean(code, out, err)
    if code == 0:
        assert_times_sane(json.loads(out))


@given(field=st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "intermediate_size", "vocab_size", "max_position_embeddings", "model_type",
                              "torch_dtype", "tie_word_embeddings", "sliding_window"]),
       value=scalars)
def test_model_configs(capsys, tmp_path_factory, field, value):
    config = json.loads((MODELS / "llama-2-7b.json").read_text())
    config[field] = value
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(config))
    code, out, err = rdu(capsys, ["estimate", "--model", str(path), "--json"])
    assert_clean(code, out, err)
    if code == 0:
        assert_times_sane(json.loads(out))


trace_rows = st.lists(st.tuples(st.one_of(st.just("2023-11-16 18:15:46.6805900"), st.text(max_size=30)),
                                st.one_of(st.integers(-5, 20_000).map(str), st.text(max_size=8)),
                                st.one_of(st.integers(-5, 3_000).map(str), st.text(max_size=8))),
                      min_size=0, max_size=8)


@given(rows=trace_rows, header=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_traces(capsys, tmp_path_factory, rows, header, encoding):
    folder = tmp_path_factory.mktemp("trace")
    lines = (["TIMESTAMP,ContextTokens,GeneratedTokens"] if header else []) + [",".join(r) for r in rows]
    try:
        (folder / "t.csv").write_bytes(("\n".join(lines) + "\n").encode(encoding))
    except UnicodeEncodeError:
        return
    code, out, err = rdu(capsys, ["run", "--backend", "inline", "--experts", "3", "--trace", str(folder / "t.csv"),
                                  "--out", str(folder / "run"), "--json"])
    assert_clean(code, out, err)
    if code == 0:
        assert_times_sane(json.loads(out)["summary"])


@given(spec=st.one_of(st.text(max_size=40),
                      st.builds(lambda kind, target, when: f"{kind}:{target}@{when}",
                                st.sampled_from(["kill-socket", "kill-node", "drop-link", "melt"]),
                                st.sampled_from(["node0/socket3", "node0", "node1", "node0/socket1-node0/socket2",
                                                 "node0/socket1-node0/socket1", "node9/socket0", ""]),
                                st.sampled_from(["request=3", "request=-1", "request=99999", "virtual_ms=5",
                                                 "virtual_ms=1e30", "p=0.5", "p=2", "p=nan", "x=1", ""]))))
def test_fault_specs(capsys, tmp_path_factory, spec):
    folder = tmp_path_factory.mktemp("fault")
    code, out, err = rdu(capsys, ["run", "--backend", "inline", "--experts", "5", "--limit", "12", "--fault", spec,
                                  "--out", str(folder / "run"), "--json"])
    assert_clean(code, out, err)
    if code == 0:   # whatever the fault, every request once (requests.csv, not the summary's counters)
        from tests.helpers import assert_each_request_once

        assert_each_request_once(folder / "run")


run_fields = st.fixed_dictionaries({}, optional={
    "nodes": scalars, "tp": scalars, "experts": st.one_of(st.integers(-2, 40), scalars), "seed": scalars,
    "platform": st.one_of(st.sampled_from(["sn40l-node", "dgx-h100"]), st.text(max_size=10)),
    "scheduler": st.one_of(scalars, st.fixed_dictionaries({}, optional={
        "policy": st.one_of(st.sampled_from(["lru", "lfu", "belady", "prefetch"]), scalars),
        "max_batch": scalars, "dispatch": scalars, "pinned_experts": st.lists(scalars, max_size=3)})),
    "workload": st.one_of(scalars, st.fixed_dictionaries({"kind": st.sampled_from(["trace", "synthetic",
                                                                                   "paper-coe", "zzz"])},
                                                         optional={"limit": st.integers(-1, 30), "requests":
                                                                   st.integers(-1, 30), "rate_per_s": numbers,
                                                                   "time_scale": numbers, "batch": scalars,
                                                                   "prompt_tokens": scalars})),
    "name": st.text(max_size=12), "bogus": scalars,
})


@given(fields=run_fields)
def test_run_configs(capsys, tmp_path_factory, fields):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "mine.txt").write_text("keep me")
    (folder / "run.yaml").write_text(yaml.safe_dump(fields))
    before = _snapshot(folder)
    code, out, err = rdu(capsys, ["run", str(folder / "run.yaml"), "--backend", "inline", "--limit", "10",
                                  "--out", str(folder / "out"), "--json"])
    assert_clean(code, out, err)
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    if code == 0:
        assert_times_sane(json.loads(out)["summary"])


packable = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                     st.none())
garbage = st.dictionaries(st.sampled_from(["type", "t_ns", "group", "model", "end_ns", "requests", "groups"]),
                          st.one_of(st.sampled_from(["setup", "run", "switch", "done", "router", "group0"]), packable,
                                    st.lists(st.integers(0, 5), max_size=3)), max_size=6)

# Records of the timeline's own vocabulary (scheduler/timeline.py), each field drawn by its type
# (times near the ends of int64 too), names from a small cluster so that they meet, and now and
# then a field that is not of its type: the observers must draw them or refuse them in one line.
_times = st.one_of(st.integers(0, 10**12), st.sampled_from([0, 1, 2**62, 2**63 - 1]))
_members = st.sampled_from(["node0/socket0", "node0/socket1", "node1/socket0", "node1/socket1", "node0/socket9",
                            "socket"])
_BY_NAME = {
    "group": st.sampled_from(["group0", "group1", "group7"]), "model": st.sampled_from(["router", "expert0001"]),
    "kind": st.sampled_from(["kill-socket", "kill-node", "drop-link"]), "target": _members,
    "capacity_tier_name": st.sampled_from(["ddr", "host_dram"]), "p2p_topology": st.sampled_from(["ring", "switch"]),
    "nodes": st.sampled_from([2] * 8 + [0, 3]), "sockets_per_node": st.sampled_from([2] * 8 + [1, 10**9]),
    "tp": st.integers(1, 2),
    "members": st.lists(_members, max_size=3), "arrivals": st.dictionaries(_members, _times, max_size=3),
    "victims": st.lists(st.sampled_from(["router", "expert0001"]), max_size=2),
    "models": st.lists(st.sampled_from(["router", "expert0001"]), max_size=2),
    "groups": st.lists(st.sampled_from(["group0", "group1"]), max_size=2),
    "detail": st.dictionaries(st.text(max_size=4), packable, max_size=2), "summary": st.just({}),
}
_LAYOUTS = st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["group0", "group1"]), "node": st.integers(0, 1),
    "members": st.tuples(st.sampled_from([["node0/socket0", "node0/socket1"], ["node1/socket0", "node1/socket1"],
                                          ["node0/socket0"]]), st.lists(_members, min_size=1, max_size=2),
                         st.integers(0, 5)).map(lambda t: t[1] if t[2] == 0 else t[0])}),
    min_size=1, max_size=2)


def _field(name: str, hint) -> st.SearchStrategy:
    if "GroupLayout" in str(hint):
        return _LAYOUTS
    if name in _BY_NAME:
        return _BY_NAME[name]
    if hint is bool:
        return st.booleans()
    if hint is str:
        return st.text(max_size=6)
    if hint is int:
        return _times
    return st.lists(st.one_of(st.integers(0, 5), _times), max_size=3)   # list[int]: requests, tier use


def _record(cls) -> st.SearchStrategy:
    """A record of `cls`, mostly well typed; one in eight has one field replaced by anything."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    typed_record = st.fixed_dictionaries({"type": st.just(cls.type), **{n: _field(n, hints[n]) for n in names}})
    spoilt = st.tuples(typed_record, st.sampled_from(names), packable).map(lambda t: {**t[0], t[1]: t[2]})
    return st.tuples(typed_record, spoilt, st.integers(0, 7)).map(lambda t: t[1] if t[2] == 0 else t[0])


typed = st.one_of(*(_record(cls) for cls in EVENT_TYPES.values() if cls is not Setup))
events = st.builds(lambda setup, first, rest: [setup, *rest] if first else rest, _record(Setup),
                   st.integers(0, 3).map(bool),   # most streams start with their setup
                   st.lists(st.one_of(typed, typed, typed, garbage), max_size=12))


def _views_of(capsys, folder, stream, command: list[str]) -> None:
    """`rdu COMMAND` on a run directory holding `stream`: drawn, or refused in one line; nothing
    written but what the command makes."""
    with (folder / "events.msgpack").open("wb") as handle:
        for event in stream:
            handle.write(msgpack.packb(event))
    code, out, err = rdu(capsys, [command[0], str(folder), *command[1:]])
    assert_clean(code, out, err)
    assert sorted(p.name for p in folder.iterdir() if p.name != "plots") in (["events.msgpack"],
                                                                             ["events.msgpack", "trace.json"])


@pytest.mark.parametrize("command", [["trace"], ["dash", "--speed", "1e15"]])
@given(stream=events)
def test_event_streams(capsys, tmp_path_factory, command, stream):
    _views_of(capsys, tmp_path_factory.mktemp("events"), stream, command)


@settings(max_examples=max(5, settings.default.max_examples // 5))   # three PNGs an example: fewer
@given(stream=events)
def test_event_streams_plotted(capsys, tmp_path_factory, stream):
    _views_of(capsys, tmp_path_factory.mktemp("events"), stream, ["plot"])
