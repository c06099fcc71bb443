"""Global dispatch (which group serves a request) and expert placement (which nodes' DDR hold
which experts, which groups start with which experts in HBM)."""

from __future__ import annotations

from collections import Counter

from rdu.socket_actor.tiers import CapacityError

__all__ = ["DISPATCH", "PLACEMENT", "choose_group", "group_on_node", "place_experts", "hot_experts"]

DISPATCH = ("expert-affinity", "least-loaded", "round-robin")
PLACEMENT = ("spread", "popularity")


def choose_group(groups: list, expert: int, holders: set[int], rule: str, slack: int, counter: int):
    """Least-loaded live group whose node holds the expert; with `expert-affinity`, a group
    already warm for it unless it is `slack` requests busier (then the request spills over and
    a second replica warms up); `round-robin` cycles over the eligible groups (`counter`)."""
    eligible = [g for g in groups if not g.dead and g.info.node in holders]
    if not eligible:
        return None
    if rule == "round-robin":
        return eligible[counter % len(eligible)]
    load = lambda g: (g.load, g.info.index)  # noqa: E731
    coldest = min(eligible, key=load)
    if rule == "expert-affinity":
        warm = [g for g in eligible if g.warm_for(expert)]
        if warm:
            best = min(warm, key=load)
            if best.load <= coldest.load + slack:
                return best
    return coldest


def group_on_node(groups: list, expert: int, node: int, rule: str, slack: int, counter: int):
    """The group of `node` a request the ingress routed there goes to (None if none is alive):
    the same rule as the ingress's, on what the node knows when the request reaches it."""
    return choose_group([g for g in groups if g.info.node == node], expert, {node}, rule, slack, counter)


def hot_experts(sequence: list[int]) -> list[int]:
    """Experts by how many requests of the workload ask for them, most popular first (an offline
    profile of the workload, as AlpaServe and MuxServe place models from a profiled load)."""
    counts = Counter(sequence)
    return sorted(counts, key=lambda e: (-counts[e], e))


def place_experts(backend, experts: int, expert_bytes: int, router_bytes: int, policy: str,
                  sequence: list[int]) -> dict[str, list[int]]:
    """DDR placement. `spread`: every node holds all experts if they fit, else round-robin.
    `popularity`: as spread when all fit; otherwise the hottest experts are replicated on every
    node (as many as fit besides each node's round-robin share of the rest)."""
    nodes = backend.nodes
    capacity = backend.capacity_tier_bytes
    if experts * expert_bytes + router_bytes <= capacity:
        return {f"node{n}": list(range(experts)) for n in range(nodes)}
    spread = {f"node{n}": list(range(n, experts, nodes)) for n in range(nodes)}
    worst = max(len(v) for v in spread.values()) * expert_bytes + router_bytes
    if worst > capacity:
        raise CapacityError(
            f"{experts} experts of {expert_bytes / 1e9:.2f} GB ({experts * expert_bytes / 1e12:.2f} TB) "
            f"plus the router do not fit in the {backend.capacity_tier_name} of {nodes} node(s) "
            f"({capacity / 1e12:.2f} TB each; the busiest node needs {worst / 1e12:.2f} TB)")
    if policy == "spread":
        return spread
    room = (capacity - worst) // expert_bytes
    placement = {}
    for n in range(nodes):
        own = set(spread[f"node{n}"])
        extra = [e for e in hot_experts(sequence) if e not in own][:room]
        placement[f"node{n}"] = sorted(own | set(extra))
    return placement
