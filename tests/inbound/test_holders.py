"""The holder counts behind fair eviction (the session table, the DPoP replay cache)."""

from __future__ import annotations

import random

from outrider.sidecar.inbound.holders import HolderCounts


def test_counts_follow_each_holder_and_most_is_the_largest() -> None:
    counts = HolderCounts()
    assert counts.most == 0 and counts.holding_most() == {} and counts.counts() == {}
    counts.moved("a", 0, 1)
    counts.moved("b", 0, 1)
    counts.moved("a", 1, 2)
    assert counts.counts() == {1: ["b"], 2: ["a"]} and counts.most == 2
    assert list(counts.holding_most()) == ["a"]
    counts.moved("b", 1, 2)
    assert list(counts.holding_most()) == ["a", "b"]  # in the order they got there
    counts.moved("a", 2, 1)
    assert counts.counts() == {2: ["b"], 1: ["a"]} and counts.most == 2
    counts.moved("b", 2, 1)
    assert counts.most == 1 and list(counts.holding_most()) == ["a", "b"]
    counts.moved("a", 1, 0)
    counts.moved("b", 1, 0)
    assert counts.most == 0 and counts.counts() == {} and counts.holding_most() == {}


def test_most_falls_past_counts_nobody_holds() -> None:
    counts = HolderCounts()
    for n in range(5):
        counts.moved("big", n, n + 1)
    counts.moved("small", 0, 1)
    counts.moved("big", 5, 4)
    assert counts.most == 4
    for n in (4, 3, 2):
        counts.moved("big", n, n - 1)
    assert counts.most == 1 and list(counts.holding_most()) == ["small", "big"]


def test_random_moves_agree_with_a_plain_tally() -> None:
    rng = random.Random(7)
    counts, tally = HolderCounts(), dict.fromkeys("abcdefg", 0)
    for _ in range(5000):
        holder = rng.choice(list(tally))
        before = tally[holder]
        after = before + 1 if before == 0 or rng.random() < 0.55 else before - 1
        counts.moved(holder, before, after)
        tally[holder] = after
        most = max(tally.values())
        assert counts.most == most
        assert sorted(counts.holding_most()) == sorted(h for h, n in tally.items() if n == most and n)
        assert {n: sorted(hs) for n, hs in counts.counts().items()} == {
            n: sorted(h for h, m in tally.items() if m == n) for n in set(tally.values()) if n
        }
