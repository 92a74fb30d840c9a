"""`select`: label-free prompt selection. The criteria on a fixed probability table (expected values worked out by
hand), the method in the engine (the criterion's choice is the job's best whatever dev says), and jobs through the
API, with labeled and unlabeled data."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from app.evaluation.evaluator import LabelTable
from app.evaluation.task import Example
from app.jobs.engine import JobEngine, JobPlan
from app.llm.port import BackendInfo, Capability, LabelScores
from app.optimizers.select import (
    CRITERIA,
    Select,
    SelectParams,
    criterion_values,
    entropy,
    label_mass_logs,
    pseudo_labels,
    ranking,
)
from app.usage import Usage
from tests.conftest import insert_job, label_job, wait_for_status
from tests.test_engine import TEMPLATE, ListSink, make_task


def h(p: float) -> float:
    """Binary entropy in nats, by hand."""
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


# Three prompts x three inputs x two labels, p(label 0 | x, t) per input:
# A: 0.9 0.8 0.7 (always label 0, confident)  B: 0.6 0.4 0.5 (hesitant)  C: 0.9 0.2 0.6 (decisive, varied)
P0 = {"A": [0.9, 0.8, 0.7], "B": [0.6, 0.4, 0.5], "C": [0.9, 0.2, 0.6]}
PROBS = np.array([[[p, 1 - p] for p in P0[name]] for name in "ABC"])
# The raw label log-probs put this much probability on the two label words in total (for ppl).
MASS = {"A": 0.5, "B": 0.9, "C": 0.25}
RAW = np.log(PROBS * np.array([MASS[name] for name in "ABC"])[:, None, None])


def test_every_criterion_on_a_fixed_table():
    values = criterion_values(PROBS, RAW)
    cond = {name: sum(h(p) for p in P0[name]) / 3 for name in "ABC"}
    marginal = {name: sum(P0[name]) / 3 for name in "ABC"}  # mean p(label 0): A 0.8, B 0.5, C 0.5667
    expected = {
        # H(mean_x p) - mean_x H(p)
        "mi": [h(marginal[n]) - cond[n] for n in "ABC"],
        # entropy of the predicted-label shares: A 3/0, B 2/1 (0.5 ties to label 0), C 2/1
        "ge": [0.0, h(2 / 3), h(2 / 3)],
        "mdl": [-cond[n] for n in "ABC"],
        "le": [cond[n] for n in "ABC"],
        # pseudo-labels of all three ensembles: [0, 1, 0]; A predicts [0, 0, 0], B and C [0, 1, 0]
        "zlp": [2 / 3, 1.0, 1.0],
        "zpm": [2 / 3, 1.0, 1.0],
        "zmv": [2 / 3, 1.0, 1.0],
        # -mean_x log(sum of the raw label probabilities)
        "ppl": [-math.log(MASS[n]) for n in "ABC"],
    }
    assert set(values) == set(CRITERIA)
    for name in CRITERIA:
        assert values[name] == pytest.approx(expected[name], abs=1e-12), name
    # Worked numbers: MI of A = h(0.8) - (h(0.9) + h(0.8) + h(0.7)) / 3 = 0.500402 - 0.478783
    assert values["mi"] == pytest.approx([0.021619, 0.013424, 0.184733], abs=1e-6)
    choices = {name: ranking(values[name], name != "ppl")[0] for name in CRITERIA}
    # MI: C; GE: B and C tie, the earlier wins; MDL: A (lowest entropy); LE: B; Z*: B and C tie; PPL: B (mass 0.9)
    assert choices == {"mi": 2, "ge": 1, "mdl": 0, "le": 1, "zlp": 1, "zpm": 1, "zmv": 1, "ppl": 1}


def test_pseudo_labels_of_the_three_ensembles_differ_where_they_should():
    # Three prompts, two inputs; p(label 0): input 1: 0.6 0.6 0.01, input 2: 0.95 0.95 0.001.
    probs = np.array([[[0.6, 0.4], [0.95, 0.05]], [[0.6, 0.4], [0.95, 0.05]], [[0.01, 0.99], [0.001, 0.999]]])
    # zlp: sum of logs. input 1: 2 ln .6 + ln .01 = -5.63 < 2 ln .4 + ln .99 = -1.84 -> 1;
    #      input 2: 2 ln .95 + ln .001 = -7.01 < 2 ln .05 + ln .999 = -5.99 -> 1
    # zpm: sums 1.21 < 1.79 -> 1; 1.901 > 1.099 -> 0.   zmv: argmaxes 0, 0, 1 -> 0 on both
    assert pseudo_labels(probs, "zlp").tolist() == [1, 1]
    assert pseudo_labels(probs, "zpm").tolist() == [1, 0]
    assert pseudo_labels(probs, "zmv").tolist() == [0, 0]
    with pytest.raises(ValueError):
        pseudo_labels(probs, "zzz")


def test_entropy_mass_and_ranking_edge_cases():
    assert entropy(np.array([1.0, 0.0])) == 0.0
    assert entropy(np.array([0.25] * 4)) == pytest.approx(math.log(4))
    # an unseen label word (-inf, or the cache's -1e9 floor) adds no probability mass
    assert label_mass_logs(np.array([[[math.log(0.3), -math.inf]]]))[0, 0] == pytest.approx(math.log(0.3))
    assert label_mass_logs(np.array([[[math.log(0.3), -1e9]]]))[0, 0] == pytest.approx(math.log(0.3))
    assert ranking([0.5, 0.7, 0.7, 0.1], True) == [1, 2, 0, 3]
    assert ranking([0.5, 0.7, 0.7, 0.1], False) == [3, 0, 1, 2]


def test_assess_reports_every_criterion_rank_choice_and_accuracy():
    tables = [LabelTable(RAW[i].tolist(), PROBS[i]) for i in range(3)]
    examples = [Example("x0", "yes"), Example("x1", "no"), Example("x2", "no")]
    method = Select(SelectParams(candidates=["B", "C"]), seed=0)
    results = method.assess(["A", "B", "C"], tables, examples, ["yes", "no"])
    a, b, c = (r["details"] for r in results)
    assert (a["origin"], b["origin"], a["index"], c["index"]) == ("initial", "candidate", 0, 2)
    assert c["selected"] and not a["selected"] and not b["selected"]  # mi is the default criterion
    assert c["criteria"]["mi"] == {"value": pytest.approx(0.184733, abs=1e-6), "rank": 1}
    assert a["criteria"]["mi"]["rank"] == 2 and b["criteria"]["mi"]["rank"] == 3
    assert a["chosen_by"] == ["mdl"] and c["chosen_by"] == ["mi"]
    assert b["chosen_by"] == ["ge", "le", "zlp", "zpm", "zmv", "ppl"]
    # train accuracy from the same probabilities: A says yes, no... A [yes yes yes] 1/3, B [yes no yes] 2/3, C 2/3
    assert [r["score"] for r in results] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert c["choices"]["criteria"]["mdl"] == {"index": 0, "train_accuracy": pytest.approx(1 / 3)}
    assert c["choices"]["oracle"] == pytest.approx(2 / 3)
    assert "choices" not in a
    assert c["objective"] == pytest.approx(0.184733, abs=1e-6)

    # CBM before the criteria: A's constant preference for label 0 is divided out.
    calibrated = Select(SelectParams(candidates=["B", "C"], calibration="cbm", criterion="ge"), seed=0)
    results = calibrated.assess(["A", "B", "C"], tables, examples, ["yes", "no"])
    # A after CBM: [0.692, 0.308], [0.5, 0.5] (ties to label 0), [0.368, 0.632] -> predicts 0, 0, 1: GE h(1/3)
    assert results[0]["details"]["criteria"]["ge"]["value"] == pytest.approx(h(1 / 3), abs=1e-6)
    assert results[0]["details"]["calibration"] == "cbm"

    # Without targets there is no accuracy, and the criteria are the same.
    unlabeled = [Example(ex.input, "") for ex in examples]
    results = method.assess(["A", "B", "C"], tables, unlabeled, ["yes", "no"])
    assert all(r["details"]["train_accuracy"] is None and r["score"] == 0.0 for r in results)
    assert results[2]["details"]["selected"] and results[2]["details"]["choices"]["oracle"] is None


# ---------------------------------------------------------------------------------------- in the engine


class TableScorer:
    """Label log-probs by the instruction: "Answer." says yes with p 0.6 everywhere; "sharp" is confident
    (p 0.99) and follows index % 4 < 2, which is right on half the items; "good" is right everywhere with p 0.7;
    "vague" says yes with p 0.55. The raw log-probs put mass 1.0 on the labels for "Answer.", 0.5 for the
    others."""

    name = "table"

    def __init__(self) -> None:
        self.info = BackendInfo(self.name, "test", "table-1", frozenset({Capability.LABEL_LOGPROBS}))
        self.sent = 0

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.split()) + 1

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            instruction, _, rest = request.prompt.partition("\nItem: ")
            index = int(re.match(r"item (\d+)", rest).group(1))
            if instruction == "Answer.":
                p_yes, mass = 0.6, 1.0
            elif instruction == "sharp":
                p_yes, mass = (0.99 if index % 4 < 2 else 0.01), 0.5
            elif instruction == "good":
                p_yes, mass = (0.7 if index % 2 == 0 else 0.3), 0.5
            else:
                p_yes, mass = 0.55, 0.5
            scores = LabelScores([math.log(p_yes * mass), math.log((1 - p_yes) * mass)], prompt_tokens=3)
            self.sent += 1
            if on_result is not None:
                on_result(i, scores)
            out.append(scores)
        return out


def select_plan(**params) -> JobPlan:
    return JobPlan(
        method=Select,
        params=SelectParams(**params),
        seed=0,
        task=make_task(),
        initial_prompt="Answer.",
        scorer_backend="table",
        optimizer_backend="table",
    )


def engine_for(plan: JobPlan, sink: ListSink, checkpoint=None) -> tuple[JobEngine, TableScorer]:
    scorer = TableScorer()
    engine = JobEngine(plan, sink, scorer=scorer, optimizer_llm=scorer, usage=Usage(), checkpoint=checkpoint)
    return engine, scorer


async def test_the_criterions_choice_is_the_best_even_where_dev_prefers_another():
    assert TEMPLATE.startswith("{prompt}\nItem: ")
    sink = ListSink()
    engine, scorer = engine_for(select_plan(candidates=["good", "sharp", "vague", "good"]), sink)
    outcome = await engine.run()
    n_train, n_dev, n_test = (len(make_task().split_examples(s)) for s in ("train", "dev", "test"))
    # Four distinct prompts on train, two dev scorings (the initial prompt, the choice), two test scorings.
    assert scorer.sent == 4 * n_train + 2 * n_dev + 2 * n_test
    initial, best = outcome.selection.initial, outcome.selection.best
    assert initial.prompt == "Answer." and best.prompt == "sharp"  # "good" is right on dev; MI picks "sharp"
    assert best.dev_score == pytest.approx(0.5) and best.train_objective > initial.train_objective
    assert [r.step for r in sink.steps] == [0, 1]
    assert [c.prompt for c in sink.steps[0].candidates] == ["Answer."]
    others = {c.prompt: c for c in sink.steps[1].candidates}
    assert list(others) == ["good", "sharp", "vague"]
    assert others["sharp"].details["chosen_by"][0] == "mi" and others["sharp"].details["selected"]
    assert others["good"].score == 1.0 and others["sharp"].score == pytest.approx(0.5, abs=0.2)
    summary = others["sharp"].details["choices"]
    assert summary["oracle"] == 1.0 and summary["criteria"]["mi"]["train_accuracy"] == others["sharp"].score
    assert "mi chose candidate 2" in sink.steps[0].message and "oracle 1.000" in sink.steps[0].message


async def test_the_initial_prompt_can_be_the_choice_and_a_resumed_job_ends_the_same():
    # ppl: "Answer." puts all its probability on the labels, the others half.
    plan = select_plan(candidates=["good", "sharp"], criterion="ppl")
    sink = ListSink()
    outcome = await engine_for(plan, sink)[0].run()
    assert outcome.selection.best.prompt == "Answer." and outcome.selection.best.step == 0
    assert sink.steps[1].dev_scores == {}  # nothing in step 1 could win: no dev scoring
    assert "ppl" in sink.steps[0].candidates[0].details["chosen_by"]

    # Resume from step 0's checkpoint (a JSON round trip): step 1 scores nothing on train and reports the same.
    checkpoint = json.loads(json.dumps(sink.steps[0].checkpoint))
    resumed_sink = ListSink()
    engine, scorer = engine_for(plan, resumed_sink, checkpoint)
    outcome = await engine.run()
    assert outcome.selection.best.prompt == "Answer."
    assert [r.step for r in resumed_sink.steps] == [1]
    assert [c.details for c in resumed_sink.steps[0].candidates] == [c.details for c in sink.steps[1].candidates]
    assert scorer.sent == len(make_task().split_examples("test"))  # only the test split, of the one prompt


def test_expected_calls_and_params():
    params = SelectParams(candidates=["a", "b"], train_subset=5)
    assert Select.expected_calls(params, 12, 6) == 3 * 5 + 2 * 6
    assert SelectParams(unlabeled_subset=7).train_subset == 7
    assert Select.check_params(SelectParams()) and not Select.check_params(params)
    with pytest.raises(ValueError):
        SelectParams(criterion="oracle")


# ---------------------------------------------------------------------------------------- through the API


def locs(response) -> list[str]:
    return [".".join(map(str, d["loc"])) for d in response.json()["error"]["details"]]


def select_job(**overrides) -> dict:
    body = label_job(method="select", **overrides)
    body["params"] = overrides.get("params", {"candidates": ["Answer with one word.", "Is it entailed?"]})
    return body


async def upload(app_client, examples: list[dict]) -> str:
    response = await app_client.post("/v1/datasets", json={"name": "snli-unlabeled", "examples": examples})
    assert response.status_code == 201, response.text
    return response.json()["id"]


async def test_select_validation(app_client):
    response = await app_client.post("/v1/jobs", json=select_job(params={}))
    assert response.status_code == 422 and locs(response) == ["body.params.candidates"]
    response = await app_client.post("/v1/jobs", json=select_job(task={"dataset": "builtin:gsm8k"}))
    assert response.status_code == 422 and locs(response) == ["body.task.metric"]
    assert "select" in response.text

    methods = {m["name"]: m for m in (await app_client.get("/v1/methods")).json()}
    assert methods["select"]["scorer_needs"] == ["label_logprobs"]
    assert set(methods["select"]["parameters"]["properties"]) >= {"candidates", "criterion", "calibration"}
    assert methods["select"]["expected_calls"]["default"] == 112 + 2 * 56 + 2 * 56

    from app.datasets.builtin import BUILTIN_TASKS

    unlabeled = [{"input": ex["input"], "target": ""} for ex in BUILTIN_TASKS["snli16"].examples()]
    dataset = await upload(app_client, unlabeled)
    task = {"dataset": dataset, "template": "{prompt}\n{input}\nAnswer:", "metric": "label_accuracy"}
    task["labels"] = ["entailment", "neutral", "contradiction"]
    other = label_job(method="evaluate", task=task)
    other["params"] = {}
    response = await app_client.post("/v1/jobs", json=other)
    assert response.status_code == 422 and locs(response) == ["body.task.labels"]
    assert "only method 'select'" in response.text
    response = await app_client.post("/v1/jobs", json=select_job(task=task))
    assert response.status_code == 422 and locs(response) == ["body.task.split.dev"]
    response = await app_client.post("/v1/jobs", json=select_job(task={**task, "split": {"dev": 0.0}}))
    assert response.status_code == 422 and locs(response) == ["body.task.split.test"]
    response = await app_client.post(
        "/v1/jobs", json=select_job(task={**task, "split": {"kind": "k_shot", "train_per_class": 2}})
    )
    assert response.status_code == 422 and locs(response) == ["body.task.split.kind"]


async def test_select_jobs_on_labeled_and_unlabeled_data(app_client, worker):
    # Labeled: the usual split; the criterion's choice is scored on dev and test.
    response = await app_client.post(
        "/v1/jobs", json=select_job(params={"candidates": ["Answer.", "Think."], "criterion": "ge"})
    )
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["stop_reason"] == "completed", job
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step")).json()["items"]
    assert len(candidates) == 3
    chosen = [c for c in candidates if c["details"]["selected"]]
    assert len(chosen) == 1 and job["best"]["prompt"] == chosen[0]["prompt"]
    assert "ge" in chosen[0]["details"]["chosen_by"] and job["best"]["test_score"] is not None
    assert all(c["details"]["train_accuracy"] == c["score"] for c in candidates)

    # Unlabeled train inputs, a labeled test set: select on the inputs alone, measure on the test set.
    from app.datasets.builtin import BUILTIN_TASKS

    examples = BUILTIN_TASKS["snli16"].examples()
    unlabeled = await upload(app_client, [{"input": ex["input"], "target": ""} for ex in examples[::2]])
    labeled = await upload(app_client, examples[1::2])
    task = {"dataset": unlabeled, "test_dataset": labeled, "split": {"train": 1.0, "dev": 0.0}}
    task |= {"template": "{prompt}\n{input}\nAnswer:", "metric": "label_accuracy"}
    task["labels"] = ["entailment", "neutral", "contradiction"]
    body = select_job(task=task, params={"candidates": ["Answer.", "Think."], "calibration": "cbm"})
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["best"]["test_score"] is not None and job["best"]["dev_score"] == 0.0  # no dev split: nothing scored
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates")).json()["items"]
    assert all(c["details"]["train_accuracy"] is None and c["details"]["labeled_inputs"] == 0 for c in candidates)
    assert job["usage"]["llm_calls"] <= 3 * 24 + 2 * 24

    # Unlabeled and nothing to test on: the choice alone.
    body = select_job(task={**task, "test_dataset": None, "split": {"train": 1.0, "dev": 0.0, "test": 0.0}})
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["best"]["test_score"] is None, job


async def test_candidates_of_earlier_jobs_join_on_submission(app_client, worker, db):
    """`from_jobs`: each job's best distinct text prompts (dev score first, then train), stored in the job's spec."""
    opro = await insert_job(
        db,
        "opro",
        [
            {"step": 0, "prompt": "Answer.", "score": 0.5, "dev_score": 0.5},
            {"step": 1, "prompt": "Decide.", "score": 0.9},  # no dev score: after every candidate that has one
            {"step": 1, "prompt": "Is it entailed?", "score": 0.6, "dev_score": 0.7},
            {"step": 2, "prompt": "Is it entailed?", "score": 0.6, "dev_score": 0.7},  # again: once
            {"step": 2, "prompt": "Say yes or no.", "score": 0.8, "dev_score": 0.6},
        ],
    )
    fewshot = await insert_job(
        db,
        "fewshot",
        [
            {"step": 0, "prompt": "Answer.", "score": 0.5, "details": {"instruction": "Answer."}},
            {"step": 1, "prompt": "Answer. [4 nearest]", "score": 0.9, "details": {"nearest": 4, "pool": 24}},
            {"step": 1, "prompt": "A\nAnswer: yes\n\nAnswer.", "score": 0.7, "details": {"demonstrations": [3]}},
        ],
    )
    bbt = await insert_job(db, "bbt", [{"step": 1, "prompt": "soft prompt (50 vectors)", "score": 0.9}])
    foreign = await insert_job(db, "opro", [{"step": 0, "prompt": "Theirs.", "score": 0.9}], tenant="other")

    params = {"candidates": ["Think."], "from_jobs": [{"job_id": opro, "top": 3}, {"job_id": fewshot}]}
    estimate = await app_client.post("/v1/jobs/estimate", json=select_job(params=params))
    assert estimate.status_code == 200, estimate.text
    response = await app_client.post("/v1/jobs", json=select_job(params=params))
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    expected = ["Think.", "Is it entailed?", "Say yes or no.", "Answer.", "A\nAnswer: yes\n\nAnswer."]
    assert job["spec"]["params"]["candidates"] == expected
    assert job["spec"]["params"]["from_jobs"] == [{"job_id": opro, "top": 3}, {"job_id": fewshot, "top": 10}]
    scored = {c["prompt"] for c in (await app_client.get(f"/v1/jobs/{job['id']}/candidates")).json()["items"]}
    assert set(expected) <= scored

    # Only candidates from jobs: enough on its own.
    response = await app_client.post("/v1/jobs/estimate", json=select_job(params={"from_jobs": [{"job_id": opro}]}))
    assert response.status_code == 200, response.text

    for source, fragment in ((bbt, "not text prompts"), (foreign, "no job"), ("nope", "no job")):
        body = select_job(params={"from_jobs": [{"job_id": opro}, {"job_id": source}]})
        response = await app_client.post("/v1/jobs", json=body)
        assert response.status_code == 422 and locs(response) == ["body.params.from_jobs.1.job_id"], response.text
        assert fragment in response.text
    response = await app_client.post("/v1/jobs", json=select_job(params={"from_jobs": [{"job_id": opro, "top": 0}]}))
    assert response.status_code == 422 and locs(response) == ["body.params.from_jobs.0.top"]
