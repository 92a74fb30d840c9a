"""The `llm_judge` metric: a model (a named backend) grades each output against a rubric on a numeric scale.
Its requests are deterministic (temperature 0), so they are cached and charged like any other call."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.llm.port import GenerationRequest

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True, slots=True)
class JudgeSpec:
    rubric: str
    backend: str = "default"
    scale_min: int = 1
    scale_max: int = 10
    max_tokens: int = 16


def judge_request(spec: JudgeSpec, input_text: str, reference: str, output: str) -> GenerationRequest:
    prompt = (
        f"{spec.rubric}\n\n"
        f"Input:\n{input_text}\n\n"
        + (f"Reference answer:\n{reference}\n\n" if reference else "")
        + f"Response to grade:\n{output}\n\n"
        f"Grade the response from {spec.scale_min} (worst) to {spec.scale_max} (best) by the criteria above. "
        "Reply with the number only.\nGrade:"
    )
    return GenerationRequest(prompt, max_tokens=spec.max_tokens, temperature=0.0)


def parse_grade(text: str, spec: JudgeSpec) -> float:
    """The grade as a value in [0, 1]: the first number on the scale in the reply ("7", "7/10", "Grade: 7.5");
    a reply with none scores 0, the scale's bottom."""
    for match in _NUMBER.finditer(text):
        value = float(match.group())
        if spec.scale_min <= value <= spec.scale_max:
            return (value - spec.scale_min) / (spec.scale_max - spec.scale_min)
    return 0.0
