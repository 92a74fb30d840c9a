"""Prompt templates with `{prompt}` and `{input}` slots.

Substitution is literal (no str.format), so braces inside examples or prompts are safe.
"""

from __future__ import annotations

PROMPT_SLOT = "{prompt}"
INPUT_SLOT = "{input}"


def check_template(template: str) -> None:
    if INPUT_SLOT not in template:
        raise ValueError("template must contain {input}")
    if PROMPT_SLOT not in template:
        raise ValueError("template must contain {prompt}")


def render(template: str, prompt: str, input_text: str) -> str:
    # Replace the prompt first in a copy that cannot be re-scanned, then the input.
    head, sep, tail = template.partition(INPUT_SLOT)
    head = head.replace(PROMPT_SLOT, prompt)
    tail = tail.replace(PROMPT_SLOT, prompt)
    return head + (input_text if sep else "") + tail
