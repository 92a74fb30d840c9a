"""Calibration of label probabilities: the formulas on fixed tables (expected values worked out by hand), the
evaluator applying them (a scripted backend, then the fake vLLM server), and the job options around them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.evaluation.calibration import calibrate, cbm, contextual, label_distribution, marginal
from app.evaluation.evaluator import Evaluator
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.llm.openai_compat import OpenAICompatBackend
from app.llm.port import BackendInfo, Capability, LabelScores
from app.settings import BackendSettings
from tests.conftest import label_job, wait_for_status

# p(y|x) of one prompt on four inputs, two labels: every row predicts label 0 before calibration.
TABLE = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]


def test_label_distribution_is_a_softmax_over_the_labels():
    probs = label_distribution([[math.log(0.2), math.log(0.6)], [-1.0, -1.0], [-math.inf, math.log(0.5)]])
    assert probs[0] == pytest.approx([0.25, 0.75])  # 0.2 / 0.8, 0.6 / 0.8
    assert probs[1] == pytest.approx([0.5, 0.5])
    assert probs[2] == pytest.approx([0.0, 1.0])  # an unseen verbalizer gets nothing
    assert label_distribution([[-math.inf, -math.inf]])[0] == pytest.approx([0.5, 0.5])


def test_cbm_divides_by_the_mean_over_inputs_and_renormalizes():
    # mean over the inputs: [0.75, 0.25]
    assert marginal(np.array(TABLE)) == pytest.approx([0.75, 0.25])
    expected = [
        [1.2 / 1.6, 0.4 / 1.6],  # 0.9/0.75 = 1.2, 0.1/0.25 = 0.4
        [(0.8 / 0.75) / (0.8 / 0.75 + 0.8), 0.8 / (0.8 / 0.75 + 0.8)],  # 1.0667, 0.8
        [(0.7 / 0.75) / (0.7 / 0.75 + 1.2), 1.2 / (0.7 / 0.75 + 1.2)],  # 0.9333, 1.2
        [0.8 / 2.4, 1.6 / 2.4],  # 0.8, 1.6
    ]
    calibrated = cbm(np.array(TABLE))
    assert calibrated == pytest.approx(np.array(expected))
    assert calibrated.argmax(axis=1).tolist() == [0, 0, 1, 1]
    # Another reference: the mean comes from it (a table or the mean vector), not from the rows calibrated.
    reference = np.array([[0.5, 0.5], [0.7, 0.3]])  # mean [0.6, 0.4]
    assert cbm(np.array(TABLE[:1]), reference)[0] == pytest.approx([1.5 / 1.75, 0.25 / 1.75])
    assert cbm(np.array(TABLE[:1]), np.array([0.6, 0.4]))[0] == pytest.approx([1.5 / 1.75, 0.25 / 1.75])
    # A label no reference input gives any probability keeps none.
    assert cbm(np.array([[0.7, 0.3, 0.0]]), np.array([[0.5, 0.5, 0.0]]))[0] == pytest.approx([1.4 / 2, 0.6 / 2, 0])


def test_contextual_divides_by_the_content_free_distribution():
    calibrated = contextual(np.array(TABLE), [0.85, 0.15])
    ratios = [(0.9 / 0.85, 0.1 / 0.15), (0.8 / 0.85, 0.2 / 0.15), (0.7 / 0.85, 0.3 / 0.15), (0.6 / 0.85, 0.4 / 0.15)]
    assert calibrated == pytest.approx(np.array([[a / (a + b), b / (a + b)] for a, b in ratios]))
    assert calibrated.argmax(axis=1).tolist() == [0, 1, 1, 1]
    assert calibrate(np.array(TABLE), "none") == pytest.approx(np.array(TABLE))
    with pytest.raises(ValueError):
        calibrate(np.array(TABLE), "contextual")
    with pytest.raises(ValueError):
        calibrate(np.array(TABLE), "platt")


class TableLLM:
    """Label log-probs from a table keyed by the rendered input line; the content-free input has its own row."""

    def __init__(self, rows: dict[str, list[float]]) -> None:
        self.info = BackendInfo("table", "test", "table-1", frozenset({Capability.LABEL_LOGPROBS}))
        self.rows = rows
        self.batches: list[list] = []

    async def label_logprobs(self, requests):
        self.batches.append(list(requests))
        return [LabelScores([math.log(p) for p in self.rows[r.prompt.split("\n")[1]]], 5) for r in requests]


def table_task(calibration: str) -> Task:
    examples = [Example(f"x{i}", "yes") for i in range(4)]
    split = SplitSpec(train=1.0, dev=0.0, test=0.0)
    return Task(
        examples, "{prompt}\n{input}\nA:", "label_accuracy", ["yes", "no"], split=split, calibration=calibration
    )


ROWS = {f"x{i}": row for i, row in enumerate(TABLE)} | {"N/A": [0.85, 0.15], "r0": [0.8, 0.2], "r1": [0.6, 0.4]}


@pytest.mark.parametrize(
    ("calibration", "expected", "requests"),
    [("none", ["yes"] * 4, 4), ("cbm", ["yes", "yes", "no", "no"], 4), ("contextual", ["yes", "no", "no", "no"], 5)],
)
async def test_the_evaluator_calibrates_before_the_argmax(calibration, expected, requests):
    llm = TableLLM(ROWS)
    evaluator = Evaluator(table_task(calibration), llm)
    (score,) = await evaluator.score(["P"], "train")
    assert score.predictions == expected
    assert score.score == pytest.approx(expected.count("yes") / 4)
    assert len(llm.batches) == 1 and len(llm.batches[0]) == requests  # contextual: one content-free request more
    if calibration == "contextual":
        assert llm.batches[0][-1].prompt == "P\nN/A\nA:"


async def test_cbm_with_a_reference_takes_the_mean_from_it():
    llm = TableLLM(ROWS)
    evaluator = Evaluator(table_task("cbm"), llm)
    # One input alone: its own mean makes every label equal (the first wins); the reference's mean [0.7, 0.3] does
    # not: 0.9/0.7 > 0.1/0.3 but 0.6/0.7 < 0.4/0.3.
    assert await evaluator.predict(["P"], [Example("x3", "")]) == [["yes"]]
    reference = [Example("r0", ""), Example("r1", "")]
    assert await evaluator.predict(["P"], [Example("x0", ""), Example("x3", "")], reference) == [["yes", "no"]]
    (table,) = await evaluator.label_tables(["P"], [Example("x3", "")], reference)
    a, b = 0.6 / 0.7, 0.4 / 0.3
    assert table.probs[0] == pytest.approx([a / (a + b), b / (a + b)])
    assert table.logprobs[0] == pytest.approx([math.log(0.6), math.log(0.4)])


# ---------------------------------------------------------------------------------------- the fake vLLM server

VERBALIZERS = (" positive", " negative")


def hand_cbm(rows: list[list[float]]) -> list[int]:
    """CBM's argmax written out: softmax over the labels, divide by the column means, take the larger."""
    probs = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))] for a, b in rows]
    mean = [sum(p[0] for p in probs) / len(probs), sum(p[1] for p in probs) / len(probs)]
    return [0 if p[0] / mean[0] >= p[1] / mean[1] else 1 for p in probs]


