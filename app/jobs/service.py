"""Job decisions: validation that needs the database or the backends, defaults, reading jobs back."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from app.cache.store import CacheStore, DurableCacheStore
from app.datasets.repository import DatasetRepository
from app.datasets.service import BUILTIN_PREFIX, builtin_task, resolve_examples, resolve_task_examples
from app.errors import InvalidPayload, NotFound, ServiceUnavailable
from app.evaluation.evaluator import JUDGE_METRIC, Evaluator, Predictor, Prompt, SoftPrompt, prompt_name
from app.evaluation.metrics import target_problem
from app.evaluation.task import Example, Task
from app.jobs.engine import JobPlan, task_from_spec
from app.jobs.models import Job, JobStatus
from app.jobs.repository import JobRepository
from app.jobs.schemas import JobCreateBase, PredictIn
from app.jobs.views import JobEstimate, JobRead, Progress, PromptResult, SecondsRange, UsageOut
from app.llm.metered import PREFIX_CAPABILITY, MeteredLLM
from app.llm.port import BackendUnavailable, Capability, CapabilityMissing
from app.llm.registry import BackendRegistry
from app.optimizers.base import instruction_hash, subset_positions
from app.optimizers.registry import METHODS
from app.settings import WebhookSettings
from app.usage import Budget, Usage
from app.webhooks.service import resolve_webhook

DEFAULT_TEMPLATE = "{prompt}\n\n{input}"
DEFAULT_METRIC = "exact_match"


def _check_backends(payload: JobCreateBase, registry: BackendRegistry, method: str) -> None:
    method_cls = METHODS[method]
    for role, needs in (("scorer", method_cls.scorer_needs), ("optimizer", method_cls.optimizer_needs)):
        name = getattr(payload.backends, role)
        if name not in registry.names:
            raise InvalidPayload(["backends", role], f"unknown backend {name!r}", allowed=registry.names)
        have = registry.capabilities(name)
        for capability in sorted(needs - have):
            raise InvalidPayload(
                ["backends", role],
                f"method {method!r} needs capability {capability.value!r} on its {role} backend, "
                f"and backend {name!r} lacks it; backends that have it: {registry.with_capability(capability)}",
                allowed=registry.with_capability(capability),
            )


async def submit_job(
    payload: JobCreateBase,
    *,
    jobs: JobRepository,
    datasets: DatasetRepository,
    registry: BackendRegistry,
    tenant: str,
    webhooks: WebhookSettings,
    study: tuple[str, int] | None = None,
) -> tuple[Job, list[str]]:
    """Validate and store a job; returns it with the warnings a client should see (not errors: it was accepted).
    `study`: the study and arm index the job is a run of."""
    await resolve_candidate_sources(payload, jobs=jobs, tenant=tenant)
    spec, plan = await plan_job(payload, datasets=datasets, registry=registry, tenant=tenant)
    spec["webhook"] = await resolve_webhook(spec.get("webhook"), tenant, webhooks)
    method = spec["method"]
    job = Job(
        id=str(uuid.uuid4()),
        tenant=tenant,
        method=method,
        status=JobStatus.QUEUED,
        spec=spec,
        step=0,
        total_steps=plan.new_optimizer().total_steps,
        llm_calls=0,
        prompt_tokens=0,
        completion_tokens=0,
        cache_hits=0,
        cost=0.0,
        elapsed_seconds=0.0,
        attempts=0,
        cancel_requested=False,
        study_id=None if study is None else study[0],
        study_arm=None if study is None else study[1],
    )
    await jobs.add(job)
    await jobs.add_event(job.id, "state", {"status": JobStatus.QUEUED.value})
    warnings = budget_warnings(plan, registry.info(plan.scorer_backend).geometry.get("num_layers", 30))
    for warning in warnings:
        await jobs.add_event(job.id, "warning", {"message": warning})
    return job, warnings


async def resolve_candidate_sources(payload: JobCreateBase, *, jobs: JobRepository, tenant: str) -> None:
    """`params.from_jobs` (method `select`): each source job's `top` distinct text candidates, best first, are
    appended to `params.candidates`, so the stored job lists every prompt it chooses among and the worker reads no
    other job."""
    params = getattr(payload, "params", None)
    sources = getattr(params, "from_jobs", None)
    if not sources:
        return
    prompts = list(params.candidates)  # type: ignore[union-attr]
    for index, source in enumerate(sources):
        loc = ["params", "from_jobs", index, "job_id"]
        job = await jobs.get(source.job_id, tenant)
        if job is None:
            raise InvalidPayload(loc, f"no job {source.job_id!r}")
        method = METHODS.get(job.method)
        ranked = await jobs.ranked_candidates(job.id)
        texts = [prompt for prompt, details in ranked if method is None or method.text_candidate(details)]
        if not texts:
            why = "it has no candidates yet" if not ranked else f"its {job.method} candidates are not text prompts"
            raise InvalidPayload(loc, f"job {job.id} gives no text candidates: {why}")
        prompts.extend(list(dict.fromkeys(texts))[: source.top])
    merged = list(dict.fromkeys(prompts))
    try:
        payload.params = type(params).model_validate({**params.model_dump(), "candidates": merged})  # type: ignore[attr-defined]
    except ValidationError as error:
        raise InvalidPayload(
            ["params", "from_jobs"],
            f"{len(merged)} distinct candidates in all: {error.errors()[0]['msg']}; lower `top`",
        ) from None


async def plan_job(
    payload: JobCreateBase, *, datasets: DatasetRepository, registry: BackendRegistry, tenant: str
) -> tuple[dict, JobPlan]:
    """Validate a job against its datasets and backends; returns its spec (defaults filled in) and its plan."""
    method = payload.method  # type: ignore[attr-defined]
    _check_backends(payload, registry, method)

    task = payload.task
    builtin = builtin_task(task.dataset)
    examples = await _examples_of(datasets, task.dataset, tenant, "dataset")
    test_examples = None
    if task.test_dataset is not None:
        test_examples = await _examples_of(datasets, task.test_dataset, tenant, "test_dataset")
    if len(examples) < (2 if test_examples else 3):
        raise InvalidPayload(["task", "dataset"], "a job needs at least 3 examples (train, dev and test)")

    resolved = task.model_copy(deep=True)
    if test_examples is not None and resolved.split.kind == "fraction":
        resolved.split.test = 0.0  # the test set is the other dataset: `dataset` gives train and dev only
    resolved.template = task.template or (builtin.template if builtin else DEFAULT_TEMPLATE)
    resolved.metric = task.metric or (builtin.metric if builtin else DEFAULT_METRIC)
    if task.labels is None and builtin is not None and resolved.metric == builtin.metric:
        resolved.labels = builtin.labels
        resolved.verbalizer = task.verbalizer if task.verbalizer is not None else builtin.verbalizer
    resolved.max_new_tokens = task.max_new_tokens or (builtin.max_new_tokens if builtin else 64)
    if resolved.metric == "label_accuracy":
        if not resolved.labels:
            raise InvalidPayload(["task", "labels"], "metric 'label_accuracy' needs labels")
        # A method that never reads train targets (select) may take unlabeled examples: empty targets.
        unlabeled = METHODS[method].accepts_unlabeled and any(ex["target"] == "" for ex in examples)
        targets = {ex["target"] for ex in examples if not (unlabeled and ex["target"] == "")}
        targets |= {ex["target"] for ex in test_examples or []}
        unknown = sorted(targets - set(resolved.labels))
        if unknown:
            hint = (
                " (an empty target is an unlabeled example: only method 'select' takes them)" if "" in unknown else ""
            )
            raise InvalidPayload(
                ["task", "labels"], f"targets {unknown[:10]} are not among the labels{hint}", allowed=resolved.labels
            )
        if unlabeled:
            _check_unlabeled_split(resolved)
    elif resolved.metric == JUDGE_METRIC:
        _check_judge(resolved, registry)
    elif resolved.metric in ("regex", "json_schema"):
        for index, example in enumerate([*examples, *(test_examples or [])]):
            problem = target_problem(resolved.metric, example["target"])
            if problem is not None:
                raise InvalidPayload(["task", "dataset"], f"example {index}: the target is {problem}")
    if resolved.split.kind == "k_shot" and resolved.metric != "label_accuracy":
        raise InvalidPayload(
            ["task", "split", "kind"], "a k_shot split needs a label task (metric 'label_accuracy')", allowed="fraction"
        )

    for loc, message in METHODS[method].check_task(resolved.model_dump(mode="json")):
        raise InvalidPayload(["task", *loc], message)
    for loc, message in METHODS[method].check_params(payload.params):  # type: ignore[attr-defined]
        raise InvalidPayload(["params", *loc], message)
    _check_calibration(resolved, registry, payload.backends.scorer)

    initial_prompt = payload.initial_prompt
    if initial_prompt is None:
        initial_prompt = builtin.initial_prompt if builtin else ""
    spec = payload.model_dump(mode="json")
    spec["task"] = resolved.model_dump(mode="json")
    spec["initial_prompt"] = initial_prompt

    spec["method"] = method
    plan = JobPlan.from_spec(spec, examples, test_examples)
    _check_split_sizes(plan.task)
    for loc, message in plan.method.check_split(plan.params, plan.task):
        raise InvalidPayload(["params", *loc], message)
    return spec, plan


def _check_unlabeled_split(task) -> None:
    """Unlabeled examples can be selected on but not scored: dev and test must not be drawn from them."""
    split = task.split
    if split.kind != "fraction":
        raise InvalidPayload(
            ["task", "split", "kind"],
            "a dataset with unlabeled examples (empty targets) needs a fraction split",
            allowed="fraction",
        )
    for part in ("dev", "test"):
        if getattr(split, part) > 0:
            where = "; give a labeled test_dataset to measure the result" if part == "test" else ""
            raise InvalidPayload(
                ["task", "split", part],
                f"the dataset has unlabeled examples (empty targets), which cannot be scored on {part}: set "
                f"split.{part} to 0{where}",
                allowed=0,
            )


def _check_calibration(task, registry: BackendRegistry, scorer: str) -> None:
    """Calibration rescales label probabilities: it needs a label task scored by label log-probs."""
    if task.calibration == "none":
        return
    if task.metric != "label_accuracy" or not task.labels:
        raise InvalidPayload(
            ["task", "calibration"],
            f"calibration {task.calibration!r} rescales label probabilities: it needs metric 'label_accuracy' with "
            "labels",
            allowed="none",
        )
    if Capability.LABEL_LOGPROBS not in registry.capabilities(scorer):
        having = registry.with_capability(Capability.LABEL_LOGPROBS)
        raise InvalidPayload(
            ["task", "calibration"],
            f"calibration {task.calibration!r} needs label log-probs, and scorer backend {scorer!r} lacks "
            f"capability 'label_logprobs'; backends that have it: {having}",
            allowed="none",
        )


def _check_judge(task, registry: BackendRegistry) -> None:
    if task.judge is None:
        raise InvalidPayload(["task", "judge"], "metric 'llm_judge' needs task.judge (a rubric and a backend)")
    name = task.judge.backend
    if name not in registry.names:
        raise InvalidPayload(["task", "judge", "backend"], f"unknown backend {name!r}", allowed=registry.names)
    if Capability.GENERATE not in registry.capabilities(name):
        raise InvalidPayload(["task", "judge", "backend"], f"backend {name!r} cannot generate text")


async def _examples_of(datasets: DatasetRepository, ref: str, tenant: str, field: str) -> list[dict[str, str]]:
    try:
        return await resolve_examples(datasets, ref, tenant)
    except NotFound as exc:
        allowed = [BUILTIN_PREFIX + "<name>", "<dataset id>"]
        raise InvalidPayload(["task", field], exc.message, allowed=allowed) from exc


def _check_split_sizes(task: Task) -> None:
    """Every split a job uses must have examples (dev may be empty only when asked for)."""
    k_shot = task.split.kind == "k_shot"
    wanted_dev = task.split.dev_per_class != 0 if k_shot else task.split.dev > 0
    wanted_test = k_shot or task.test_examples is not None or task.split.test > 0
    for split, wanted in (("train", True), ("dev", wanted_dev), ("test", wanted_test)):
        if wanted and not task.split_examples(split):
            where = (
                ["task", "test_dataset"] if split == "test" and task.test_examples is not None else ["task", "split"]
            )
            raise InvalidPayload(where, f"the {split} split would be empty; use more examples or another split")


def budget_warnings(plan: JobPlan, num_layers: int) -> list[str]:
    """What a client should hear before the job runs: a call budget below what its parameters are expected to need
    (the search would stop on the budget, before the method is done)."""
    if plan.max_llm_calls is None:
        return []
    task = plan.task
    n_test = len(task.split_examples("test"))
    search = plan.method.expected_calls(
        plan.params, len(task.split_examples("train")), len(task.split_examples("dev")), num_layers
    )
    needed = search + 2 * n_test
    if needed <= plan.max_llm_calls:
        return []
    return [
        f"budget.max_llm_calls {plan.max_llm_calls} is below the about {needed} calls these parameters are expected "
        f"to need ({search} for the search and dev selection, {2 * n_test} for the test split): the search will "
        "likely stop on the budget before it is done (stop_reason 'budget'). Raise the budget or use a smaller "
        "preset; GET /v1/methods lists each preset's expected calls."
    ]


def job_progress(job: Job) -> Progress:
    total = max(job.total_steps, 0)
    status = JobStatus(job.status)
    phase = job.phase if status == JobStatus.RUNNING else None
    if phase is not None:
        # Parts: the initial scoring, each search step, the test scoring.
        completed = {"initial": 0, "search": phase["step"], "test": total + 1}.get(phase["name"], 0)
        done, expected = phase.get("done") or 0, phase.get("total")
        partial = min(1.0, done / expected) if expected else 0.0
        return Progress(
            step=job.step,
            total_steps=total,
            fraction=round(min(1.0, (completed + partial) / (total + 2)), 4),
            phase=phase["name"],
            phase_step=phase["step"],
            phase_done=done,
            phase_total=expected,
        )
    if status == JobStatus.RUNNING:  # an attempt starting: its first phase is not written yet
        name, step, completed = ("search", job.step + 1, job.step + 1) if job.step else ("initial", 0, 0)
        return Progress(
            step=job.step, total_steps=total, fraction=round(completed / (total + 2), 4), phase=name, phase_step=step
        )
    fraction = 1.0 if status == JobStatus.SUCCEEDED and job.stop_reason == "completed" else 0.0
    if total and fraction < 1.0:
        fraction = min(1.0, job.step / total)
    return Progress(
        step=job.step, total_steps=total, fraction=round(fraction, 4), phase="finished" if status.terminal else "queued"
    )


def job_read(job: Job, *, with_spec: bool = False) -> JobRead:
    return JobRead(
        id=job.id,
        tenant=job.tenant,
        method=job.method,
        status=job.status,
        stop_reason=job.stop_reason,
        progress=job_progress(job),
        usage=UsageOut(
            llm_calls=job.llm_calls,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            cache_hits=job.cache_hits,
            cost=round(job.cost or 0.0, 6),
        ),
        initial=PromptResult(**job.initial) if job.initial else None,
        best=PromptResult(**job.best) if job.best else None,
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        spec=job.spec if with_spec else None,
    )


async def get_job(jobs: JobRepository, job_id: str, tenant: str) -> Job:
    job = await jobs.get(job_id, tenant)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


async def cancel_job(jobs: JobRepository, job_id: str, tenant: str) -> Job:
    job = await get_job(jobs, job_id, tenant)
    if JobStatus(job.status).terminal:
        return job  # idempotent
    if await jobs.cancel_if_queued(job_id):
        await jobs.add_event(job_id, "state", {"status": JobStatus.CANCELLED.value, "stop_reason": "cancelled"})
    else:
        await jobs.request_cancel(job_id)
        await jobs.add_event(job_id, "cancel_requested", {})
    await jobs.session.refresh(job)
    return job


# CBM at predict time divides by the mean label probabilities over the job's train inputs (at most this many, a
# fixed seeded subset): the same every call, whatever the batch, and found in the evaluation cache once scored.
CBM_REFERENCE_LIMIT = 1000
_CBM_REFERENCE_PURPOSE = 7001


@dataclass(slots=True)
class PredictionPrompt:
    prompt: Prompt  # text, or a soft prompt rebuilt from its artifact
    task: Task
    artifact: dict | None
    # task.calibration "cbm": the inputs whose mean label probabilities the predictions are divided by.
    reference: list[Example] | None = None

    @property
    def description(self) -> str:
        return prompt_name(self.prompt)


async def prediction_prompt(
    jobs: JobRepository, job_id: str, tenant: str, body: PredictIn, datasets: DatasetRepository | None = None
) -> tuple[PredictionPrompt, str]:
    """The prompt `predict` applies (the job's best or initial) and the backend to apply it with; for a task
    calibrated by CBM, also its reference inputs (from `datasets`)."""
    job = await get_job(jobs, job_id, tenant)
    chosen = job.best if body.use == "best" else job.initial
    if chosen is None:
        raise InvalidPayload(["use"], f"job has no {body.use} prompt yet (status {job.status})")
    task = task_from_spec(job.spec["task"], [])
    stored = await jobs.artifact(job.id, instruction_hash(chosen["prompt"]))
    if stored is None:
        prediction = PredictionPrompt(chosen["prompt"], task, None)
    else:
        prediction = PredictionPrompt(METHODS[job.method].prompt_from_artifact(stored.data), task, stored.data)
    if task.calibration == "cbm" and datasets is not None:
        prediction.reference = await calibration_reference(datasets, job.spec, tenant)
    return prediction, body.backend or job.spec["backends"]["scorer"]


async def calibration_reference(datasets: DatasetRepository, spec: dict, tenant: str) -> list[Example]:
    """The job's train inputs (at most `CBM_REFERENCE_LIMIT`, a subset seeded by the job's seed): CBM's mean at
    predict time."""
    try:
        examples, test_examples = await resolve_task_examples(datasets, spec["task"], tenant)
    except NotFound as exc:
        raise NotFound(
            f"{exc.message}: calibration 'cbm' predicts relative to the job's train inputs, and its dataset is gone"
        ) from exc
    train = task_from_spec(spec["task"], examples, test_examples).split_examples("train")
    positions = subset_positions(len(train), CBM_REFERENCE_LIMIT, spec.get("seed", 0), _CBM_REFERENCE_PURPOSE)
    return [train[i] for i in positions]


class CacheReader:
    """The evaluation cache, read only: predict finds the answers jobs stored (CBM's reference inputs, scored
    during the job) and stores none of its own."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        return await self.store.get_many(keys)

    def submit(self, key: str | None, model_id: str, value: dict, usage: Usage) -> None:
        pass

    async def flush(self) -> None:
        pass


