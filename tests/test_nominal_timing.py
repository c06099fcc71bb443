"""Socket actors that compute with the functional model but time with a nominal one: after a
generation each socket's clock is the cost model's analytic time of the nominal steps, to the
nanosecond, when nothing contends (8 actors in this process, over the real gRPC plane; no Ray)."""

import asyncio

import numpy as np
import pytest

from rdu.node.cluster.platform import load_platform
from rdu.socket_actor.actor import NominalTiming, SocketActor
from rdu.socket_actor.core import SocketCore
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.numerics import TinyConfig, init_weights, run_reference, shard_weights
from rdu.socket_actor.operators import shard_weight_bytes
from rdu.interconnect.topology import Topology
from tests.plane_helpers import InProcessRegistry

TP = 8
MEMBERS = tuple(f"node0/socket{s}" for s in range(TP))


def _generate(platform: str, prompt: int, tokens: int, nominal: NominalTiming | None, batch: int = 1,
              loss: float = 0.0):
    """Run one generation on 8 in-process socket actors; returns (results, reference logits, spec)."""
    spec = load_platform(platform, {"sockets_per_node": TP}).spec
    cfg = TinyConfig(max_seq=prompt + tokens + 1)
    weights = init_weights(cfg, 3)
    prompts = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(batch, prompt))

    async def main():
        registry = InProcessRegistry()
        actors = [SocketActor(m, spec.socket, spec.links, 1, TP, registry, list(MEMBERS), "127.0.0.1", "nominal-secret")
                  for m in MEMBERS]
        for actor in actors:
            await actor.start()
            actor.client.ack_deadline_s = 0.05
        try:
            for rank, actor in enumerate(actors):
                ready = asyncio.get_running_loop().create_future()
                ready.set_result(shard_weights(weights, cfg, TP, rank))
                await actor.load("tiny", shard_weight_bytes(cfg.model_spec(), TP), 1_000, [ready])
            if loss:
                await actors[1].set_link_loss(MEMBERS[2], loss, seed=5)
                await actors[2].set_link_loss(MEMBERS[1], loss, seed=5)
            return await asyncio.gather(*(a.generate("tiny", MEMBERS, prompts.tolist(), tokens, nominal=nominal)
                                          for a in actors))
        finally:
            await asyncio.gather(*(actor.stop() for actor in actors))

    results = asyncio.run(main())
    return results, run_reference(weights, cfg, prompts, tokens)[1], spec


def _analytic_ns(spec, model, prompt_lens, tokens, setup=False) -> int:
    """What the socket's own cost model (SocketCore's) says the generation takes."""
    core = SocketCore(MEMBERS[0], spec.socket, Topology(spec.links, 1, TP))
    return core.cost_model(model, MEMBERS).generate(list(prompt_lens), [tokens] * len(prompt_lens),
                                                    setup=setup).total_ns


@pytest.mark.parametrize("tokens, what", [(1, "a prefill step"), (2, "a prefill and a decode step")])
def test_a_nominal_step_on_8_actors_takes_the_cost_models_time(tokens, what):
    """The functional model (2 layers, hidden 256) computes; Llama-2-7B at TP8 on sn40l-node times:
    its 66 collectives per step, 6 of them carried by real messages (to a root and back), each
    charged the analytic time of 7B's bytes."""
    llama = load_model("llama-2-7b")
    nominal = NominalTiming(llama, prompt_lens=(128,))
    results, reference, spec = _generate("sn40l-node", 8, tokens, nominal)
    expected = _analytic_ns(spec, llama, (128,), tokens)
    assert {r["end_ns"] - r["start_ns"] for r in results} == {expected}, what
    assert all(r["start_ns"] == 1_000 for r in results)
    # 6 functional collectives travel per step, 5 after the first: a decode step's embedding
    # all-reduce rides on the previous step's logits gather (its nominal time is still charged)
    assert {tuple(r["algorithms"].items()) for r in results} == {(("ring", 6 + 5 * (tokens - 1)),)}
    assert max(float(np.abs(r["logits"] - reference).max()) for r in results) <= 1e-4   # numerics unchanged


def test_setup_and_one_shot_on_a_switch():
    """A DGX A100 times a batch of 2 of Llama-2-7B with the run's set-up: one-shot for the small
    decode messages, the ring for prefill's large ones, as the timing model picks them."""
    llama = load_model("llama-2-7b")
    nominal = NominalTiming(llama, prompt_lens=(300, 200), setup=True)
    results, reference, spec = _generate("dgx-a100", 6, 3, nominal, batch=2)
    expected = _analytic_ns(spec, llama, (300, 200), 3, setup=True)
    assert {r["end_ns"] - r["start_ns"] for r in results} == {expected}
    # prefill: 6 ring (500 tokens of activations); each decode step: 4 one-shot all-reduces of 16 KiB
    # (its embedding rode on the logits before it) and the logits all-gather of 2 x 32000 x 2 bytes,
    # beyond one_shot_max_bytes: ring
    assert results[0]["algorithms"] == {"ring": 6 + 2 * 1, "one_shot": 2 * 4}
    assert max(float(np.abs(r["logits"] - reference).max()) for r in results) <= 1e-4


def test_without_a_nominal_model_the_functional_model_times_itself():
    results, reference, spec = _generate("sn40l-node", 5, 3, None)
    cfg = TinyConfig(max_seq=5 + 3 + 1)
    assert {r["end_ns"] - r["start_ns"] for r in results} == {_analytic_ns(spec, cfg.model_spec(), (5,), 3)}


def test_lost_messages_add_their_retransmit_timeouts_to_the_nominal_step():
    llama = load_model("llama-2-7b")
    nominal = NominalTiming(llama, prompt_lens=(64,))
    results, reference, spec = _generate("sn40l-node", 4, 3, nominal, loss=0.3)
    clean = _analytic_ns(spec, llama, (64,), 3)
    lost = sum(r["messages_lost"] for r in results)          # what the servers really dropped
    owed = sum(r["owed_ns"] for r in results)                # the agreement's own answers: charged next time
    # every member agrees; each loss costs the group exactly one retransmission timeout
    assert {r["end_ns"] - r["start_ns"] for r in results} == {clean + lost * int(spec.links.retransmit_timeout_ns) - owed}
    assert lost > 0 and sum(r["messages_resent"] for r in results) >= lost
    assert max(float(np.abs(r["logits"] - reference).max()) for r in results) <= 1e-4
