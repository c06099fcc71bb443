"""Inter-token gaps are kept folded by value: the percentiles are those of the expanded list,
exactly, whatever the buffer size, and memory follows the distinct values, not the pairs."""

import numpy as np
import pytest

from rdu.scheduler.metrics import WeightedValues, weighted_percentiles


@pytest.mark.parametrize("buffer_pairs", [1, 7, 1 << 18])
def test_folded_percentiles_equal_the_expanded_list(buffer_pairs):
    rng = np.random.default_rng(buffer_pairs)
    multiset = WeightedValues(buffer_pairs=buffer_pairs)
    expanded = []
    for _ in range(300):
        values = rng.integers(1_000, 1_050, size=int(rng.integers(1, 6))).tolist()
        count = int(rng.integers(1, 9))
        multiset.add(values, count)
        expanded += [v for v in values for _ in range(count)]
    values, counts = multiset.arrays()
    got = weighted_percentiles(values, counts)
    want = np.percentile(np.array(expanded), [50, 90, 99])
    assert [got["p50"], got["p90"], got["p99"]] == [int(round(x)) for x in want]
    assert got["max"] == max(expanded) and got["mean"] == int(round(np.mean(expanded)))


def test_memory_follows_distinct_values():
    multiset = WeightedValues(buffer_pairs=1000)
    for _ in range(2000):
        multiset.add(range(2_000_000, 2_000_050), 8)  # 100,000 pairs over 50 distinct values
    values, counts = multiset.arrays()
    assert len(values) == 50 and int(counts.sum()) == 800_000