def cache_reader(db) -> CacheReader:
    return CacheReader(DurableCacheStore(db))


async def job_artifact(jobs: JobRepository, job_id: str, tenant: str, use: str) -> dict:
    job = await get_job(jobs, job_id, tenant)
    chosen = job.best if use == "best" else job.initial
    stored = await jobs.artifact(job.id, instruction_hash(chosen["prompt"])) if chosen else None
    if stored is None:
        raise NotFound(
            f"job {job_id!r} has no {use} artifact (a soft prompt or a trained head; text prompts have none)"
        )
    return stored.data


async def predict(
    registry: BackendRegistry,
    prediction: PredictionPrompt,
    backend_name: str,
    inputs: Sequence[str],
    *,
    cache: CacheStore | None = None,
    cache_scope: str | None = None,
) -> list[str]:
    """`cache`, `cache_scope`: where the scorer's answers may be found (the job's tenant's evaluation cache)."""
    if backend_name not in registry.names:
        raise InvalidPayload(["backend"], f"unknown backend {backend_name!r}", allowed=registry.names)
    calibration = prediction.task.calibration
    if calibration != "none" and Capability.LABEL_LOGPROBS not in registry.capabilities(backend_name):
        raise InvalidPayload(
            ["backend"],
            f"the job's task is calibrated ({calibration!r}), which needs label log-probs, and backend "
            f"{backend_name!r} lacks capability 'label_logprobs'",
            allowed=registry.with_capability(Capability.LABEL_LOGPROBS),
        )
    soft = isinstance(prediction.prompt, SoftPrompt)  # other artifacts (per-input demonstrations) are model-free
    if soft:
        capability = PREFIX_CAPABILITY[prediction.prompt.prefix.kind]  # type: ignore[union-attr]
        if capability not in registry.capabilities(backend_name):
            raise InvalidPayload(
                ["backend"],
                f"this soft prompt needs capability {capability.value!r}, which backend {backend_name!r} lacks",
                allowed=registry.with_capability(capability),
            )
    if isinstance(prediction.prompt, Predictor):  # the model as far as known before starting the backend
        _check_predictor_backend(prediction.prompt, registry, backend_name, registry.info(backend_name).model_id)
    backend = await registry.get(backend_name)
    if isinstance(prediction.prompt, Predictor):
        _check_predictor_backend(prediction.prompt, registry, backend_name, backend.info.model_id)
    if soft and prediction.artifact is not None and backend.info.model_id != prediction.artifact["model_id"]:
        raise InvalidPayload(
            ["backend"],
            f"this soft prompt was trained on model {prediction.artifact['model_id']!r}; backend {backend_name!r} "
            f"serves {backend.info.model_id!r}, and soft prompts do not transfer between models",
        )
    llm = MeteredLLM(backend, usage=Usage(), budget=Budget(), store=cache, cache_scope=cache_scope)
    evaluator = Evaluator(prediction.task, llm)
    try:
        (outputs,) = await evaluator.predict(
            [prediction.prompt], [Example(text, "") for text in inputs], reference=prediction.reference
        )
    except BackendUnavailable as exc:
        raise ServiceUnavailable(
            f"backend {backend_name!r} is not answering; retry shortly", headers={"Retry-After": "5"}
        ) from exc
    except CapabilityMissing as exc:
        # The API grants an HTTP backend `input_embeddings` on its configuration (the check above) and checks the
        # served model's weights only before its first soft prompt: a failed check is the caller's to fix.
        raise InvalidPayload(["backend"], str(exc)) from exc
    return outputs


