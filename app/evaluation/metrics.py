"""Per-example metrics; a prompt's score is their mean. Each returns a value in [0, 1]."""

from __future__ import annotations

import functools
import json
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


# --- answer_match: pull the answer out of generated text (as OPRO's evaluation does), then compare ---------------

# A model that goes on to write the next few-shot question: only the text before a line-start "Q:" is its answer.
_NEXT_QUESTION = re.compile(r"\n\s*Q:")
# Answer cues; the answer is what follows the last one. "A:" counts only at a line start (an echo of the template's
# "A:"); inside a line it is more likely an option label.
_CUE = re.compile(r"(?i:answer\s+is|answer\s*:|####)|^[ \t]*A:", re.MULTILINE)
# "(B) is the correct answer": the answer is the sentence before it. Used only when no cue above is present.
_CUE_AHEAD = re.compile(r"\bis\s+the\s+(?:correct\s+|right\s+|final\s+)?answer\b", re.IGNORECASE)
# "The sorted words are: ...": used only when neither of the above is present.
_CUE_SECONDARY = re.compile(r"\b(?:is|are):", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")

_OPTION_TARGET = re.compile(r"\(([A-Za-z])\)|([A-Z])")
# An option named anywhere: "(B)", "option B", "choice (B)", "B)".
_OPTION = re.compile(r"\(([A-Za-z])\)|\b(?i:option|choice)\s+\(?([A-Z])\b|(?<![\w(])([A-Z])\)")
# A bare letter as the answer's first token: "B", "B.", "B, because" — but not the article in "A kite".
_BARE_OPTION = re.compile(r"[\s*\"'`:]*([A-Z])(?=$|[).,;:!?*\"'\n]|\s+(?:because|since|as)\b)")
_BOOLEANS = {"true": "false", "false": "true", "valid": "invalid", "invalid": "valid", "yes": "no", "no": "yes"}
_BRACKETS_ONLY = re.compile(r"[\s()\[\]{}<>]+")


def extract_answer(text: str) -> tuple[str, bool]:
    """The answer part of generated text, and whether a cue marked it (else it is the whole text)."""
    text = _NEXT_QUESTION.split(text.strip(), maxsplit=1)[0]
    cues = list(_CUE.finditer(text))
    if cues:
        return text[cues[-1].end() :].lstrip(" \t\n:*").rstrip(), True
    ahead = _CUE_AHEAD.search(text)
    if ahead:
        return _SENTENCE_END.split(text[: ahead.start()].strip())[-1].strip(), True
    secondary = list(_CUE_SECONDARY.finditer(text))
    if secondary:
        return text[secondary[-1].end() :].lstrip(" \t\n:*").rstrip(), True
    return text, False


def _decide(found: list[str], cued: bool) -> str | None:
    # After a cue the first mention is the answer; without one, only an unambiguous text counts.
    if cued:
        return found[0] if found else None
    return found[0] if len(set(found)) == 1 else None


def _option(answer: str, cued: bool) -> str | None:
    found = [m.group(1) for m in [_BARE_OPTION.match(answer)] if m]
    found += [next(g for g in m.groups() if g) for m in _OPTION.finditer(answer)]
    return _decide([letter.upper() for letter in found], cued)


def _boolean(answer: str, cued: bool, target: str) -> str | None:
    pair = {target, _BOOLEANS[target]}
    found = []
    for m in re.finditer(r"\b(not\s+|n't\s+)?(" + "|".join(pair) + r")\b", answer.lower()):
        word = m.group(2)
        # "not valid" is "invalid", "not true" is "false"; a negated yes/no is left as written.
        found.append(_BOOLEANS[word] if m.group(1) and word not in ("yes", "no") else word)
    if not cued and found and re.match(r"[\s*\"'`]*(" + "|".join(pair) + r")\b", answer.lower()):
        return found[0]  # "No, because there is no ..." answers first
    return _decide(found, cued)


def _clean(answer: str) -> str:
    answer = answer.strip().replace("**", "").split("\n", 1)[0]
    answer = re.split(r"\.\s", answer, maxsplit=1)[0]
    return " ".join(answer.strip(" \t\"'`*.:").lower().replace(",", " ").split())


def answer_match(prediction: str, target: str) -> float:
    """Extract the answer from generated text, then compare it with the target by the target's kind:
    option letter "(A)", yes/no/true/false/valid/invalid, a number (as `numeric`), else normalized text."""
    target = target.strip()
    answer, cued = extract_answer(prediction)
    option = _OPTION_TARGET.fullmatch(target)
    if option:
        return float(_option(answer, cued) == (option.group(1) or option.group(2)).upper())
    key = target.strip(".").lower()
    if key in _BOOLEANS:
        return float(_boolean(answer, cued, key) == key)
    if _NUMBER.fullmatch(target):
        # `numeric` does its own cue handling (first number after a cue, else the last number).
        return numeric(_NEXT_QUESTION.split(prediction.strip(), maxsplit=1)[0], target)
    if _BRACKETS_ONLY.fullmatch(target):  # Dyck completions: ") ] >" and ")]>" are the same answer
        return float(_clean(answer).replace(" ", "") == target.replace(" ", ""))
    return float(_clean(answer) == _clean(target))


def f1(prediction: str, target: str) -> float:
    pred_tokens, gold_tokens = normalize(prediction).split(), normalize(target).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def regex(prediction: str, target: str) -> float:
    """The target is a regular expression the output must contain a match of (Python syntax)."""
    return float(re.search(target, prediction, re.DOTALL) is not None)


def first_json(text: str) -> object | None:
    """The first JSON object or array in `text` (models wrap JSON in prose or code fences)."""
    decoder = json.JSONDecoder()
    for at, char in enumerate(text):
        if char in "{[":
            try:
                return decoder.raw_decode(text, at)[0]
            except ValueError:
                continue
    return None


@functools.lru_cache(maxsize=256)
def _schema_validator(schema_text: str):
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def json_schema(prediction: str, target: str) -> float:
    """The target is a JSON Schema; the output's first JSON value must be valid under it."""
    value = first_json(prediction)
    return 0.0 if value is None else float(_schema_validator(target).is_valid(value))


_ITEM_SEPARATORS = re.compile(r"[,;\n]+")


def set_match(prediction: str, target: str) -> float:
    """F1 between the sets of items (split on commas, semicolons and newlines, normalized): order and repeats do
    not matter."""
    predicted = {normalize(item) for item in _ITEM_SEPARATORS.split(prediction)} - {""}
    gold = {normalize(item) for item in _ITEM_SEPARATORS.split(target)} - {""}
    if not predicted or not gold:
        return float(predicted == gold)
    common = len(predicted & gold)
    return 0.0 if common == 0 else 2 * common / (len(predicted) + len(gold))


def target_problem(metric: str, target: str) -> str | None:
    """Why `target` cannot serve the metric (a bad pattern or schema), else None."""
    try:
        if metric == "regex":
            re.compile(target)
        elif metric == "json_schema":
            import jsonschema

            jsonschema.validators.validator_for(json.loads(target)).check_schema(json.loads(target))
    except (re.error, ValueError) as exc:
        return f"not a valid {'regular expression' if metric == 'regex' else 'JSON Schema'}: {exc}"
    except Exception as exc:  # jsonschema.SchemaError
        return f"not a valid JSON Schema: {getattr(exc, 'message', exc)}"
    return None


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "label_accuracy": label_accuracy,
    "numeric": numeric,
    "f1": f1,
    "answer_match": answer_match,
    "regex": regex,
    "json_schema": json_schema,
    "set_match": set_match,
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
