"""`answer_match`: answer extraction from generated text for the BBH and GSM8K tasks, on their real target shapes."""

from __future__ import annotations

import pytest

from app.datasets.builtin import BUILTIN_TASKS
from app.evaluation.evaluator import Evaluator
from app.evaluation.metrics import METRICS, answer_match, contains, extract_answer, numeric
from app.evaluation.task import Example, Task
from app.jobs.schemas import TaskIn
from app.llm.port import BackendInfo, Capability, Generation

MENTION_THEN_ANSWER = (
    "Option (A) is wrong because The Front Page is a comedy about newspapers. "
    "The Lion King is animated, like the others, so the answer is (C)."
)


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        # Option letters (date_understanding, logical_deduction, movie_recommendation, tracking_shuffled_objects, ...).
        ("The answer is (A).", "(A)", 1.0),
        ("(A)", "(A)", 1.0),
        ("A", "(A)", 1.0),
        ("A)", "(A)", 1.0),
        ("option A", "(A)", 1.0),
        ("So the answer is B because the ball ends with Bob.", "(B)", 1.0),
        ("**Answer:** (D)", "(D)", 1.0),
        ("Therefore, (B) is the correct answer.", "(B)", 1.0),
        ("(C) The Lion King", "(C)", 1.0),
        (MENTION_THEN_ANSWER, "(C)", 1.0),
        (MENTION_THEN_ANSWER, "(A)", 0.0),  # a mention in the reasoning is not the answer
        ("The answer is (B).\n\nQ: Find a movie similar to Heat:\nA: The answer is (C).", "(B)", 1.0),
        ("The answer is (B).\n\nQ: Find a movie similar to Heat:\nA: The answer is (C).", "(C)", 0.0),
        ("Option (A) is a comedy. (B) is a thriller.", "(A)", 0.0),  # no cue and two options named
        ("The answer is: A kite.", "(A)", 0.0),  # the article, not option A
        ("I think it is (E).", "(E)", 1.0),
        # Yes/No (causal_judgement), True/False (boolean_expressions), valid/invalid (formal_fallacies).
        ("The answer is: Yes.", "Yes", 1.0),
        ("The answer is: Yes.", "No", 0.0),
        ("No, because there is no evidence that the CEO intended to harm the environment.", "No", 1.0),
        ("Yes, because there is no evidence that the CEO cared.", "No", 0.0),
        ("not ( True ) and ( True ) is False. So the answer is False.", "False", 1.0),
        ("not ( True ) and ( True ) is False. So the answer is False.", "True", 0.0),
        ("True", "True", 1.0),
        ("The conclusion does not follow, so the argument is not valid. The answer is: invalid", "invalid", 1.0),
        ("The premises do not entail the conclusion. So the argument is not valid.", "invalid", 1.0),
        ("The premises do not entail the conclusion. So the argument is not valid.", "valid", 0.0),
        ("The answer is valid.", "invalid", 0.0),
        # Numbers (object_counting, multistep_arithmetic_two, gsm8k), as `numeric` compares them.
        ("I have a piano, two flutes and a violin. 1 + 2 + 1 = 4. So the answer is 4.", "4", 1.0),
        ("I have a piano, two flutes and a violin. 1 + 2 + 1 = 4. So the answer is 4.", "3", 0.0),
        ("(-3 + 5) * (2 - 7) = 2 * -5 = -10. The answer is -10.", "-10", 1.0),
        ("Janet sells 16 - 3 - 4 = 9 eggs for 9 * 2 = $18.\n#### 18", "18", 1.0),
        ("The answer is 1,234 dollars.", "1234", 1.0),
        ("She has 72 clips.\n\nQ: Weng earns $12 an hour. How much?\nA: 10", "72", 1.0),
        # Dyck completions and sorted words: normalized exact match on the extracted answer.
        ("The answer is: ] ] >", "] ] >", 1.0),
        ("The answer is ]]>.", "] ] >", 1.0),
        ("The answer is ] >", "] ] >", 0.0),
        ("The sorted words are: abbe, adposition, arragon.", "abbe adposition arragon", 1.0),
        ("The answer is abbe adposition arragon. These are in order.", "abbe adposition arragon", 1.0),
        ("The answer is adposition abbe arragon", "abbe adposition arragon", 0.0),
        ('The answer is "Monsters, Inc."', "Monsters, Inc", 1.0),
    ],
)
def test_answer_match(prediction, target, expected):
    assert answer_match(prediction, target) == expected
    assert METRICS["answer_match"](prediction, target) == expected


def test_answer_match_has_no_false_positive_where_contains_has():
    assert contains(MENTION_THEN_ANSWER, "(A)") == 1.0
    assert answer_match(MENTION_THEN_ANSWER, "(A)") == 0.0
    assert contains("The answer is (A)", "(A)") == answer_match("The answer is (A)", "(A)") == 1.0


def test_extract_answer_takes_the_last_cue_and_drops_a_next_question():
    assert extract_answer("The answer is (A). Wait, no: the answer is (B).") == ("(B).", True)
    assert extract_answer("Let's think.\nA: (B)\nQ: next question\nA: (C)") == ("(B)", True)
    assert extract_answer("(C) The Lion King") == ("(C) The Lion King", False)


def test_numbers_agree_with_numeric():
    for prediction, target in [("so 17.6 in all", "18"), ("The answer is 5, not 50", "5"), ("no number", "3")]:
        assert answer_match(prediction, target) == numeric(prediction, target)


def _bbh_and_gsm8k():
    return [name for name in BUILTIN_TASKS if name.startswith(("bbh_", "gsm8k"))]


@pytest.mark.parametrize("name", _bbh_and_gsm8k())
def test_every_builtin_target_shape_is_matched(name):
    """For every distinct target of the task: a cued answer naming it scores 1, one naming another target 0."""
    task = BUILTIN_TASKS[name]
    assert task.metric == "answer_match"
    targets = sorted({ex["target"] for ex in task.examples()})[:40]
    for i, target in enumerate(targets):
        other = targets[(i + 1) % len(targets)]
        assert answer_match(f"Let's think step by step. So the answer is {target}.", target) == 1.0, target
        assert answer_match(f"Let's think step by step. So the answer is {other}.", target) == 0.0, (target, other)


def test_schema_accepts_answer_match():
    assert TaskIn(dataset="builtin:bbh_hyperbaton", metric="answer_match").metric == "answer_match"


class TextLLM:
    def __init__(self, texts):
        self.info = BackendInfo("txt", "test", "txt-model", frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS}))
        self.texts = texts

    async def generate(self, requests):
        return [Generation([self.texts[i % len(self.texts)]], 10, 2) for i, _ in enumerate(requests)]

    async def label_logprobs(self, requests):  # pragma: no cover - must not be called
        raise AssertionError("answer_match scores generated text, not label log-probs")


async def test_evaluator_scores_generated_text_with_answer_match():
    examples = [Example("q0", "(B)"), Example("q1", "(B)")]
    task = Task(examples, "{prompt}\nQ: {input}\nA:", "answer_match", labels=["(A)", "(B)"])
    texts = [MENTION_THEN_ANSWER.replace("(C)", "(B)"), "Option (A) fits; the answer is (A)."]
    (score,) = await Evaluator(task, TextLLM(texts)).score(["Think."], examples=examples)
    assert score.predictions == texts  # the raw text reaches the metric; no label parsing
    assert score.per_example == [1.0, 0.0]