def hand_contextual(rows: list[list[float]], free: list[float]) -> list[int]:
    def dist(a: float, b: float) -> list[float]:
        return [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]

    base = dist(*free)
    return [0 if p[0] / base[0] >= p[1] / base[1] else 1 for p in (dist(a, b) for a, b in rows)]


async def test_the_evaluator_calibrates_the_fake_servers_label_logprobs(fake_llm):
    backend = OpenAICompatBackend("fake", BackendSettings(kind="openai_compat", base_url=fake_llm.base_url))
    await backend.start()
    try:
        texts = ["great film", "dull plot", "it was fine", "loved it", "meh", "a waste", "fun", "too long"]
        examples = [Example(t, "positive") for t in texts]
        template = "{prompt}\nReview: {input}\nSentiment:"
        prompt = "Label: positive, negative."
        rendered = [template.replace("{prompt}", prompt).replace("{input}", t) for t in texts]
        rows = [fake_llm.expected_label_logprobs(r, VERBALIZERS) for r in rendered]
        free = fake_llm.expected_label_logprobs(
            template.replace("{prompt}", prompt).replace("{input}", "N/A"), VERBALIZERS
        )
        labels = ["positive", "negative"]
        found = {}
        for calibration in ("none", "cbm", "contextual"):
            task = Task(examples, template, "label_accuracy", labels, calibration=calibration)
            (predicted,) = await Evaluator(task, backend).predict([prompt], examples)
            found[calibration] = [labels.index(p) for p in predicted]
        assert found["none"] == [0 if a >= b else 1 for a, b in rows]
        assert found["cbm"] == hand_cbm(rows)
        assert found["contextual"] == hand_contextual(rows, free)
        assert len(set(map(tuple, found.values()))) == 3  # a table where each calibration changes something
    finally:
        await backend.aclose()


