"""What CrossTune asks the optimizer LLM, and the switch that keeps or drops the examples it writes.

- Label descriptions: one greedy generation per label without a given description, showing the task's instruction,
  the label set and a few training inputs of that label.
- Augmentation: one sampled request per label (`n` samples, seeded, hence cached), showing a few training examples
  with their labels (in context) and asking for a new input of that label.
- The switch: a generated example is kept only if a judge trained on real data agrees with its intended label:
  the head trained on the real examples (`head`: its argmax is the intended label with probability at least the
  threshold), or the nearest class centroid of the real examples' standardised features (`centroid`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from app.evaluation.task import Example
from app.optimizers.crosstune.head import Head, standardisation

# A demonstration's input is cut to this many characters in the LLM's prompt.
DEMONSTRATION_CHARS = 300
# A generated input longer than this is cut.
GENERATED_CHARS = 600
_LEADING_TAG = re.compile(r"^\s*(?:new\s+)?(?:text|input|example)\s*\d*\s*:\s*", re.IGNORECASE)
_TRAILING_LABEL = re.compile(r"\n\s*(?:label|category|answer)\s*:.*$", re.IGNORECASE | re.DOTALL)
# Lines of our own prompts that a small model repeats instead of answering.
_ECHO = re.compile(
    r"^\s*(?:the task:|possible labels:|some texts labelled|examples:|write one new text|in one sentence)", re.I
)


def _cut(text: str, limit: int = DEMONSTRATION_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _task_line(instruction: str) -> str:
    instruction = " ".join(instruction.split())
    return f"The task: {instruction}" if instruction else "The task: classify each text."


def description_prompt(instruction: str, labels: Sequence[str], label: str, shown: Sequence[str]) -> str:
    """Ask for one sentence saying what the inputs of `label` have in common."""
    lines = [
        _task_line(instruction),
        "Possible labels: " + ", ".join(f'"{name}"' for name in labels) + ".",
    ]
    if shown:
        lines.append(f'Some texts labelled "{label}":')
        lines += [f"- {_cut(text)}" for text in shown]
    lines.append(
        f'In one sentence, describe what a text labelled "{label}" is like, so that someone could recognise one. '
        "Reply with that sentence only."
    )
    return "\n".join(lines)


def augmentation_prompt(instruction: str, labels: Sequence[str], label: str, shown: Sequence[Example]) -> str:
    """Ask for one new input of `label`, after labelled examples (in context)."""
    lines = [
        _task_line(instruction),
        "Possible labels: " + ", ".join(f'"{name}"' for name in labels) + ".",
        "",
        "Examples:",
    ]
    for example in shown:
        lines += [f"Text: {_cut(example.input)}", f"Label: {example.target}", ""]
    lines.append(
        f'Write one new text, different from the examples, whose label is "{label}". '
        "Reply with the text only, without its label."
    )
    return "\n".join(lines)


def _without_echo(text: str) -> str:
    """`text` without the lines that repeat our prompt; empty if a line left still quotes its label list."""
    lines = [line for line in text.strip().splitlines() if not _ECHO.match(line)]
    kept = "\n".join(lines).strip()
    return "" if "Possible labels:" in kept else kept


def clean_description(text: str, label: str) -> str:
    """The first paragraph of a generated description, without echoes of the prompt; the label itself where
    nothing usable came back."""
    text = _without_echo(text).split("\n\n")[0].strip().strip('"').strip()
    return " ".join(text.split())[:GENERATED_CHARS] or label


def clean_generated(text: str) -> str:
    """A generated input without a leading "Text:" tag, a trailing "Label: ..." line, surrounding quotes or echoes of
    the prompt."""
    text = _TRAILING_LABEL.sub("", _without_echo(text))
    text = _LEADING_TAG.sub("", text).strip()
    text = text.split("\n\n")[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text[:GENERATED_CHARS]


def pick_shown(
    targets: Sequence[str], labels: Sequence[str], label: str, k: int, rng: np.random.Generator
) -> list[int]:
    """Positions of `k` training examples to show when asking for `label`: one of `label` first where there is one,
    then the others at random (the shown examples in a random order)."""
    own = [i for i, t in enumerate(targets) if t == label]
    rest = [i for i, t in enumerate(targets) if t in labels]
    if k <= 0 or not rest:
        return []
    chosen: list[int] = []
    if own:
        chosen.append(int(rng.choice(own)))
    others = [i for i in rest if i not in chosen]
    take = min(k - len(chosen), len(others))
    if take > 0:
        chosen += [int(i) for i in rng.choice(others, size=take, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def switch_by_head(
    head: Head, features: np.ndarray, intended: Sequence[int], threshold: float
) -> tuple[list[bool], list[float]]:
    """Keep a generated example when the head trained on real data predicts its intended label, with probability
    at least `threshold`. Returns (kept, that probability) per example."""
    if len(intended) == 0:
        return [], []
    probs = head.probabilities(features)
    kept, confidence = [], []
    for row, label in zip(probs, intended, strict=True):
        p = float(row[label])
        kept.append(int(row.argmax()) == label and p >= threshold)
        confidence.append(p)
    return kept, confidence


def switch_by_centroid(
    real_features: np.ndarray, real_labels: Sequence[int], features: np.ndarray, intended: Sequence[int], n_labels: int
) -> tuple[list[bool], list[float]]:
    """Keep a generated example when, of the real examples' class centroids (standardised features, cosine), its
    intended label's is the nearest. Returns (kept, the cosine to the intended centroid) per example."""
    if len(intended) == 0:
        return [], []
    mean, std = standardisation(real_features)
    real = (np.asarray(real_features, dtype=np.float64) - mean) / std
    gen = (np.asarray(features, dtype=np.float64) - mean) / std
    labels = np.asarray(real_labels)
    centroids = np.zeros((n_labels, real.shape[1]))
    for c in range(n_labels):
        if (labels == c).any():
            centroids[c] = real[labels == c].mean(axis=0)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

    cosines = unit(gen) @ unit(centroids).T
    present = np.array([(labels == c).any() for c in range(n_labels)])
    cosines[:, ~present] = -np.inf
    kept = [int(row.argmax()) == label for row, label in zip(cosines, intended, strict=True)]
    return kept, [float(row[label]) for row, label in zip(cosines, intended, strict=True)]
