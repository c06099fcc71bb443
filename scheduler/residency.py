"""Which models a group holds in HBM, and the DDR -> HBM switches that change it, for the
continuous engine. A switch starts when a model is needed (the router decided, or, with the
`prefetch` policy, a request waits for the router) and lands later: the copy runs on the links in
the background while resident models keep stepping. Victims are chosen by the residency policy
among models with no sequence in flight (holding KV); models somebody waits for go last."""

from __future__ import annotations

from collections.abc import Callable

from rdu.scheduler.backend import GroupInfo, ServingBackend
from rdu.scheduler.kv import GroupMemory
from rdu.scheduler.policies import ResidencyPolicy
from rdu.scheduler.timeline import Event, Evict, Switch
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import shard_weight_bytes

__all__ = ["Residency", "ROUTER_KEY", "model_id"]

ROUTER_KEY = -1


def model_id(key: int) -> str:
    """The model id the sockets know a model by (`router`, `expert0007`)."""
    return "router" if key == ROUTER_KEY else f"expert{key:04d}"


class Residency:
    """Resident models of one group (key -> ready time) and the switches into it."""

    def __init__(self, backend: ServingBackend, info: GroupInfo, memory: GroupMemory, policy: ResidencyPolicy,
                 expert_model: ModelSpec, router_model: ModelSpec, stats, emit: Callable[[Event], None] | None) -> None:
        self.backend, self.info, self.memory, self.policy, self.stats = backend, info, memory, policy, stats
        self.models = {ROUTER_KEY: router_model}
        self.expert_model = expert_model
        self.expert_shard_bytes = shard_weight_bytes(expert_model, info.tp)
        self.router_shard_bytes = shard_weight_bytes(router_model, info.tp)
        self.resident: dict[int, int] = {}
        self.pinned: set[int] = {ROUTER_KEY}
        self.emit = emit

    def shard_bytes(self, key: int) -> int:
        return self.router_shard_bytes if key == ROUTER_KEY else self.expert_shard_bytes

    def ready(self, key: int, now: int) -> bool:
        ready = self.resident.get(key)
        return ready is not None and ready <= now

    def _pick(self, candidates: list[int], free: int, nbytes: int, position: int) -> tuple[list[int], int]:
        """Victims by policy among `candidates` until `nbytes` are free."""
        chosen = []
        candidates = list(candidates)
        while candidates and free < nbytes:
            victim = self.policy.victims(candidates, 1, position)[0]
            candidates.remove(victim)
            chosen.append(victim)
            free += self.shard_bytes(victim)
        return chosen, free

    def _victims(self, nbytes: int, busy: set[int], needed: dict[int, int], position: int,
                 spare_needed: bool = False) -> list[int] | None:
        """Victims that free `nbytes` (None if all candidates would not): models with no sequence
        in flight (`busy` holds those and models still arriving), nobody-waits-for ones first.
        `needed` maps a model somebody waits for to its oldest waiting request; such a model is
        evicted for a switch only when that request is younger than the switch's (`position`):
        evicting a model older requests wait for, to serve younger ones, is how a CoE under
        load thrashes (every boundary swapping out what the last one brought in)."""
        free = self.memory.free_bytes
        idle = [k for k in self.resident if k not in self.pinned and k not in busy]
        chosen, free = self._pick([k for k in idle if k not in needed], free, nbytes, position)
        if free < nbytes and not spare_needed:
            younger = [k for k in idle if k in needed and needed[k] > position]
            more, free = self._pick(younger, free, nbytes, position)
            chosen += more
        return chosen if free >= nbytes else None

    def evictable_bytes(self, busy: set[int], needed: dict[int, int]) -> int:
        """HBM that evicting idle models nobody waits for would free (what KV may claim)."""
        return sum(self.shard_bytes(k) for k in self.resident
                   if k not in self.pinned and k not in busy and k not in needed)

    def _evict(self, victims: list[int]) -> None:
        for victim in victims:
            self.backend.evict(self.info.index, model_id(victim))
            del self.resident[victim]
            self.memory.weights_bytes -= self.shard_bytes(victim)
            self.stats.evictions += 1

    def make_room(self, nbytes: int, busy: set[int], needed: dict[int, int], now: int,
                  position: int = 1 << 62) -> bool:
        """Evict idle models nobody waits for until `nbytes` are free (room for KV blocks). The
        `evict` event says so: observers track HBM from events alone, so every eviction shows."""
        victims = self._victims(nbytes, busy, needed, position, spare_needed=True)
        if victims is None:
            return False
        self._evict(victims)
        if victims and self.emit is not None:
            self.emit(Evict(t_ns=now, group=self.info.name, models=[model_id(v) for v in victims], reason="room for KV",
                            kv_bytes_needed=int(nbytes)))
        return True

    def start(self, key: int, now: int, busy: set[int], needed: dict[int, int], prefetch: bool,
              position: int = 1 << 62) -> int | None:
        """Start copying `key` into HBM at `now`; returns when it is ready, or None if the room is
        not there (the switch waits). A prefetch evicts nobody anyone waits for."""
        shard = self.shard_bytes(key)
        victims = self._victims(shard, busy, {**needed, key: position}, position, spare_needed=prefetch)
        if victims is None:
            return None
        self._evict(victims)
        self.backend.set_kv(self.info.index, self.memory.kv_bytes)   # the ledgers see the KV freed since the last span
        model = self.models.get(key, self.expert_model)
        arrivals = self.backend.copy_in(self.info.index, model_id(key), model, now)
        ready = max(arrivals.values())
        self.resident[key] = ready
        self.memory.weights_bytes += shard
        if key != ROUTER_KEY:
            self.stats.switches += 1
            self.stats.prefetches += prefetch
        if self.emit is not None:   # kv_bytes: what the ledgers' KV entry holds from now
            self.emit(Switch(t_ns=now, group=self.info.name, model=model_id(key), ready_ns=ready,
                             victims=[model_id(v) for v in victims], prefetch=prefetch, arrivals=dict(arrivals),
                             shard_bytes=shard, kv_bytes=self.memory.kv_bytes))
        return ready
