"""Random projections from CMA-ES's low-dimensional z to prompt vectors, and the artifact that rebuilds them.

BBT (input layer): p = A z, A of shape (d, n * hidden), entries ~ N(0, (alpha * s / (sqrt(d) * sigma))^2) with
s the std of the embedding matrix. In the "add" form p is added to the embeddings of the n placeholder tokens
(the first n tokens of the instruction); in the "prepend" form it is n new vectors before the prompt.

BBTv2 "add" form: one A_l of shape (d, n * hidden) per decoder layer, scaled by that layer's clipped
hidden-state std; A_l z_l is added to the placeholder tokens' hidden states before layer l. "prepend" form:
key/value prefixes, one A_l per layer of shape (d, 2 * kv_heads * n * head_dim), its key half scaled by that
layer's clipped key-state std and its value half by the value-state std.

A is never stored: it is drawn from a generator seeded by (job seed, layer), so the artifact needs only z, the
seed, the scales and the form. Artifact versions: 1 (before the additive forms; always "prepend") still loads,
as the prepend form it was; 2 records `insertion` ("add" or "prepend") and `placeholder` ("instruction": the
tokens of `text` in the prompt).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from app.evaluation.evaluator import SoftPrompt
from app.llm.port import ContinuousPrefix, PrefixKind
from app.optimizers.base import derived_rng

_PROJECTION_PURPOSE = 401
ARTIFACT_VERSION = 2
INSERTIONS = ("add", "prepend")


def projection_std(alpha: float, scale: float, dim: int, sigma: float) -> float:
    return alpha * scale / (math.sqrt(dim) * sigma)


def input_projection(seed: int, dim: int, length: int, hidden: int, std: float) -> np.ndarray:
    """A for BBT: (dim, length * hidden), float32."""
    rng = derived_rng(seed, _PROJECTION_PURPOSE, 0)
    return rng.standard_normal((dim, length * hidden), dtype=np.float32) * np.float32(std)


def layer_projection(
    seed: int, layer: int, dim: int, length: int, kv_heads: int, head_dim: int, key_std: float, value_std: float
) -> np.ndarray:
    """A_l for BBTv2: (dim, 2 * kv_heads * length * head_dim), float32, keys first."""
    rng = derived_rng(seed, _PROJECTION_PURPOSE, 1 + layer)
    half = kv_heads * length * head_dim
    a = rng.standard_normal((dim, 2, half), dtype=np.float32)
    a[:, 0] *= np.float32(key_std)
    a[:, 1] *= np.float32(value_std)
    return a.reshape(dim, 2 * half)


def hidden_layer_vectors(seed: int, layer: int, z: np.ndarray, length: int, hidden: int, std: float) -> np.ndarray:
    """BBTv2 (add form): one layer's (length, hidden) additive vectors A_l z; all zeros for z = 0 without drawing
    A_l."""
    if not np.any(z):
        return np.zeros((length, hidden), dtype=np.float32)
    rng = derived_rng(seed, _PROJECTION_PURPOSE, 1 + layer)
    a = rng.standard_normal((len(z), length * hidden), dtype=np.float32) * np.float32(std)
    return project(z, a).reshape(length, hidden)


def project(z: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.asarray(z, dtype=np.float32) @ a


def describe(artifact: dict[str, Any]) -> str:
    """The text shown as `prompt` for a soft prompt: what it is, and a digest of its z that names it."""
    payload = json.dumps(artifact["z"], separators=(",", ":")).encode()
    digest = hashlib.sha256(payload).hexdigest()[:12]
    where = (
        "at the input layer"
        if artifact["method"] == "bbt"
        else f"at each of {artifact['geometry']['num_layers']} layers"
    )
    what = "vectors" if artifact.get("insertion", "prepend") == "prepend" else "vectors added to the instruction"
    return (
        f"[{artifact['method']} soft prompt: {artifact['prompt_length']} {what} {where}, "
        f"d={artifact['intrinsic_dim']}, z {digest}] {artifact['text']}"
    ).rstrip()


def soft_prompt_from_artifact(artifact: dict[str, Any]) -> SoftPrompt:
    """Rebuild the prompt vectors from an artifact (projection seed, scales and z) and wrap them for scoring."""
    version = artifact.get("version")
    if version not in (1, ARTIFACT_VERSION):
        raise ValueError(f"unsupported artifact version {version!r}")
    insertion = artifact.get("insertion", "prepend") if version == ARTIFACT_VERSION else "prepend"
    if insertion not in INSERTIONS:
        raise ValueError(f"unsupported soft prompt insertion {insertion!r}")
    geometry = artifact["geometry"]
    dim, length = artifact["intrinsic_dim"], artifact["prompt_length"]
    if insertion == "add":
        if artifact.get("placeholder") != "instruction" or not artifact["text"]:
            raise ValueError(f"unsupported placeholder {artifact.get('placeholder')!r} for an additive soft prompt")
        hidden = geometry["hidden_size"]
        if artifact["method"] == "bbt":
            a = input_projection(artifact["projection_seed"], dim, length, hidden, artifact["std"])
            vectors = project(np.asarray(artifact["z"]), a).reshape(length, hidden)
            prefix = ContinuousPrefix.of(PrefixKind.INPUT_ADD, vectors, anchor=artifact["text"])
        else:
            layers = [
                hidden_layer_vectors(artifact["projection_seed"], layer, np.asarray(z), length, hidden, std)
                for layer, (z, std) in enumerate(zip(artifact["z"], artifact["stds"], strict=True))
            ]
            prefix = ContinuousPrefix.of(PrefixKind.DEEP_ADD, np.stack(layers), anchor=artifact["text"])
    elif artifact["method"] == "bbt":
        a = input_projection(artifact["projection_seed"], dim, length, geometry["hidden_size"], artifact["std"])
        vectors = project(np.asarray(artifact["z"]), a).reshape(length, geometry["hidden_size"])
        prefix = ContinuousPrefix.of(PrefixKind.INPUT, vectors)
    else:
        layers = []
        for layer, (z, (key_std, value_std)) in enumerate(zip(artifact["z"], artifact["stds"], strict=True)):
            layers.append(
                layer_vectors(artifact["projection_seed"], layer, np.asarray(z), geometry, length, key_std, value_std)
            )
        prefix = ContinuousPrefix.of(PrefixKind.DEEP, np.stack(layers))
    return SoftPrompt(describe(artifact), artifact["text"], prefix)


def layer_vectors(
    seed: int, layer: int, z: np.ndarray, geometry: dict, length: int, key_std: float, value_std: float
) -> np.ndarray:
    """One layer's (2, kv_heads, length, head_dim) prefix from its z; all zeros for z = 0 without drawing A."""
    shape = (2, geometry["num_kv_heads"], length, geometry["head_dim"])
    if not np.any(z):
        return np.zeros(shape, dtype=np.float32)
    a = layer_projection(
        seed, layer, len(z), length, geometry["num_kv_heads"], geometry["head_dim"], key_std, value_std
    )
    return project(z, a).reshape(shape)