def _check_predictor_backend(
    predictor: Predictor, registry: BackendRegistry, backend_name: str, model_id: str | None = None
) -> None:
    """A trained predictor (a CrossTune head) needs its capability on the backend, and the model it was trained on
    (checked where `model_id`, the backend's, is known): features do not transfer between models."""
    capability = predictor.capability
    if capability not in registry.capabilities(backend_name):
        raise InvalidPayload(
            ["backend"],
            f"this trained head needs capability {capability.value!r}, which backend {backend_name!r} lacks",
            allowed=registry.with_capability(capability),
        )
    if model_id and predictor.model_id is not None and model_id != predictor.model_id:
        raise InvalidPayload(
            ["backend"],
            f"this head was trained on features of model {predictor.model_id!r}; backend {backend_name!r} serves "
            f"{model_id!r}, and features do not transfer between models",
        )


# Without history, a token is taken to be about this many characters (English text and BPE vocabularies).
CHARS_PER_TOKEN = 4
# Recent finished jobs the estimate learns tokens per call and calls per second from.
ESTIMATE_HISTORY = 20


async def estimate_job(
    payload: JobCreateBase, *, jobs: JobRepository, datasets: DatasetRepository, registry: BackendRegistry, tenant: str
) -> JobEstimate:
    """A dry run: the job validated as on submission, and what it is expected to cost."""
    await resolve_candidate_sources(payload, jobs=jobs, tenant=tenant)
    spec, plan = await plan_job(payload, datasets=datasets, registry=registry, tenant=tenant)
    task = plan.task
    sizes = {split: len(task.split_examples(split)) for split in ("train", "dev", "test")}
    num_layers = registry.info(plan.scorer_backend).geometry.get("num_layers", 30)
    calls = plan.method.expected_calls(plan.params, sizes["train"], sizes["dev"], num_layers) + 2 * sizes["test"]

    history = await jobs.recent_finished(tenant, plan.scorer_backend, limit=ESTIMATE_HISTORY)
    same_kind = [j for j in history if j.method == spec["method"] and j.spec["task"]["dataset"] == task_dataset(spec)]
    if same_kind:
        per_call = sorted((j.prompt_tokens + j.completion_tokens) / j.llm_calls for j in same_kind)[len(same_kind) // 2]
        basis = f"median tokens per call of {len(same_kind)} earlier {spec['method']} jobs on this dataset"
    else:
        examples = task.split_examples("train") or task.split_examples("dev")
        extra = max(map(len, plan.method.prompt_extras(plan.params, task, plan.seed)))  # demonstrations, if any
        rendered = [len(task.template) + len(plan.initial_prompt) + extra + len(ex.input) for ex in examples] or [0]
        completion = 1 if task.metric == "label_accuracy" else task.max_new_tokens
        per_call = sum(rendered) / len(rendered) / CHARS_PER_TOKEN + completion
        basis = f"the prompts' length (about {CHARS_PER_TOKEN} characters a token); no earlier job to learn from"
    tokens = int(round(calls * per_call))
    rates = [j.llm_calls / j.elapsed_seconds for j in history if j.elapsed_seconds > 0]
    seconds = SecondsRange(low=calls / max(rates), high=calls / min(rates)) if rates else None
    return JobEstimate(
        expected_llm_calls=calls,
        expected_tokens=tokens,
        tokens_basis=basis,
        expected_cost=round(registry.price(plan.scorer_backend).cost(tokens, 0), 6),
        seconds=seconds,
        split=sizes,
        warnings=budget_warnings(plan, num_layers),
    )


def task_dataset(spec: dict) -> str:
    return spec["task"]["dataset"]
