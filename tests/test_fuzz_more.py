"""More bad input fuzzed rather than listed (issue 15): (a) gRPC messages sent to a live
InterconnectServer — random headers, shapes, dtypes, chunk orders, tokens, credentials,
truncated and malformed bytes — each get a proper status (never UNKNOWN or INTERNAL) and the
server keeps serving a valid tensor afterwards; (b) random sweep studies either run (exit 0) or
are refused with one `rdu: error:` line (exit 2), never a traceback, and nothing outside the
study folder changes. `make test` runs 25 examples per target; HYPOTHESIS_PROFILE=scale 400."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rdu.interconnect.grpc_plane import SERVICE_NAME, InterconnectServer
from rdu.interconnect.plane_auth import call_metadata, sender_credential
from rdu.interconnect.wire import chunk_tensor
from rdu.node.cli.main import main
from rdu.protos import interconnect_pb2 as pb

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("scale", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SECRET = "fuzz-more-secret"
ME, PEER, OTHER = "node0/socket0", "node0/socket1", "node0/socket2"
# The statuses a refusal may carry; UNKNOWN (an exception gRPC did not expect) and INTERNAL (one the
# server did not classify) are bugs.
PROPER = {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}


# -- (a) gRPC messages to a live server --------------------------------------------------------------

class _LiveServer:
    """One InterconnectServer on its own event loop thread for the whole module, so that every
    example talks to the same process-lifetime server (a crash or a wedged loop shows up in the
    examples that follow, as it would in a run)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = InterconnectServer(ME, members=[ME, PEER, OTHER], run_token=SECRET)
        self.address = self.call(self.server.start())
        self.channel = grpc.insecure_channel(self.address)
        self.transfer = self.channel.stream_stream(f"/{SERVICE_NAME}/Transfer", request_serializer=None,
                                                   response_deserializer=pb.Ack.FromString)
        self.health = self.channel.unary_unary(f"/{SERVICE_NAME}/Health", request_serializer=None,
                                               response_deserializer=pb.HealthReply.FromString)
        self.ids = itertools.count()

    def call(self, coro, timeout_s: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def send(self, raw_chunks: list[bytes], metadata) -> tuple[str, list]:
        """The status name of one Transfer stream of raw chunk bytes, and its acks."""
        acks = []
        try:
            for ack in self.transfer(iter(raw_chunks), timeout=10, metadata=metadata):
                acks.append(ack)
            return "OK", acks
        except grpc.RpcError as exc:
            return exc.code().name, acks

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live():
    server = _LiveServer()
    yield server
    server.close()


def _valid(tensor_id: str, values: np.ndarray | None = None) -> list[bytes]:
    header = pb.TensorHeader(tensor_id=tensor_id, src=PEER, dst=ME, want_ack=True)
    return [c.SerializeToString() for c in chunk_tensor(header, np.arange(6, dtype=np.float32)
                                                        if values is None else values)]


def _still_serving(live: _LiveServer) -> None:
    """A valid tensor from a member is acked and delivered intact, and Health answers."""
    tensor_id = f"check-{next(live.ids)}"
    values = np.arange(5, dtype=np.int32) * 3
    code, acks = live.send(_valid(tensor_id, values), call_metadata(SECRET, PEER))
    assert code == "OK" and [a.tensor_id for a in acks] == [tensor_id], code
    received = live.call(live.server.mailbox.take(tensor_id, 5))
    assert received.array.tolist() == values.tolist()
    reply = live.health(pb.HealthRequest().SerializeToString(), timeout=5, metadata=call_metadata(SECRET, PEER))
    assert reply.socket == ME


names = st.one_of(st.sampled_from([ME, PEER, OTHER, "node9/socket9", "", "node0/socket01", "../x"]),
                  st.text(max_size=12))
big_ints = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, -1, 4, 24, 1 << 30, 1 << 31, 2**62]))
headers = st.builds(
    dict,
    tensor_id=st.one_of(st.text(max_size=16), st.just("dup")),
    src=names, dst=names,
    dtype=st.sampled_from(["float32", "float16", "int32", "int64", "uint8", "bfloat16", "object", "complex128",
                           "<f4", "", "float32 ", "V8"]),
    shape=st.lists(st.one_of(st.integers(-4, 8), big_ints), max_size=6),
    total_bytes=st.one_of(st.integers(-8, 64), big_ints),
    virtual_send_ns=big_ints, virtual_arrival_ns=big_ints,
    run_token=st.sampled_from(["", SECRET, "guess", SECRET + "x"]),
    want_ack=st.booleans(),
)
chunk_specs = st.lists(st.tuples(st.integers(-2, 5), st.binary(max_size=48), st.booleans(), st.booleans()),
                       min_size=1, max_size=5)   # (seq, data, last, carries the header)
