"""Calibration of label probabilities, as pure functions on (inputs x labels) tables.

A label task's scorer gives, for each input x, one log-prob per label (its verbalizer's first token after the
prompt). `label_distribution` turns a row into p(y|x): a softmax over the labels. Calibration then rescales
p(y|x) before the argmax that predicts the label:

- `cbm`, calibration by marginalization (Yang et al., TACL 2024): p~(y|x) = p(y|x) / m(y), renormalized over the
  labels, with m(y) the mean of p(y|x') over a set of reference inputs x' (by default the inputs being scored).
  A label every reference input gives probability 0 (a verbalizer the backend never saw) keeps probability 0.
- `contextual`, contextual calibration (Zhao et al., ICML 2021): p~(y|x) = p(y|x) / p(y|c), renormalized, with c
  a content-free input ("N/A") rendered with the same prompt. Zhao et al. apply a softmax to the rescaled
  probabilities; a sum-normalization has the same argmax, which is what a prediction uses.

`none` leaves p(y|x) as it is. Ties in the argmax go to the first label, as in the uncalibrated evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Calibration = Literal["none", "cbm", "contextual"]
CALIBRATIONS: tuple[str, ...] = ("none", "cbm", "contextual")
# The content-free input of contextual calibration: rendered into the task's template with the prompt.
CONTENT_FREE_INPUT = "N/A"
# A finite stand-in for -inf (a verbalizer the backend could not see): the evaluation cache stores it so.
_FLOOR = -1e9
# p(y|c) below this counts as this, so a label the content-free input never predicts does not divide by zero.
_MIN_CONTENT_FREE = 1e-12


def label_distribution(logprobs: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(inputs, labels) log-probs -> p(y|x): per row, a softmax over the labels (float64). -inf and NaN count as
    the floor, so a row whose labels were all unseen is uniform."""
    lp = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=_FLOOR, neginf=_FLOOR, posinf=-_FLOOR)
    if lp.ndim != 2:
        raise ValueError("a label table has one row per input and one column per label")
    lp = np.maximum(lp, _FLOOR)
    shifted = np.exp(lp - lp.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _renormalize(scaled: np.ndarray) -> np.ndarray:
    total = scaled.sum(axis=1, keepdims=True)
    return scaled / np.where(total > 0, total, 1.0)


def marginal(probs: np.ndarray) -> np.ndarray:
    """m(y) = mean over the rows of p(y|x): the vector CBM divides by."""
    return np.asarray(probs, dtype=np.float64).mean(axis=0)


def cbm(probs: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Calibration by marginalization of a (inputs, labels) distribution table: divide each column by its mean
    over `reference` (another table of the same prompt, or the mean vector itself; default: `probs`), then
    renormalize each row."""
    probs = np.asarray(probs, dtype=np.float64)
    if reference is None:
        mean = marginal(probs)
    else:
        reference = np.asarray(reference, dtype=np.float64)
        mean = marginal(reference) if reference.ndim == 2 else reference
    if mean.shape != probs.shape[1:]:
        raise ValueError("the reference has another number of labels")
    scaled = np.divide(probs, mean, out=np.zeros_like(probs), where=mean > 0)
    return _renormalize(scaled)


def contextual(probs: np.ndarray, content_free: Sequence[float] | np.ndarray) -> np.ndarray:
    """Contextual calibration of a (inputs, labels) distribution table by the distribution `content_free` the
    same prompt gives the content-free input."""
    probs = np.asarray(probs, dtype=np.float64)
    base = np.maximum(np.asarray(content_free, dtype=np.float64), _MIN_CONTENT_FREE)
    if base.shape != probs.shape[1:]:
        raise ValueError("the content-free distribution has another number of labels")
    return _renormalize(probs / base)


def calibrate(
    probs: np.ndarray,
    calibration: str,
    *,
    reference: np.ndarray | None = None,
    content_free: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """`probs` after `calibration` ("none", "cbm" with an optional reference, "contextual" with the content-free
    distribution)."""
    if calibration == "none":
        return np.asarray(probs, dtype=np.float64)
    if calibration == "cbm":
        return cbm(probs, reference)
    if calibration == "contextual":
        if content_free is None:
            raise ValueError("contextual calibration needs the content-free input's distribution")
        return contextual(probs, content_free)
    raise ValueError(f"unknown calibration {calibration!r}; allowed: {', '.join(CALIBRATIONS)}")


def argmax_labels(probs: np.ndarray) -> list[int]:
    """Per row, the index of the most probable label (ties: the first)."""
    return [int(i) for i in np.argmax(np.asarray(probs), axis=1)]
