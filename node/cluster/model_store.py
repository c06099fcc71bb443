"""A node's model store: the memory tier that holds every model's weights (the sockets' DDR on an
RDU node, host DRAM on a GPU node: the node's *capacity tier*), as shards put once into Ray's
shared object store, capacity enforced at nominal sizes. One store per emulated node, hosted in an
actor placed with the node's sockets; holding the references keeps the objects alive (never
evicted by Ray)."""

from __future__ import annotations

from rdu.socket_actor.tiers import Ledger

__all__ = ["ModelStore"]


class ModelStore:
    """Nominal-size ledger of the models in a node's capacity tier, plus object-store refs of their payloads."""

    def __init__(self, node: str, capacity_bytes: int, tier_name: str = "ddr") -> None:
        self.node = node
        self.ledger = Ledger(node, tier_name, capacity_bytes)
        self._refs: dict[str, dict[int, object]] = {}

    def put(self, model_id: str, nominal_bytes: int, shards: dict[int, object] | None = None) -> int:
        """Admit a model of `nominal_bytes` (raises `CapacityError` if the tier is full) and
        `ray.put` its functional shards (keyed by TP rank). Returns the bytes still free."""
        self.ledger.allocate(model_id, nominal_bytes)
        refs = {}
        if shards:
            import ray

            refs = {int(rank): ray.put(shard) for rank, shard in shards.items()}
        self._refs[model_id] = refs
        return self.ledger.free_bytes

    def put_many(self, models: list[tuple[str, int]]) -> int:
        """Admit several payload-less models at once: (model_id, nominal bytes) each."""
        free = self.ledger.free_bytes
        for model_id, nominal_bytes in models:
            free = self.put(model_id, nominal_bytes)
        return free

    def refs(self, model_id: str) -> dict[int, list]:
        """Every stored rank's shard ref of a model, each wrapped in a list (see `shard_ref`)."""
        return {rank: [ref] for rank, ref in self._refs.get(model_id, {}).items()}

    def shard_ref(self, model_id: str, rank: int) -> list:
        """The object ref of one rank's shard, wrapped in a list so Ray hands over the ref, not the data."""
        refs = self._refs.get(model_id)
        if refs is None:
            raise KeyError(f"{self.node} {self.ledger.tier}: {model_id} is not stored")
        return [refs[rank]] if rank in refs else []


    def snapshot(self) -> dict:
        return {"node": self.node, **self.ledger.snapshot(), "models": len(self._refs)}