credentials = st.sampled_from(["member", "none", "wrong secret", "other member's proof", "not a member",
                               "garbage"])
mutations = st.one_of(st.none(), st.tuples(st.integers(0, 4), st.integers(0, 64)),   # truncate chunk i at n
                      st.tuples(st.integers(0, 4), st.binary(min_size=1, max_size=24)))  # replace chunk i


def _metadata(kind: str):
    return {"member": call_metadata(SECRET, PEER), "none": None, "wrong secret": call_metadata("nope", PEER),
            "other member's proof": (("rdu-sender", PEER), ("rdu-auth", sender_credential(SECRET, OTHER))),
            "not a member": call_metadata(SECRET, "node9/socket9"),
            "garbage": (("rdu-sender", "? ?"), ("rdu-auth", "zz"))}[kind]


def _chunks(header: dict, specs, mutation) -> list[bytes]:
    raw = []
    for seq, data, last, with_header in specs:
        chunk = pb.TensorChunk(seq=seq, data=data, last=last)
        if with_header:
            chunk.header.CopyFrom(pb.TensorHeader(**header))
        raw.append(chunk.SerializeToString())
    if mutation is not None:
        index, change = mutation
        index %= len(raw)
        raw[index] = raw[index][:change] if isinstance(change, int) else change
    return raw


@given(header=headers, specs=chunk_specs, credential=credentials, mutation=mutations)
def test_any_transfer_gets_a_proper_status_and_the_server_keeps_serving(live, header, specs, credential, mutation):
    code, acks = live.send(_chunks(header, specs, mutation), _metadata(credential))
    assert code in PROPER, code
    if credential not in ("member", "none"):
        assert code == "PERMISSION_DENIED", (code, credential)   # a bad credential is refused before parsing
    elif credential == "none" and header["run_token"] != SECRET:
        # the token is in the header: bytes that are no chunk can only be INVALID_ARGUMENT, but nothing gets in
        assert code in ("PERMISSION_DENIED", "INVALID_ARGUMENT") and not acks, code
    _still_serving(live)


@given(credential=credentials, body=st.one_of(st.just(b""), st.binary(max_size=32)))
def test_health_and_stats_answer_or_refuse_properly(live, credential, body):
    for method, reply_type in (("Health", pb.HealthReply), ("Stats", pb.StatsReply)):
        call = live.channel.unary_unary(f"/{SERVICE_NAME}/{method}", request_serializer=None,
                                        response_deserializer=reply_type.FromString)
        try:
            call(body, timeout=5, metadata=_metadata(credential))
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        assert code in PROPER, (method, code)
        assert (code == "OK") == (credential == "member") or code == "INVALID_ARGUMENT", (method, code, credential)
    _still_serving(live)


# -- (b) sweep studies --------------------------------------------------------------------------------

def _snapshot(folder: Path, skip: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and skip not in p.parents}


values = st.one_of(st.integers(-2, 40), st.sampled_from([0, 1, 2, 4, 8, 1e30, -1.5, 2**63, "lru", "x", None,
                                                        True, "sn40l-node", "dgx-h100", "nope"]),
                   st.text(max_size=6))
# hostile values for the axes below ("experts" has its own bound test further down)
axis_fields = st.sampled_from(["tp", "nodes", "platform", "scheduler.policy", "scheduler.max_batch",
                               "workload.rate_per_s", "workload.requests", "seed", "expertz", "workload.kind",
                               "", "backend"])
axes = st.one_of(
    st.fixed_dictionaries({"field": axis_fields, "values": st.lists(values, min_size=0, max_size=3)}),
    st.fixed_dictionaries({"name": st.sampled_from(["load", "mix", "", "experts"]),
                           "variants": st.dictionaries(st.sampled_from(["a", "b", "p a", "p-a", ""]),
                                                       st.one_of(st.dictionaries(
                                                           st.sampled_from(["experts", "tp", "scale_by", "seed"]),
                                                           values, max_size=2), values), max_size=2)}),
    values)
GOOD_AXES = {"experts": st.integers(1, 12), "scheduler.policy": st.sampled_from(["lru", "lfu", "fifo"]),
             "scheduler.max_batch": st.integers(1, 8), "seed": st.integers(0, 3),
             "workload.rate_per_s": st.sampled_from([1, 5, 50.5]), "workload.requests": st.integers(1, 10)}
