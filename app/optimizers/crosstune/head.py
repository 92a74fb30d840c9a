"""CrossTune's label-enhanced cross-attention head: a small network over frozen feature vectors, trained on CPU.

Shapes: an input's feature x (D values, from the scorer's `features`), the label descriptions' features E (L x D, one
row per label, in label order). Both are standardised with the training inputs' per-dimension mean and std (LM hidden
states have a few dimensions of huge magnitude), then

    u = LayerNorm(x W_p + b_p)                   the input, projected to `hidden` values
    e = LayerNorm(E W_p + b_p)                   the label descriptions, through the same projection
    c = MultiHead(q = u W_q, k = e W_k, v = e W_v) W_o     the input attends over the label descriptions
    logits = (u + c) W_c + b_c                   one logit per label

`MultiHead` splits `hidden` into `heads` parts, each a softmax over the L descriptions of the scaled dot products
q_h . k_h,l / sqrt(hidden / heads). Training: cross-entropy
(per-example weights), AdamW, minibatches, dropout on u and u + c; after every epoch the dev split is scored and the
best epoch kept (dev accuracy, then dev loss); training stops after `patience` epochs without a better one. Every
random draw (initial weights, batch order, dropout masks) comes from one `torch.Generator` seeded by the caller, so
the same data and seed give the same head.

Weights are plain float32 arrays, stored as base64 in JSON (`to_json` / `from_json`); inference is the same
forward pass without dropout. Everything here is synchronous and CPU-bound: call it from a thread.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Weight name -> shape, from (D features, hidden, L labels).
_SHAPES = {
    "proj_w": ("D", "H"),
    "proj_b": ("H",),
    "norm_w": ("H",),
    "norm_b": ("H",),
    "q_w": ("H", "H"),
    "k_w": ("H", "H"),
    "v_w": ("H", "H"),
    "o_w": ("H", "H"),
    "cls_w": ("H", "L"),
    "cls_b": ("L",),
}
# Standard deviations below this are taken as this (constant dimensions).
_MIN_STD = 1e-4


@dataclass(frozen=True, slots=True)
class HeadSettings:
    hidden: int = 64
    heads: int = 4
    dropout: float = 0.1
    learning_rate: float = 5e-3
    weight_decay: float = 0.01
    max_epochs: int = 200
    patience: int = 30
    batch_size: int = 16


@dataclass(slots=True)
class Head:
    """A trained head: its weights, the standardisation, the label descriptions' features, the label order."""

    labels: list[str]
    heads: int
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    label_features: np.ndarray  # (L, D), raw (not standardised)
    weights: dict[str, np.ndarray]

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.weights["proj_b"].shape[0])

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """p(label | input) for each row of `features` (N x D), N x L."""
        import torch

        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the head takes {self.dim} features per input, not shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        params = {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in self.weights.items()}
        with torch.inference_mode():
            logits = _forward(params, self._standardise(x), self._standardise(self.label_features), self.heads)
            return torch.softmax(logits, dim=-1).numpy()

    def predict(self, features: np.ndarray) -> list[str]:
        return [self.labels[i] for i in self.probabilities(features).argmax(axis=1)]

    def _standardise(self, x: np.ndarray):
        import torch

        return torch.from_numpy(((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32))

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "heads": self.heads,
            "hidden": self.hidden,
            "dim": self.dim,
            "mean": encode_array(self.mean),
            "std": encode_array(self.std),
            "label_features": encode_array(self.label_features),
            "weights": {name: encode_array(self.weights[name]) for name in _SHAPES},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Head:
        head = cls(
            labels=list(data["labels"]),
            heads=int(data["heads"]),
            mean=decode_array(data["mean"]),
            std=decode_array(data["std"]),
            label_features=decode_array(data["label_features"]),
            weights={name: decode_array(data["weights"][name]) for name in _SHAPES},
        )
        sizes = {"D": head.dim, "H": int(data["hidden"]), "L": len(head.labels)}
        for name, shape in _SHAPES.items():
            wanted = tuple(sizes[s] for s in shape)
            if head.weights[name].shape != wanted:
                raise ValueError(f"head weight {name} has shape {head.weights[name].shape}, wanted {wanted}")
        if head.label_features.shape != (sizes["L"], sizes["D"]) or head.std.shape != (sizes["D"],):
            raise ValueError("the head's label features or standardisation do not fit its size")
        return head

    def digest(self) -> str:
        """A short hash of the weights: names the head among candidates."""
        h = hashlib.sha256()
        for name in _SHAPES:
            h.update(np.ascontiguousarray(self.weights[name], dtype="<f4").tobytes())
        return h.hexdigest()[:12]


@dataclass(slots=True)
class TrainReport:
    epochs: int
    best_epoch: int
    train_accuracy: float
    dev_accuracy: float | None
    dev_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "train_accuracy": round(self.train_accuracy, 6),
            "dev_accuracy": None if self.dev_accuracy is None else round(self.dev_accuracy, 6),
            "dev_loss": None if self.dev_loss is None else round(self.dev_loss, 6),
        }


