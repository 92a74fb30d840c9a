"""Per-example metrics; a prompt's score is their mean. Each returns a value in [0, 1]."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize(prediction) == normalize(target))


def contains(prediction: str, target: str) -> float:
    return float(normalize(target) in normalize(prediction))


def label_accuracy(prediction: str, target: str) -> float:
    return float(prediction.strip().lower() == target.strip().lower())


def _last_number(text: str) -> float | None:
    # Prefer the number after an answer cue ("answer is 42", "#### 42"), else the last number.
    lowered = text.lower()
    for cue in ("####", "answer is", "answer:"):
        at = lowered.rfind(cue)
        if at >= 0:
            found = _NUMBER.findall(text[at + len(cue) :])
            if found:
                return float(found[0].replace(",", ""))
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric(prediction: str, target: str) -> float:
    predicted, expected = _last_number(prediction), _last_number(target)
    if predicted is None or expected is None:
        return 0.0
    # OPRO compares after rounding to 0 decimals.
    return float(round(predicted) == round(expected))


def f1(prediction: str, target: str) -> float:
    pred_tokens, gold_tokens = normalize(prediction).split(), normalize(target).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "label_accuracy": label_accuracy,
    "numeric": numeric,
    "f1": f1,
}


def parse_label(text: str, labels: list[str]) -> str:
    """The label a free-text answer names: the earliest whole-word mention, else ''."""
    lowered = text.lower()
    best, best_at = "", len(lowered) + 1
    for label in labels:
        match = re.search(r"(?<![a-z0-9])" + re.escape(label.lower()) + r"(?![a-z0-9])", lowered)
        if match and match.start() < best_at:
            best, best_at = label, match.start()
    return best
