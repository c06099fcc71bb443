"""The static cycle's KV cache lives in the HBM ledger: each batch holds its KV on every member
while it runs (sized by its own sequences, no look-ahead), and the ledger returns to the weights
alone when the group goes idle and at the end of the run."""

from rdu.base import Fields
from rdu.node.cluster.inline_backend import InlineCluster
from rdu.node.cluster.platform import load_platform
from rdu.scheduler.serving import CoEServer, ServingConfig
from rdu.scheduler.timeline import ROUTER_MODEL, Run
from rdu.scheduler.workloads import WorkloadSpec, build_workload
from rdu.socket_actor.core import KV_ENTRY
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import kv_bytes_per_token_per_socket
from tests.helpers import events_as_made

LLAMA = load_model("llama-2-7b")


def test_each_batch_holds_its_own_kv_while_it_runs_and_none_is_left():
    backend = InlineCluster(load_platform("sn40l-node").spec, 1, 8)
    workload = build_workload(WorkloadSpec.from_fields(Fields({"kind": "trace", "limit": 60}, "test", "workload")),
                              20, 0)
    lengths = {r.id: r.prompt_tokens + r.output_tokens for r in workload.requests}
    seen = []

    def made(event):
        if isinstance(event, Run) and event.model != ROUTER_MODEL:  # an expert batch, just admitted on every member
            expected = kv_bytes_per_token_per_socket(LLAMA, 8) * sum(lengths[i] for i in event.requests)
            held = {name: core.tiers.hbm._items.get(KV_ENTRY, 0) for name, core in backend.sockets.items()}
            seen.append((expected, event.kv_bytes, set(held.values())))

    server = CoEServer(backend, LLAMA, 20, LLAMA, workload, ServingConfig(kind="static"), lambda event: None)
    with events_as_made(made):
        server.run()
    assert len(seen) > 20 and all(values == {expected} and said == expected for expected, said, values in seen)
    weights = {name: sum(r.shard_bytes for r in core.residents.values()) for name, core in backend.sockets.items()}
    assert {name: core.tiers.hbm.used_bytes for name, core in backend.sockets.items()} == weights
