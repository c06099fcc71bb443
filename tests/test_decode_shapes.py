"""Decode-step shapes built from difference arrays equal the step-by-step definition exactly,
and need memory O(batch + steps) (a large batch of long outputs does not build a matrix)."""

import numpy as np
import pytest

from rdu.socket_actor.operators import decode_shapes


def step_by_step(prompt_lens, output_lens, window):
    """The definition: at decode step j, every sequence with more than j tokens to produce reads
    min(prompt + j - 1, window - 1) cached keys plus its new one."""
    rows = []
    for j in range(1, max(output_lens)):
        active = [(p, o) for p, o in zip(prompt_lens, output_lens) if o - 1 >= j]
        read = [min(p + j - 1, (window or 10**18) - 1) for p, _ in active]
        rows.append((len(active), sum(r + 1 for r in read), sum(read)))
    return rows


@pytest.mark.parametrize("seed", range(40))
def test_equals_the_step_by_step_definition(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 10))
    prompts = [int(x) for x in rng.integers(1, 200, batch)]
    outputs = [int(x) for x in rng.integers(1, 50, batch)]
    window = None if seed % 2 else int(rng.integers(1, 250))
    shape = decode_shapes(prompts, outputs, window)
    expected = step_by_step(prompts, outputs, window)
    assert [(int(t), int(k), int(r)) for t, k, r in zip(shape.tokens, shape.attn_pairs, shape.kv_read_tokens)] \
        == expected
    assert np.array_equal(shape.tokens, shape.seqs) and np.array_equal(shape.attn_pairs, shape.score_elems)


def test_a_large_batch_of_long_outputs_is_cheap():
    shape = decode_shapes([1000] * 200_000, [5000] * 200_000)
    assert len(shape.tokens) == 4999 and shape.tokens[0] == 200_000
    assert shape.kv_read_tokens[-1] == 200_000 * (1000 + 4998)
