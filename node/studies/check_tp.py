"""`rdu check-tp`: the functional model's decode, tensor-parallel across every socket actor of
N emulated nodes over the gRPC interconnect, checked token by token against the single-process
reference forward pass. Collectives run the algorithm the platform's timing model picks for
their size (ring, or one-shot where the topology has direct paths), and the virtual time is the
cost model's; afterwards one socket asks every member's server, over the plane's Stats call,
what it received, and the report carries that per socket."""

from __future__ import annotations

import time

import numpy as np

from rdu.base import UserError
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


def check_tp(nodes: int, sockets_per_node: int, tokens: int = 16, prompt_tokens: int = 16, seed: int = 0,
             platform: str = "sn40l-node", address: str | None = None, batch: int = 1,
             faults: list[str] | None = None) -> dict:
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
    model = cfg.model_spec()
    shard_bytes = shard_weight_bytes(model, tp)

    with ray_session(address, tp) as session:
        cluster = RayNodes(spec, nodes, run_token=session.run_token(), bind_host=session.bind_host)
        try:
            cluster.start()
            members = tuple(cluster.names)
            import ray

            for n, store in enumerate(cluster.model_stores):
                ranks = range(n * sockets_per_node, (n + 1) * sockets_per_node)
                ray.get(store.put.remote(MODEL_ID, shard_bytes * sockets_per_node,
                                         {r: shard_weights(weights, cfg, tp, r) for r in ranks}))
            group = TPGroup("check-tp", list(members), spec.socket, Topology(spec.links, nodes, sockets_per_node))
            arrivals = group.copy_in(shard_bytes, 0)
            refs = [ray.get(cluster.model_stores[r // sockets_per_node].shard_ref.remote(MODEL_ID, r)) for r in range(tp)]
            ray.get([cluster.sockets[name].load.remote(MODEL_ID, shard_bytes, arrivals[name], refs[r])
                     for r, name in enumerate(members)])
            for fault in lossy:
                a, b = fault.link
                for src, dst in ((a, b), (b, a)):
                    if src not in cluster.sockets or dst not in cluster.sockets:
                        raise UserError(f"--fault {fault.text!r}: no socket {src if src not in cluster.sockets else dst}")
                    ray.get(cluster.sockets[src].set_link_loss.remote(dst, fault.probability, seed))
            ray.get([cluster.sockets[name].connect.remote(list(members)) for name in members])
            started = time.perf_counter()
            try:
                results = ray.get([cluster.sockets[name].generate.remote(MODEL_ID, members, prompts.tolist(), tokens)
                                   for name in members])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, LinkLost):
                    raise RunStopped(str(exc.cause)) from None
                raise
            wall_s = time.perf_counter() - started
            plane = ray.get(cluster.sockets[members[0]].plane_stats.remote(list(members)))
            ray_nodes = cluster.ray_node_of()
        finally:
            cluster.shutdown()

    reference_ids, reference_logits = run_reference(weights, cfg, prompts, tokens)
    max_abs_err = max(float(np.abs(r["logits"] - reference_logits).max()) for r in results)
    generated = tokens * batch
    algorithms: dict[str, int] = {}
    for name, count in results[0]["algorithms"].items():
        algorithms[name] = algorithms.get(name, 0) + count
    return {
        "nodes": nodes, "sockets_per_node": sockets_per_node, "tp": tp, "platform": spec.name,
        "tokens": tokens, "batch": batch, "prompt_tokens": prompt_tokens, "seed": seed,
        "max_abs_err": max_abs_err,
        "tokens_match": all(np.array_equal(r["tokens"], reference_ids) for r in results),
        "grpc_bytes": int(sum(r["grpc_bytes_sent"] for r in results)),
        "collective_algorithms": algorithms,
        "messages_lost": int(sum(s["dropped"] for s in plane.values())),
        "messages_resent": int(sum(r["messages_lost"] for r in results)),
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
