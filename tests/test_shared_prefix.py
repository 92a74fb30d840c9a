"""Planning which prompts of one local scoring call share a head worth computing once (`plan_shared_prefixes`).
The forward passes themselves are tested against the real model in test_llm_local.py."""

from __future__ import annotations

import random

from app.llm.local.shared_prefix import common_length, plan_shared_prefixes


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 2000) for _ in range(n)]


def normal(groups) -> list[tuple[int, list[int]]]:
    return sorted((head, sorted(group)) for head, group in groups)


def check_partition(seqs, groups, rest) -> None:
    members = [i for _, group in groups for i in group] + rest
    assert sorted(members) == list(range(len(seqs)))  # every prompt exactly once
    for head, group in groups:
        assert len(group) >= 2
        first = seqs[group[0]][:head]
        for i in group:
            assert seqs[i][:head] == first and len(seqs[i]) > head  # shared, and a last token left to score


def test_common_length_leaves_each_sequence_its_last_token():
    assert common_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_length([1, 2, 3], [1, 2, 3, 4]) == 2  # a prompt that is the other's head keeps its last token
    assert common_length([1, 2, 3], [1, 2, 3]) == 2
    assert common_length([5], [5, 6]) == 0
    assert common_length([], [1]) == 0


def test_two_families_are_grouped_by_their_heads_and_strangers_left_alone():
    head_a, head_b = tokens(1, 200), tokens(2, 120)
    seqs = [head_a + tokens(10 + i, 5 + i) for i in range(6)]
    seqs += [head_b + tokens(20 + i, 7) for i in range(4)]
    seqs += [tokens(30, 50), tokens(31, 3)]
    order = list(range(len(seqs)))
    random.Random(0).shuffle(order)
    shuffled = [seqs[i] for i in order]
    groups, rest = plan_shared_prefixes(shuffled)
    check_partition(shuffled, groups, rest)
    found = sorted((head, sorted(order[i] for i in group)) for head, group in groups)
    assert found == [(120, [6, 7, 8, 9]), (200, [0, 1, 2, 3, 4, 5])]
    assert sorted(order[i] for i in rest) == [10, 11]


def test_a_longer_head_shared_by_most_beats_a_short_one_shared_by_all():
    template = tokens(3, 40)
    block = tokens(4, 300)
    seqs = [template + block + tokens(40 + i, 6) for i in range(3)] + [template + tokens(50, 20)]
    groups, rest = plan_shared_prefixes(seqs)
    check_partition(seqs, groups, rest)
    # Splitting saves 2 x 340 tokens; one group of four would save 3 x 40.
    assert normal(groups) == [(340, [0, 1, 2])] and rest == [3]
    # When the short head is shared by many, one group wins.
    many = [template + tokens(60 + i, 10) for i in range(40)] + seqs[:2]
    groups, rest = plan_shared_prefixes(many)
    check_partition(many, groups, rest)
    heads = sorted(head for head, _ in groups)
    assert heads == [40] and rest == []


def test_short_heads_and_single_prompts_are_not_worth_a_separate_pass():
    head = tokens(5, 20)
    seqs = [head + tokens(70 + i, 30) for i in range(5)]
    assert plan_shared_prefixes(seqs) == ([], [0, 1, 2, 3, 4])
    assert normal(plan_shared_prefixes(seqs, min_shared=16)[0]) == [(20, [0, 1, 2, 3, 4])]
    assert plan_shared_prefixes([tokens(6, 100)]) == ([], [0])
    assert plan_shared_prefixes([]) == ([], [])


def test_identical_prompts_and_a_prompt_that_is_the_head_of_others():
    head = tokens(7, 64)
    seqs = [head, head + [1], head + [2, 3], list(head)]
    groups, rest = plan_shared_prefixes(seqs)
    check_partition(seqs, groups, rest)
    assert normal(groups) == [(63, [0, 1, 2, 3])] and rest == []