good_axes = st.sampled_from(sorted(GOOD_AXES)).flatmap(
    lambda field: st.fixed_dictionaries({"field": st.just(field),
                                         "values": st.lists(GOOD_AXES[field], min_size=1, max_size=3, unique=True)}))
Y_METRICS = st.sampled_from(["e2e_ns.p50", "ttft_ns.p99", "hbm_hit_rate", "switch_time_share", "nonsense", ""])


@st.composite
def studies(draw) -> dict:
    """A tiny study: mostly axes that run, sometimes hostile ones; plots over its own axes by
    name (a plot over anything else is refused before any point runs: see the test below)."""
    base = {"workload": {"kind": "synthetic", "requests": draw(st.integers(1, 10)),
                         "rate_per_s": draw(st.sampled_from([1, 5, 50]))},
            "experts": draw(st.integers(1, 12)), "backend": "inline"}
    study_axes = draw(st.one_of(st.lists(good_axes, min_size=1, max_size=2, unique_by=lambda a: a["field"]),
                                st.lists(good_axes, min_size=1, max_size=2, unique_by=lambda a: a["field"]),
                                st.lists(st.one_of(good_axes, axes), min_size=0, max_size=2)))
    study: dict = {"base": base, "axes": study_axes}
    xs = [a["field"].rsplit(".", 1)[-1] for a in study_axes if isinstance(a, dict) and isinstance(a.get("field"), str)]
    if xs and draw(st.booleans()):
        plot = {"x": draw(st.sampled_from(xs)), "y": draw(Y_METRICS)}
        others = [x for x in xs if x != plot["x"]]   # two axes may end in the same name
        if others and draw(st.booleans()):
            plot["series"] = others[0]
        study["plots"] = [plot]
    if draw(st.booleans()):
        study["name"] = draw(st.one_of(st.text(max_size=8), st.sampled_from(["../escape", "", "a/b"])))
    if draw(st.booleans()):
        study["fast"] = draw(st.fixed_dictionaries({}, optional={"base": st.just({"workload": {"requests": 3}})}))
    return study


@pytest.mark.ray
@given(study=studies(), raw_tail=st.one_of(st.just(""), st.just(""), st.just(""), st.sampled_from(["\nbase: {}\n", "\n\t- :\n", "\x00"])))
def test_random_sweep_studies_run_or_are_one_line_errors(ray_local, capsys, tmp_path_factory, study, raw_tail):
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "keep.txt").write_text("not the tool's\n")
    study_file = folder / "study.yaml"
    study_file.write_text(yaml.safe_dump(study, allow_unicode=True) + raw_tail, encoding="utf-8")
    out = folder / "out"
    before = _snapshot(folder, out)
    cwd = os.getcwd()
    os.chdir(folder)   # a default folder (sweeps/<name>) or a stray file would land here
    try:
        code = main(["sweep", str(study_file), "--out", str(out), "--backend", "inline", "--jobs", "2",
                     "--progress-every", "0"])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    event(f"exit {code}")
    assert "Traceback" not in captured.out + captured.err
    assert code in (0, 2), (code, captured.err[-400:], captured.out[-400:])
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rdu: error:"), captured.err
    else:
        assert (out / "results.csv").is_file()
    assert _snapshot(folder, out) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(["keep.txt", "study.yaml", *(["out"] if out.exists()
                                                                                            else [])])


@pytest.mark.ray
@pytest.mark.parametrize("x", ["experts", "scheduler.max_batch"])
def test_a_plot_over_a_name_that_is_no_axis_is_refused(ray_local, capsys, tmp_path, x):
    study = {"base": {"workload": {"kind": "synthetic", "requests": 1, "rate_per_s": 1}, "experts": 1,
                      "backend": "inline"},
             "axes": [{"field": "scheduler.max_batch", "values": [1]}], "plots": [{"x": x, "y": "e2e_ns.p50"}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    code = main(["sweep", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "out"), "--progress-every", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rdu: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("experts", ["1.0e+30", "100000000000"])
def test_a_huge_expert_count_in_a_config_is_refused(capsys, tmp_path, experts):
    config = tmp_path / "run.yaml"
    config.write_text(f"experts: {experts}\nbackend: inline\nworkload: {{kind: synthetic, requests: 1, rate_per_s: 1}}\n")
    code = main(["run", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rdu: error: ") and err.count("\n") == 1
