"""The row-wise attention kernel the local backend registers with transformers.

It computes attention one batch row at a time on that row's real (unpadded) keys, so a prompt scores the same
alone or in any left-padded batch.
"""

from __future__ import annotations

ROWWISE_ATTENTION = "promptopt_rowwise"


def rowwise_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention computed one row at a time on that row's unpadded keys (and queries).

    Each row then runs exactly the kernels, shapes and data it would run alone, whatever else is in the batch and
    however much left padding it got, so attention adds no batch-dependent rounding. `attention_mask` is
    (batch, 1, 1, keys), 1 for real tokens; left padding, so a row's real keys are its last `mask.sum()`.
    `query` is (batch, heads, queries, dim) and the queries are the last `queries` of the keys.
    """
    import torch
    import torch.nn.functional as F

    batch, heads, n_query, dim = query.shape
    n_key = key.shape[2]
    flat_mask = attention_mask.reshape(batch, -1) if attention_mask is not None else None
    counts = flat_mask.sum(-1).tolist() if flat_mask is not None else [n_key] * batch
    if flat_mask is not None and not _real_keys_are_a_suffix(flat_mask, counts):
        return _rowwise_attention_gathered(query, key, value, flat_mask, scaling)
    if n_query == 1:  # a decoding step: every row has its one query
        rows = [
            F.scaled_dot_product_attention(
                query[b : b + 1],
                key[b : b + 1, :, n_key - c :],
                value[b : b + 1, :, n_key - c :],
                scale=scaling,
                enable_gqa=True,
            )
            for b, c in enumerate(counts)
        ]
        return torch.cat(rows).transpose(1, 2), None
    out = query.new_zeros((batch, n_query, heads, dim))
    for b, count in enumerate(counts):
        start = n_key - int(count)
        q_start = max(0, start - (n_key - n_query))
        q_len, k_len = n_query - q_start, n_key - start
        if q_len <= 0 or k_len <= 0:
            continue  # a padding-only row (never read)
        mask = None
        if 1 < q_len < k_len:  # queries after cached keys: causal, aligned bottom-right
            mask = torch.ones((q_len, k_len), dtype=torch.bool).tril(diagonal=k_len - q_len)
        o = F.scaled_dot_product_attention(
            query[b : b + 1, :, q_start:],
            key[b : b + 1, :, start:],
            value[b : b + 1, :, start:],
            attn_mask=mask,
            is_causal=q_len > 1 and q_len == k_len,
            scale=scaling,
            enable_gqa=True,
        )
        out[b, q_start:] = o[0].transpose(0, 1)
    return out, None


def _real_keys_are_a_suffix(flat_mask, counts: list[int]) -> bool:
    n_key = flat_mask.shape[-1]
    return all(int(flat_mask[b, n_key - int(c) :].sum()) == int(c) for b, c in enumerate(counts))


def _rowwise_attention_gathered(query, key, value, flat_mask, scaling):
    """Row-wise attention when a row's real keys have a hole: a deep prompt's prefix keys, then the row's left
    padding, then its tokens. Queries are the last `n_query` positions; the real ones are the row's tokens,
    which see every prefix key and, causally, the tokens before them."""
    import torch
    import torch.nn.functional as F

    batch, heads, n_query, dim = query.shape
    n_key = key.shape[2]
    out = query.new_zeros((batch, n_query, heads, dim))
    query_mask = flat_mask[:, n_key - n_query :]
    for b in range(batch):
        keys = flat_mask[b].nonzero().flatten()
        queries = query_mask[b].nonzero().flatten()
        q_len, k_len = len(queries), len(keys)
        if q_len == 0:
            continue
        q_start = int(queries[0])
        mask = torch.ones((q_len, k_len), dtype=torch.bool).tril(diagonal=k_len - q_len)
        o = F.scaled_dot_product_attention(
            query[b : b + 1, :, q_start:],
            key[b : b + 1].index_select(2, keys),
            value[b : b + 1].index_select(2, keys),
            attn_mask=mask,
            scale=scaling,
            enable_gqa=True,
        )
        out[b, q_start:] = o[0].transpose(0, 1)
    return out, None


_registered = False


def register_rowwise_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ROWWISE_ATTENTION, rowwise_attention)
        _registered = True
