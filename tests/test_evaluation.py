"""Evaluation engine pieces: templates, metrics, splits, label parsing, the evaluator's batching."""

from __future__ import annotations

import pytest

from app.evaluation.evaluator import Evaluator
from app.evaluation.metrics import METRICS, parse_label
from app.evaluation.splits import SplitSpec, split_indices
from app.evaluation.task import Example, Task
from app.evaluation.templates import check_template, render
from app.llm.port import BackendInfo, Capability, Generation, LabelScores


def test_render_is_literal():
    assert render("{prompt}\nQ: {input}\nA:", "Be {brief}.", "x = {y}") == "Be {brief}.\nQ: x = {y}\nA:"
    # An input that contains "{prompt}" is not substituted again.
    assert render("{input} | {prompt}", "P", "{prompt}") == "{prompt} | P"
    with pytest.raises(ValueError):
        check_template("{input} only")


@pytest.mark.parametrize(
    ("metric", "prediction", "target", "expected"),
    [
        ("exact_match", " The Answer. ", "the answer", 1.0),
        ("exact_match", "the answer is", "the answer", 0.0),
        ("contains", "I think it is Paris, France", "paris", 1.0),
        ("label_accuracy", "Neutral", "neutral", 1.0),
        ("numeric", "so she makes 18 dollars. The answer is 18.", "18", 1.0),
        ("numeric", "#### 1,234", "1234", 1.0),
        ("numeric", "about 17.6", "18", 1.0),
        ("numeric", "no number", "3", 0.0),
        ("f1", "the cat sat", "the cat ran", 2 / 3),
    ],
)
def test_metrics(metric, prediction, target, expected):
    assert METRICS[metric](prediction, target) == pytest.approx(expected)


def test_parse_label_takes_earliest_whole_word():
    labels = ["entailment", "neutral", "contradiction"]
    assert parse_label("It is neutral, not contradiction", labels) == "neutral"
    assert parse_label("Neutrality", labels) == ""


def test_split_is_seeded_disjoint_and_complete():
    spec = SplitSpec(train=0.5, dev=0.25, test=0.25, seed=3)
    a, b = split_indices(48, spec), split_indices(48, spec)
    assert a == b
    assert (len(a["train"]), len(a["dev"]), len(a["test"])) == (24, 12, 12)
    assert sorted(a["train"] + a["dev"] + a["test"]) == list(range(48))
    assert split_indices(48, SplitSpec(seed=4)) != a
    tiny = split_indices(3, SplitSpec(train=0.8, dev=0.2, test=0.2))
    assert all(tiny[s] for s in ("train", "dev", "test"))


class RecordingLLM:
    def __init__(self, capabilities):
        self.info = BackendInfo("rec", "test", "rec-model", frozenset(capabilities))
        self.batches: list[list] = []

    async def label_logprobs(self, requests):
        self.batches.append(requests)
        # Favour the label named in the prompt's instruction.
        return [
            LabelScores([0.0 if v.strip() in r.prompt.split("\n")[0] else -5.0 for v in r.verbalizers], 10)
            for r in requests
        ]

    async def generate(self, requests):
        self.batches.append(requests)
        return [Generation([r.prompt.split("\n")[0]], 10, 2) for r in requests]


def make_task(n=8):
    examples = [Example(f"text {i}", "yes" if i % 2 else "no") for i in range(n)]
    return Task(examples, "{prompt}\n{input}\nAnswer:", "label_accuracy", labels=["yes", "no"])


async def test_evaluator_one_batch_grouped_by_prompt_label_logprobs():
    llm = RecordingLLM({Capability.LABEL_LOGPROBS, Capability.GENERATE})
    evaluator = Evaluator(make_task(), llm)
    scores = await evaluator.score(["say yes", "say no"], "train")
    assert len(llm.batches) == 1
    prompts = [r.prompt for r in llm.batches[0]]
    n = len(make_task().indices("train"))
    assert all(p.startswith("say yes") for p in prompts[:n]) and all(p.startswith("say no") for p in prompts[n:])
    assert [s.predictions[0] for s in scores] == ["yes", "no"]
    assert scores[0].score + scores[1].score == pytest.approx(1.0)


async def test_evaluator_falls_back_to_parsed_generation():
    llm = RecordingLLM({Capability.GENERATE})
    evaluator = Evaluator(make_task(), llm)
    (score,) = await evaluator.score(["the answer is yes"], "dev")
    assert set(score.predictions) == {"yes"}
    assert llm.batches[0][0].temperature == 0.0
