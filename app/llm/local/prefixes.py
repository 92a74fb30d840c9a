"""Forward passes with a soft prompt (a `ContinuousPrefix`) for the local backend, and the statistics that scale them.

- input prefix (BBT "prepend"): new vectors in the input embeddings, after the row's leading special tokens;
- deep prefix (BBTv2 "prepend"): key/value vectors at the front of every layer's cache;
- additive input prefix (BBT "add"): vectors added to the input embeddings of the row's placeholder tokens;
- additive deep prefix (BBTv2 "add"): vectors added to the hidden states of the placeholder tokens before every
  decoder layer, by forward pre-hooks that live for one forward pass.

The additive kinds change no other position, so all-zero vectors give exactly the plain prompt's numbers.

Functions take the backend and run on its executor thread.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from app.llm.port import BackendError, ContinuousPrefix, PrefixKind, soft_prompt_position


def forward_input_prefix(backend, ids: list[list[int]], prefixes: list[ContinuousPrefix]):
    """Each row: its leading special tokens, its prefix vectors, then its other tokens' embeddings;
    left-padded with zero vectors."""
    import torch

    embed = backend._model.get_input_embeddings()
    dtype = embed.weight.dtype
    rows = []
    for seq, p in zip(ids, prefixes, strict=True):
        head = soft_prompt_position(seq, backend._special_prefix)
        tokens = embed(torch.tensor(seq, dtype=torch.long))
        rows.append(torch.cat([tokens[:head], torch.tensor(p.vectors, dtype=dtype), tokens[head:]]))
    width = max(len(r) for r in rows)
    embeds = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        embeds[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return backend._forward(None, mask, positions, inputs_embeds=embeds)[0]


def forward_deep_prefix(backend, ids: list[list[int]], prefixes: list[ContinuousPrefix]):
    """Each layer's cache starts with the row's prefix keys/values (P virtual tokens); the row's tokens follow
    (left-padded) at positions P, P+1, ... A fresh cache per forward: the model appends to it in place."""
    import torch
    from transformers import DynamicCache

    input_ids, mask, positions = backend._left_pad(ids)
    length = prefixes[0].length
    dtype = backend._model.get_input_embeddings().weight.dtype
    # (batch, layers, 2, kv_heads, P, head_dim)
    stacked = torch.tensor(np.stack([p.vectors for p in prefixes]), dtype=dtype)
    cache = DynamicCache(config=backend._model.config)
    for layer in range(stacked.shape[1]):
        cache.update(stacked[:, layer, 0].contiguous(), stacked[:, layer, 1].contiguous(), layer)
    full_mask = torch.cat([torch.ones((len(ids), length), dtype=mask.dtype), mask], dim=1)
    return backend._forward(input_ids, full_mask, positions + length, cache=cache)[0]


def forward_input_add(backend, ids: list[list[int]], prefixes: list[ContinuousPrefix], spans: list[tuple[int, int]]):
    """The rows' token embeddings (left-padded as plain prompts are), with row j of each prefix added to the j-th
    placeholder token of its row."""
    import torch

    input_ids, mask, positions = backend._left_pad(ids)
    embeds = backend._model.get_input_embeddings()(input_ids)
    width = input_ids.shape[1]
    for b, (seq, prefix, (start, end)) in enumerate(zip(ids, prefixes, spans, strict=True)):
        pad = width - len(seq)
        embeds[b, pad + start : pad + end] += torch.tensor(prefix.vectors[: end - start], dtype=embeds.dtype)
    return backend._forward(None, mask, positions, inputs_embeds=embeds)[0]


def _decoder_layers(model):
    return model.get_decoder().layers


@contextlib.contextmanager
def _layer_pre_hooks(model, hook):
    """`hook(layer, hidden_states) -> hidden_states` before every decoder layer, for forwards on this thread
    only (a test may drive the same model from another thread), removed on exit."""
    owner = threading.get_ident()

    def make(layer: int):
        def pre_hook(module, args, kwargs):
            if threading.get_ident() != owner:
                return None
            if args:
                return (hook(layer, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hook(layer, kwargs["hidden_states"])}

        return pre_hook

    handles = [
        module.register_forward_pre_hook(make(layer), with_kwargs=True)
        for layer, module in enumerate(_decoder_layers(model))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_deep_add(backend, ids: list[list[int]], prefixes: list[ContinuousPrefix], spans: list[tuple[int, int]]):
    """The plain forward of the rows, with prefix[l, j] added to the hidden state of the row's j-th placeholder
    token before decoder layer l. Positions are found per row (left padding differs from row to row)."""
    import torch

    input_ids, mask, positions = backend._left_pad(ids)
    width = input_ids.shape[1]
    dtype = backend._model.get_input_embeddings().weight.dtype
    batch_index, token_index, parts = [], [], []
    for b, (seq, prefix, (start, end)) in enumerate(zip(ids, prefixes, spans, strict=True)):
        pad = width - len(seq)
        batch_index += [b] * (end - start)
        token_index += range(pad + start, pad + end)
        parts.append(prefix.vectors[:, : end - start])  # (layers, n, hidden)
    where = (torch.tensor(batch_index, dtype=torch.long), torch.tensor(token_index, dtype=torch.long))
    deltas = torch.tensor(np.concatenate(parts, axis=1), dtype=dtype)  # (layers, entries, hidden)

    def add(layer: int, hidden):
        return hidden.index_put(where, deltas[layer].to(hidden.dtype), accumulate=True)

    with _layer_pre_hooks(backend._model, add):
        return backend._forward(input_ids, mask, positions)[0]


def hidden_statistics_sync(backend, encoded: list[list[int]], clip_rounds: int) -> list[float]:
    """Per decoder layer: the clipped std of its input hidden states over the real tokens of `encoded`."""
    import torch

    per_layer: dict[int, list] = {}
    real = None

    def collect(layer: int, hidden):
        per_layer.setdefault(layer, []).append(hidden[real].float().flatten())
        return hidden

    with torch.inference_mode(), _layer_pre_hooks(backend._model, collect):
        for chunk in backend._chunks(list(range(len(encoded))), lambda i: len(encoded[i])):
            input_ids, mask, positions = backend._left_pad([encoded[i] for i in chunk])
            real = mask.bool()
            backend._forward(input_ids, mask, positions)
    return [_clipped_std(per_layer[layer], clip_rounds) for layer in sorted(per_layer)]


def _clipped_std(parts: list, clip_rounds: int) -> float:
    import torch

    x = torch.cat(parts)
    for _ in range(clip_rounds):
        mean, std = x.mean(), x.std()
        x = x.clamp(mean - 3 * std, mean + 3 * std)
    return float(x.std())


def check_prefix(geometry: dict, prefix: ContinuousPrefix, index: int) -> None:
    """Refuse a prefix whose shape does not fit the model's `geometry`."""
    if prefix.kind == PrefixKind.INPUT:
        expected = (prefix.length, geometry["hidden_size"])
    elif prefix.kind == PrefixKind.INPUT_ADD:
        expected = (prefix.rows, geometry["hidden_size"])
    elif prefix.kind == PrefixKind.DEEP_ADD:
        expected = (geometry["num_layers"], prefix.rows, geometry["hidden_size"])
    else:
        expected = (geometry["num_layers"], 2, geometry["num_kv_heads"], prefix.length, geometry["head_dim"])
    if tuple(prefix.vectors.shape) != expected:
        raise BackendError(
            f"request {index}: {prefix.kind.value} prefix of shape {tuple(prefix.vectors.shape)} does not fit "
            f"this model (expected {expected})"
        )


