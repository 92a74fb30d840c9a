"""BBT-RGB's mixed initialisation: the instruction followed by in-context demonstrations as the hard prompt that
the soft prompt starts from.

A demonstration is a training example rendered the way the model sees a query (the task's template with an empty
{prompt} slot), its input cut to `max_chars` characters, followed by its label's (first) verbalizer text, so the
demonstration ends exactly as a scored prompt continues. The hard prompt is the instruction, a blank line, and the
demonstrations separated by blank lines; it fills the template's {prompt} slot, so the soft prompt artifact's
`text` carries it and `predict` renders the same prompt.

Demonstrations are drawn from the train split only, by the job seed: labels are taken in turn, in a seeded order,
each turn adding one seeded random example of that label not drawn before; the drawn examples are then shown in a
seeded order. One demonstration (BBT-RGB's setting) is one example of a seeded random label.
"""

from __future__ import annotations

from app.evaluation.task import Example, Task
from app.evaluation.templates import render
from app.optimizers.base import derived_rng

_DEMONSTRATION_PURPOSE = 421


def pick_demonstrations(targets: list[str], labels: list[str], count: int, seed: int) -> list[int]:
    """Positions (into `targets`, the train split's) of `count` demonstrations, in the order they are shown; fewer
    when the split has fewer examples of the labels."""
    rng = derived_rng(seed, _DEMONSTRATION_PURPOSE)
    pools = {label: [i for i, t in enumerate(targets) if t == label] for label in labels}
    for label in labels:
        rng.shuffle(pools[label])
    order = [labels[i] for i in rng.permutation(len(labels))]
    picked: list[int] = []
    while len(picked) < count and any(pools.values()):
        for label in order:
            if pools[label] and len(picked) < count:
                picked.append(pools[label].pop())
    return [picked[i] for i in rng.permutation(len(picked))]


def render_demonstration(task: Task, example: Example, max_chars: int) -> str:
    """One demonstration: the example as a query (empty {prompt} slot, input cut to `max_chars`), then its label's
    first verbalizer text."""
    assert task.labels, "demonstrations need a label task"
    words = task.verbalizer_words()[task.labels.index(example.target)]
    query = render(task.template, "", example.input[:max_chars].rstrip()).strip()
    return query + words[0]


def mixed_prompt(instruction: str, demonstrations: list[str]) -> str:
    """The instruction, then the demonstrations, separated by blank lines (no demonstrations: the instruction)."""
    if not demonstrations:
        return instruction
    return "\n\n".join(part for part in [instruction.strip(), *demonstrations] if part)
