"""The configured bounds on strings and lists in requests (`api.limits`), checked after the schema's own
ceilings; a breach is a 422 that names the field and the limit."""

from __future__ import annotations

from collections.abc import Sequence

from app.errors import InvalidPayload
from app.settings import InputLimits


def check_chars(loc: list[str | int], value: str | None, limit: int, setting: str) -> None:
    if value is not None and len(value) > limit:
        raise InvalidPayload(loc, f"{len(value)} characters; at most {limit} (api.limits.{setting})", f"<= {limit}")


def check_count(loc: list[str | int], items: Sequence | None, limit: int, setting: str) -> None:
    if items is not None and len(items) > limit:
        raise InvalidPayload(loc, f"{len(items)} items; at most {limit} (api.limits.{setting})", f"<= {limit}")


def check_examples(loc: list[str | int], examples: Sequence, limits: InputLimits) -> None:
    """Dataset examples (with `.input` and `.target`)."""
    check_count(loc, examples, limits.max_examples_per_dataset, "max_examples_per_dataset")
    for index, example in enumerate(examples):
        for field in ("input", "target"):
            check_chars([*loc, index, field], getattr(example, field), limits.max_example_chars, "max_example_chars")


def check_job(payload, limits: InputLimits) -> None:
    task = payload.task
    check_chars(["task", "template"], task.template, limits.max_template_chars, "max_template_chars")
    check_chars(["task", "demo_template"], task.demo_template, limits.max_template_chars, "max_template_chars")
    check_chars(["initial_prompt"], payload.initial_prompt, limits.max_prompt_chars, "max_prompt_chars")
    for index, candidate in enumerate(getattr(payload.params, "candidates", None) or ()):  # select's candidates
        check_chars(["params", "candidates", index], candidate, limits.max_prompt_chars, "max_prompt_chars")
    for index, instruction in enumerate(getattr(payload.params, "instructions", None) or ()):  # fewshot's
        check_chars(["params", "instructions", index], instruction, limits.max_prompt_chars, "max_prompt_chars")
    check_count(["task", "labels"], task.labels, limits.max_labels, "max_labels")
    for index, label in enumerate(task.labels or ()):
        check_chars(["task", "labels", index], label, limits.max_label_chars, "max_label_chars")
    for label, words in (task.verbalizer or {}).items():
        if isinstance(words, str):
            check_chars(["task", "verbalizer", label], words, limits.max_label_chars, "max_label_chars")
            continue
        for index, word in enumerate(words):
            check_chars(["task", "verbalizer", label, index], word, limits.max_label_chars, "max_label_chars")


def check_predict_inputs(inputs: Sequence[str], limits: InputLimits) -> None:
    check_count(["inputs"], inputs, limits.max_predict_inputs, "max_predict_inputs")
    for index, text in enumerate(inputs):
        check_chars(["inputs", index], text, limits.max_example_chars, "max_example_chars")