def kv_statistics_sync(backend, encoded: list[list[int]], clip_rounds: int) -> list[tuple[float, float]]:
    import torch
    from transformers import DynamicCache

    keys: list[list] = []
    values: list[list] = []
    with torch.inference_mode():
        for chunk in backend._chunks(list(range(len(encoded))), lambda i: len(encoded[i])):
            input_ids, mask, positions = backend._left_pad([encoded[i] for i in chunk])
            cache = DynamicCache(config=backend._model.config)
            backend._forward(input_ids, mask, positions, cache=cache, use_cache=True)
            real = mask.bool()  # (batch, width)
            for layer, cached in enumerate(cache.layers):
                if layer == len(keys):
                    keys.append([])
                    values.append([])
                # (batch, kv_heads, width, head_dim) -> real tokens only
                keys[layer].append(cached.keys.permute(0, 2, 1, 3)[real].float().flatten())
                values[layer].append(cached.values.permute(0, 2, 1, 3)[real].float().flatten())

    def clipped_std(parts: list) -> float:
        x = torch.cat(parts)
        for _ in range(clip_rounds):
            mean, std = x.mean(), x.std()
            x = x.clamp(mean - 3 * std, mean + 3 * std)
        return float(x.std())

    return [(clipped_std(k), clipped_std(v)) for k, v in zip(keys, values, strict=True)]