def encode_array(array: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(data: dict[str, Any]) -> np.ndarray:
    flat = np.frombuffer(base64.b64decode(data["data"]), dtype="<f4")
    shape = tuple(int(s) for s in data["shape"])
    if flat.size != math.prod(shape):
        raise ValueError(f"an array of shape {shape} holds {flat.size} values")
    return flat.reshape(shape).astype(np.float32)


def _forward(params: dict, x, e, heads: int, dropout: float = 0.0, generator=None):
    """Logits (N x L) from standardised inputs x (N x D) and label features e (L x D); dropout only with a
    generator (training)."""
    import torch
    import torch.nn.functional as F

    hidden = params["proj_b"].shape[0]

    def project(t):
        return F.layer_norm(t @ params["proj_w"] + params["proj_b"], (hidden,), params["norm_w"], params["norm_b"])

    def drop(t):
        if generator is None or dropout <= 0.0:
            return t
        keep = (torch.rand(t.shape, generator=generator) >= dropout).to(t.dtype)
        return t * keep / (1.0 - dropout)

    u = drop(project(x))
    labels = project(e)
    n, size = u.shape[0], hidden // heads
    q = (u @ params["q_w"]).view(n, heads, size)
    k = (labels @ params["k_w"]).view(-1, heads, size)
    v = (labels @ params["v_w"]).view(-1, heads, size)
    scores = torch.einsum("nhs,lhs->nhl", q, k) / math.sqrt(size)
    context = torch.einsum("nhl,lhs->nhs", torch.softmax(scores, dim=-1), v).reshape(n, hidden) @ params["o_w"]
    return drop(u + context) @ params["cls_w"] + params["cls_b"]


def _initial_weights(dim: int, hidden: int, n_labels: int, generator) -> dict:
    import torch

    sizes = {"D": dim, "H": hidden, "L": n_labels}
    params = {}
    for name, shape in _SHAPES.items():
        dims = tuple(sizes[s] for s in shape)
        if name == "norm_w":
            params[name] = torch.ones(dims)
        elif len(dims) == 1:
            params[name] = torch.zeros(dims)
        else:
            params[name] = torch.randn(dims, generator=generator) / math.sqrt(dims[0])
        params[name].requires_grad_(True)
    return params


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), _MIN_STD).astype(np.float32)


def train_head(
    labels: list[str],
    label_features: np.ndarray,
    train_x: np.ndarray,
    train_y: np.ndarray,
    dev_x: np.ndarray | None,
    dev_y: np.ndarray | None,
    settings: HeadSettings,
    seed: int,
    *,
    weights: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> tuple[Head, TrainReport]:
    """Train a head on (train_x, train_y label indices), choosing the epoch on (dev_x, dev_y) when given (else the
    last). `weights`: per training example (default 1); `reference`: the inputs the standardisation is measured on
    (default train_x)."""
    import torch
    import torch.nn.functional as F

    train_x = np.asarray(train_x, dtype=np.float32)
    label_features = np.asarray(label_features, dtype=np.float32)
    n, dim = train_x.shape
    if n == 0:
        raise ValueError("the head needs at least one training example")
    if label_features.shape != (len(labels), dim):
        raise ValueError(f"label features of shape {label_features.shape} for {len(labels)} labels of {dim} values")
    if settings.hidden % settings.heads:
        raise ValueError("hidden must be a multiple of heads")
    mean, std = standardisation(train_x if reference is None else reference)

    def standard(a: np.ndarray):
        return torch.from_numpy(((np.asarray(a, dtype=np.float32) - mean) / std).astype(np.float32))

    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    params = _initial_weights(dim, settings.hidden, len(labels), generator)
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    x, y = standard(train_x), torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    w = torch.ones(n) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    e = standard(label_features)
    has_dev = dev_x is not None and dev_y is not None and len(dev_y) > 0
    if has_dev:
        dx, dy = standard(dev_x), torch.as_tensor(np.asarray(dev_y), dtype=torch.long)

    def snapshot() -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in params.items()}

    best: tuple[float, float] | None = None
    best_weights, best_epoch, since = snapshot(), 0, 0
    best_dev: tuple[float | None, float | None] = (None, None)
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, settings.max_epochs + 1):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            logits = _forward(params, x[batch], e, settings.heads, settings.dropout, generator)
            loss = (F.cross_entropy(logits, y[batch], reduction="none") * w[batch]).sum() / w[batch].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if not has_dev:
            continue
        with torch.no_grad():
            dev_logits = _forward(params, dx, e, settings.heads)
            dev_loss = float(F.cross_entropy(dev_logits, dy))
            dev_accuracy = float((dev_logits.argmax(dim=1) == dy).float().mean())
        history.append({"epoch": epoch, "dev_accuracy": dev_accuracy, "dev_loss": dev_loss})
        rank = (dev_accuracy, -dev_loss)
        if best is None or rank > best:
            best, best_weights, best_epoch, since = rank, snapshot(), epoch, 0
            best_dev = (dev_accuracy, dev_loss)
        else:
            since += 1
            if since >= settings.patience:
                break
    if not has_dev:
        best_weights, best_epoch = snapshot(), epoch
    head = Head(list(labels), settings.heads, mean, std, label_features.copy(), best_weights)
    train_accuracy = float((head.probabilities(train_x).argmax(axis=1) == np.asarray(train_y)).mean())
    return head, TrainReport(epoch, best_epoch, train_accuracy, best_dev[0], best_dev[1], history)
