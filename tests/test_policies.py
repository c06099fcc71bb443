from rdu.scheduler.policies import make_policy


def test_lru_lfu_belady_pick_different_victims():
    sequence = [1, 2, 3, 1, 1, 2, 4, 3, 2]
    lru, lfu, belady = (make_policy(name, sequence) for name in ("lru", "lfu", "belady"))
    for position, expert in enumerate(sequence[:6]):
        for policy in (lru, lfu, belady):
            policy.touch(expert, position)
    resident = {1, 2, 3}
    assert lru.victims(resident, 1, 5) == [3]       # used longest ago
    assert lfu.victims(resident, 1, 5) == [3]       # used once
    assert belady.victims(resident, 1, 5) == [1]    # never used again
    assert belady.victims({2, 3}, 1, 5) == [2]      # 2 is next needed at 8, 3 sooner at 7
    assert belady.next_use(2, 5) == 8 and belady.next_use(3, 5) == 7


def test_unknown_policy():
    import pytest

    from rdu.base import UserError

    with pytest.raises(UserError, match="unknown policy 'mru'; expected one of lru, lfu, belady, prefetch"):
        make_policy("mru", [])
