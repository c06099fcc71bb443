"""`rdu check-tp`: the functional model's decode, tensor-parallel across every socket actor of
N emulated nodes over the gRPC interconnect, checked token by token against the single-process
reference forward pass. The numerics travel by the cheapest route (every collective's tensors
to a root and back: 2 (n - 1) messages, 2 dependent hops); the time is the platform's algorithm's
(each collective charged the analytic time of the algorithm its timing model picks: ring, or
one-shot where the topology has direct paths), so the virtual time is the cost model's, plus one
retransmission timeout per message a lossy link really lost. Afterwards one socket asks every
member's server, over the plane's Stats call, what it received, and the report carries that per
socket."""

from __future__ import annotations

import time

import numpy as np

from rdu.base import UserError
from rdu.interconnect.collectives import TRANSPORT
from rdu.interconnect.topology import Topology
from rdu.node.cluster.platform import load_platform
from rdu.interconnect.grpc_plane import LinkLost
from rdu.node.cluster.ray_nodes import RayNodes
from rdu.node.runs.run import RunStopped
from rdu.node.cluster.ray_session import ray_session
from rdu.scheduler.faults import parse_faults
from rdu.socket_actor.numerics import TinyConfig, init_weights, run_reference, shard_weights
from rdu.socket_actor.operators import shard_weight_bytes
from rdu.socket_actor.tp_group import TPGroup

__all__ = ["check_tp"]

MODEL_ID = "functional-tiny"


def _load_shards(cluster: RayNodes, spec, weights: dict, cfg: TinyConfig, nodes: int, sockets_per_node: int) -> None:
    """Put the functional shards into every node's DDR store, and copy each into its socket's
    HBM at the time the link model lands it."""
    import ray

    members = list(cluster.names)
    tp = len(members)
    shard_bytes = shard_weight_bytes(cfg.model_spec(), tp)
    for n, store in enumerate(cluster.model_stores):
        ranks = range(n * sockets_per_node, (n + 1) * sockets_per_node)
        ray.get(store.put.remote(MODEL_ID, shard_bytes * sockets_per_node,
                                 {r: shard_weights(weights, cfg, tp, r) for r in ranks}))
    group = TPGroup("check-tp", members, spec.socket, Topology(spec.links, nodes, sockets_per_node))
    arrivals = group.copy_in(shard_bytes, 0)
    refs = [ray.get(cluster.model_stores[r // sockets_per_node].shard_ref.remote(MODEL_ID, r)) for r in range(tp)]
    ray.get([cluster.sockets[name].load.remote(MODEL_ID, shard_bytes, arrivals[name], refs[r])
             for r, name in enumerate(members)])


def _lose_messages(cluster: RayNodes, lossy: list, seed: int) -> None:
    """drop-link faults: both ends of each link lose messages from the other, for real."""
    import ray

    for fault in lossy:
        a, b = fault.link
        for src, dst in ((a, b), (b, a)):
            if src not in cluster.sockets or dst not in cluster.sockets:
                raise UserError(f"--fault {fault.text!r}: no socket {src if src not in cluster.sockets else dst}")
            ray.get(cluster.sockets[src].set_link_loss.remote(dst, fault.probability, seed))


def _generate(cluster: RayNodes, prompts: np.ndarray, tokens: int) -> tuple[list[dict], float, dict]:
    """Every member generates; (their results, wall seconds, what each server says it received)."""
    import ray

    members = tuple(cluster.names)
    started = time.perf_counter()
    try:
        results = ray.get([cluster.sockets[name].generate.remote(MODEL_ID, members, prompts.tolist(), tokens)
                           for name in members])
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, LinkLost):
            raise RunStopped(str(exc.cause)) from None
        raise
    wall_s = time.perf_counter() - started
    return results, wall_s, ray.get(cluster.sockets[members[0]].plane_stats.remote(list(members)))


def check_tp(nodes: int, sockets_per_node: int, tokens: int = 16, prompt_tokens: int = 16, seed: int = 0,
             platform: str = "sn40l-node", address: str | None = None, batch: int = 1,
             faults: list[str] | None = None) -> dict:
    """Generate `tokens` greedily for `batch` prompts on every socket actor of `nodes` x
    `sockets_per_node`, and compare with the single-process reference (see the module docstring)."""
    if min(nodes, sockets_per_node, tokens, prompt_tokens, batch) < 1:
        raise UserError("--nodes, --sockets-per-node, --tokens, --prompt and --batch must be >= 1")
    lossy = parse_faults(faults, "--fault")
    for fault in lossy:
        if fault.kind != "drop-link":
            raise UserError(f"--fault {fault.text!r}: check-tp takes drop-link faults only")
    spec = load_platform(platform, {"sockets_per_node": sockets_per_node}).spec
    cfg = TinyConfig(max_seq=prompt_tokens + tokens + 1)
    tp = nodes * sockets_per_node
    cfg.check_tp(tp)
    weights = init_weights(cfg, seed)
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, prompt_tokens))

    with ray_session(address, tp) as session:
        cluster = RayNodes(spec, nodes, run_token=session.run_token(), bind_host=session.bind_host)
        try:
            cluster.start()
            _load_shards(cluster, spec, weights, cfg, nodes, sockets_per_node)
            import ray

            ray.get([cluster.sockets[name].connect.remote(cluster.names) for name in cluster.names])
            _lose_messages(cluster, lossy, seed)   # from the first generated token on
            results, wall_s, plane = _generate(cluster, prompts, tokens)
            ray_nodes = cluster.ray_node_of()
        finally:
            cluster.shutdown()

    reference_ids, reference_logits = run_reference(weights, cfg, prompts, tokens)
    generated = tokens * batch
    return {
        "nodes": nodes, "sockets_per_node": sockets_per_node, "tp": tp, "platform": spec.name,
        "tokens": tokens, "batch": batch, "prompt_tokens": prompt_tokens, "seed": seed,
        "max_abs_err": max(float(np.abs(r["logits"] - reference_logits).max()) for r in results),
        "tokens_match": all(np.array_equal(r["tokens"], reference_ids) for r in results),
        "grpc_bytes": int(sum(r["grpc_bytes_sent"] for r in results)),
        "collective_algorithms": dict(results[0]["algorithms"]),
        "collective_transport": TRANSPORT,
        "grpc_messages": int(sum(s["tensors_received"] for s in plane.values())),
        "messages_lost": int(sum(s["dropped"] for s in plane.values())),
        "messages_resent": int(sum(r["messages_resent"] for r in results)),
        "retransmit_ns_owed": int(sum(r["owed_ns"] for r in results)),
        "plane_received": {name: {"tensors": s["tensors_received"], "bytes": s["bytes_received"],
                                  "dropped": s["dropped"], "rejected": s["rejected"]} for name, s in plane.items()},
        "virtual_ns": int(max(r["end_ns"] for r in results)),
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(generated / wall_s, 2) if wall_s > 0 else None,
        "ray_nodes_used": len(set(ray_nodes.values())),
        "interconnect_token": bool(cluster.run_token),
        "interconnect_tls": cluster.tls is not None,
        "ray_session": "started here" if session.started_here else f"joined {session.address}",
    }
