"""Computing a token prefix that several prompts of one call share once (the local runner's prefix reuse).

Prompts that carry demonstrations, or one instruction scored on many inputs, share a long head: the template's
start, the demonstration block, the instruction. vLLM reuses that head's keys and values across requests by itself
(automatic prefix caching); the local runner does it within one `label_logprobs` call:

* `plan_shared_prefixes` sorts the token sequences, so that sequences sharing a head are neighbours, and splits
  them into groups whose common head saves the most tokens (a group of n rows sharing g tokens saves (n - 1) * g
  token computations); a sequence that shares too little with its neighbours is left for the plain batches.
* `forward_with_shared_prefix` runs a group's head once, alone, and its rows' remaining tokens in left-padded
  batches that attend to the head through `SharedPrefixLayer`s: each lends the head's keys and values (batch 1)
  to every row of a batch and keeps nothing of the batch, so one head serves all its batches.

Each row keeps at least its last token out of the head, since its logits are what is scored. The head runs at
positions 0..g-1 and the rows continue at g, so a row scores as it does alone up to rounding: the head's matrix
products have other shapes than in a full forward, which changes float rounding (as batching already does in the
linear layers), never the tokens attended.
"""

from __future__ import annotations

from typing import Any

# Below this many shared tokens a separate forward of the head is not worth it.
MIN_SHARED_TOKENS = 32
# Nested heads deeper than this are taken as one group (a guard for pathological inputs, not a tuning knob).
_MAX_DEPTH = 64


def common_length(a: list[int], b: list[int]) -> int:
    """Tokens `a` and `b` share at their start, leaving each at least its last token."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return max(0, n)


def plan_shared_prefixes(
    seqs: list[list[int]], min_shared: int = MIN_SHARED_TOKENS
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Split the indices of `seqs` into groups sharing a head, as (head length, indices), and the rest.

    Sorted, a set's common head is the smallest common head of neighbours. A run of neighbours is either one group
    (its smallest neighbour head shared by all) or split where that smallest head occurs, whichever saves more;
    runs whose smallest head is under `min_shared` are always split."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    shared = [common_length(seqs[a], seqs[b]) for a, b in zip(order, order[1:], strict=False)]

    def best(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, list[int]]]]:
        """The saving and the groups of order[lo:hi] (shared[lo:hi-1] are its neighbour heads)."""
        if hi - lo < 2:
            return 0, []
        head = min(shared[lo : hi - 1])
        whole = (hi - lo - 1) * head if head >= min_shared else 0
        if depth >= _MAX_DEPTH:
            return whole, ([(head, order[lo:hi])] if whole else [])
        saving, groups, start = 0, [], lo
        for k in range(lo, hi - 1):
            if shared[k] == head:
                part_saving, part_groups = best(start, k + 1, depth + 1)
                saving, groups, start = saving + part_saving, groups + part_groups, k + 1
        part_saving, part_groups = best(start, hi, depth + 1)
        saving, groups = saving + part_saving, groups + part_groups
        if whole > 0 and whole >= saving:
            return whole, [(head, order[lo:hi])]
        return saving, groups

    _, groups = best(0, len(order), 0)
    grouped = {i for _, members in groups for i in members}
    return groups, [i for i in range(len(seqs)) if i not in grouped]


def _shared_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SharedPrefixLayer(DynamicLayer):
        """One layer's keys and values of a head (batch 1), lent to every row of a batch: `update` returns the head
        followed by the batch's own keys and values and stores nothing."""

        def __init__(self, keys: Any, values: Any) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            batch = key_states.shape[0]
            keys = torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2)
            values = torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2)
            return keys, values

    return SharedPrefixLayer


def head_cache(backend, head: list[int]) -> list[tuple[Any, Any]]:
    """The keys and values of every layer after running `head` alone (positions 0..len-1)."""
    import torch

    ids = torch.tensor([head], dtype=torch.long)
    ones = torch.ones_like(ids)
    positions = torch.arange(len(head), dtype=torch.long)[None, :]
    _, cache = backend._forward(ids, ones, positions, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def forward_with_shared_prefix(backend, head_layers: list[tuple[Any, Any]], tails: list[list[int]]):
    """Last-position logits of rows that are `head` + each tail, the head's keys and values given."""
    import torch
    from transformers.cache_utils import Cache

    layer_class = _shared_layer_class()
    cache = Cache(layers=[layer_class(keys, values) for keys, values in head_layers])
    length = head_layers[0][0].shape[-2]
    input_ids, mask, positions = backend._left_pad(tails)
    full_mask = torch.cat([torch.ones((len(tails), length), dtype=mask.dtype), mask], dim=1)
    return backend._forward(input_ids, full_mask, positions + length, cache=cache)[0]