# ---------------------------------------------------------------------------------------- jobs


def locs(response) -> list[str]:
    return [".".join(map(str, d["loc"])) for d in response.json()["error"]["details"]]


def evaluate_job(**overrides) -> dict:
    body = label_job(method="evaluate", **overrides)
    body["params"] = {}
    return body


async def test_calibration_needs_a_label_task_scored_by_label_logprobs(app_client, monkeypatch):
    body = evaluate_job(task={"dataset": "builtin:gsm8k", "calibration": "cbm"})
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert locs(response) == ["body.task.calibration"]
    assert "label_accuracy" in response.text

    from app.llm.registry import BackendRegistry

    real = BackendRegistry.capabilities
    monkeypatch.setattr(
        BackendRegistry,
        "capabilities",
        lambda self, name: real(self, name) - {Capability.LABEL_LOGPROBS} if name == "default" else real(self, name),
    )
    body = evaluate_job(task={"calibration": "contextual"})
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert locs(response) == ["body.task.calibration"] and "label_logprobs" in response.text

    response = await app_client.post("/v1/jobs", json=label_job(task={"calibration": "platt"}))
    assert response.status_code == 422 and "body.task.calibration" in locs(response)


async def test_a_calibrated_job_records_it_and_predict_applies_it(app_client, worker, fake_llm):
    body = evaluate_job(task={"calibration": "cbm"}, budget={"max_llm_calls": 500})
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["spec"]["task"]["calibration"] == "cbm"
    assert (await app_client.get(f"/v1/jobs/{job['id']}")).json()["spec"]["task"]["calibration"] == "cbm"

    # Predict divides by the mean over the job's train inputs, whatever the batch: one input alone is not made
    # uniform (which would always answer the first label), and the reference's answers come from the cache.
    from app.datasets.builtin import BUILTIN_TASKS
    from app.jobs.engine import task_from_spec

    spec = job["spec"]
    task = task_from_spec(spec["task"], BUILTIN_TASKS["snli16"].examples())
    train = task.split_examples("train")
    prompt = job["best"]["prompt"]
    verbalizers = tuple(task.verbalizer_texts())

    def dist(text: str) -> np.ndarray:
        return label_distribution(
            [
                fake_llm.expected_label_logprobs(
                    task.template.replace("{prompt}", prompt).replace("{input}", text), verbalizers
                )
            ]
        )[0]

    mean = np.mean([dist(ex.input) for ex in train], axis=0)
    inputs = [ex.input for ex in task.split_examples("test")[:4]]
    expected = [task.labels[int(np.argmax(dist(x) / mean))] for x in inputs]
    sent_before = fake_llm.count()
    outputs = []
    for text in inputs:  # one at a time
        answer = await app_client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [text]})
        assert answer.status_code == 200, answer.text
        outputs.append(answer.json()["predictions"][0]["output"])
    assert outputs == expected
    assert fake_llm.count() - sent_before <= 2 * len(inputs)  # the train inputs were found in the cache
