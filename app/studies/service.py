"""Creating a study (one job per arm x seed, identical splits per seed), cancelling it, and reading its progress
and leaderboard from its jobs."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from pydantic import ValidationError

from app.datasets.repository import DatasetRepository
from app.errors import InvalidPayload, NotFound
from app.evaluation.statistics import bootstrap_mean_interval, pooled_paired_comparison
from app.jobs import service as jobs_service
from app.jobs.models import Job, JobStatus
from app.jobs.repository import JobRepository
from app.jobs.schemas import job_create_adapter, normalize_job_error
from app.llm.registry import BackendRegistry
from app.optimizers.base import instruction_hash
from app.settings import WebhookSettings
from app.studies.models import Study
from app.studies.repository import StudyRepository
from app.studies.views import ArmResult, Comparison, Interval, RunRead, StudyRead

BASELINE_METHOD = "evaluate"
# Fixed, so a leaderboard reads the same every time it is asked for.
STATISTICS_SEED = 0


def resolved_arms(payload) -> list[dict[str, Any]]:
    """The study's arms, then one `evaluate` arm per baseline prompt; each with a unique name. Every `evaluate` arm
    is a baseline."""
    arms = [arm.model_dump(mode="json") for arm in payload.arms]
    for number, prompt in enumerate(payload.baselines, start=1):
        arms.append({"name": f"baseline {number}", "method": BASELINE_METHOD, "params": {}, "initial_prompt": prompt})
    seen: Counter[str] = Counter()
    for arm in arms:
        base = arm.get("name") or arm["method"]
        seen[base] += 1
        arm["name"] = base if seen[base] == 1 else f"{base} #{seen[base]}"
        arm["baseline"] = arm["method"] == BASELINE_METHOD  # no search: a reference the others are compared with
    return arms


def _in_arm(exc: InvalidPayload, arm_index: int) -> InvalidPayload:
    """A job's validation error, placed in the study body: task errors stay at `task`, the rest go to the arm."""
    details = []
    for detail in exc.details or []:
        loc = list(detail["loc"])
        if len(loc) > 1 and loc[1] not in ("task",):
            loc = [loc[0], "arms", str(arm_index), *loc[1:]]
        details.append({**detail, "loc": loc})
    error = InvalidPayload([], exc.message)
    error.details = details
    error.message = "; ".join(f"{'.'.join(d['loc'][1:])}: {d['msg']}" for d in details) or exc.message
    return error


async def create_study(
    payload, *, studies: StudyRepository, jobs: JobRepository, datasets: DatasetRepository, registry: BackendRegistry,
    tenant: str, webhooks: WebhookSettings,
) -> tuple[Study, list[Job], list[str]]:  # fmt: skip
    arms = resolved_arms(payload)
    runs = len(arms) * len(payload.seeds)
    per_run_cap = None
    if payload.budget.max_llm_calls is not None:
        per_run_cap = payload.budget.max_llm_calls // runs
        if per_run_cap < 1:
            raise InvalidPayload(
                ["budget", "max_llm_calls"], f"less than one LLM call for each of the {runs} runs", f">= {runs}"
            )
    task = payload.task.model_dump(mode="json")
    spec = payload.model_dump(mode="json")
    spec["arms"] = arms
    study = await studies.add(Study(id=str(uuid.uuid4()), tenant=tenant, name=payload.name, spec=spec))

    created: list[Job] = []
    warnings: list[str] = []
    for arm_index, arm in enumerate(arms):
        budget = dict(arm.get("budget") or {})
        if per_run_cap is not None:
            budget["max_llm_calls"] = min(budget.get("max_llm_calls") or per_run_cap, per_run_cap)
        for seed in payload.seeds:
            body = {
                "method": arm["method"],
                "params": arm["params"],
                "task": {**task, "split": {**task["split"], "seed": seed}},
                "initial_prompt": arm.get("initial_prompt") or payload.initial_prompt,
                "backends": arm.get("backends") or {},
                "budget": budget,
                "seed": seed,
            }
            try:
                job_payload = job_create_adapter().validate_python(body)
                job, job_warnings = await jobs_service.submit_job(
                    job_payload, jobs=jobs, datasets=datasets, registry=registry, tenant=tenant,
                    webhooks=webhooks, study=(study.id, arm_index),
                )  # fmt: skip
            except ValidationError as exc:  # the arm was valid on its own: the study's budget share made it invalid
                err = normalize_job_error(
                    {**exc.errors(include_url=False)[0], "loc": ("body", *exc.errors()[0]["loc"])}
                )
                raise _in_arm(InvalidPayload([str(p) for p in err["loc"][1:]], err["msg"]), arm_index) from exc
            except InvalidPayload as exc:
                raise _in_arm(exc, arm_index) from exc
            created.append(job)
            warnings += [
                f"arm {arm['name']!r}: {w}" for w in job_warnings if f"arm {arm['name']!r}: {w}" not in warnings
            ]
    return study, created, warnings


async def get_study(studies: StudyRepository, study_id: str, tenant: str) -> Study:
    study = await studies.get(study_id, tenant)
    if study is None:
        raise NotFound(f"study {study_id!r} not found")
    return study


async def cancel_study(studies: StudyRepository, jobs: JobRepository, study_id: str, tenant: str) -> Study:
    """Cancels every run that has not ended (queued ones at once, running ones by their workers)."""
    study = await get_study(studies, study_id, tenant)
    await studies.request_cancel(study.id)
    for job in await jobs.of_studies([study.id]):
        if not JobStatus(job.status).terminal:
            await jobs_service.cancel_job(jobs, job.id, tenant)
    await studies.session.refresh(study)
    return study


def study_status(study: Study, runs: list[Job]) -> tuple[str, dict[str, int]]:
    counts = Counter(job.status for job in runs)
    if runs and all(JobStatus(job.status).terminal for job in runs):
        status = "cancelled" if study.cancel_requested else "completed"
    elif counts.get(JobStatus.QUEUED.value, 0) == len(runs):
        status = "queued"
    else:
        status = "running"
    return status, {s.value: counts.get(s.value, 0) for s in JobStatus}


def _test_outcomes(job: Job, which: str, outcomes: dict[tuple[str, str], list[float]]) -> list[float] | None:
    entry = getattr(job, which)
    if not entry or entry.get("test_score") is None:
        return None
    return outcomes.get((job.id, instruction_hash(entry["prompt"])))


def _comparison(against: str, pairs: list[tuple[list[float], list[float]]]) -> Comparison | None:
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None and len(a) == len(b) and a]
    if not pairs:
        return None
    result = pooled_paired_comparison(pairs, seed=STATISTICS_SEED)
    return Comparison(
        against=against,
        n=result.n,
        difference=round(result.difference, 4),
        interval=Interval(low=round(result.low, 4), high=round(result.high, 4), method="paired bootstrap"),
        p_value=round(result.p_value, 6),
        test=result.test,
        significant=result.significant,
        wins=result.wins,
        losses=result.losses,
        ties=result.ties,
    )


def leaderboard(study: Study, runs: list[Job], outcomes: dict[tuple[str, str], list[float]]) -> list[ArmResult]:
    arms = study.spec["arms"]
    by_arm: dict[int, list[Job]] = {i: [] for i in range(len(arms))}
    for job in runs:
        by_arm.setdefault(job.study_arm, []).append(job)
    baseline_arms = [i for i, arm in enumerate(arms) if arm.get("baseline")]

    def best_by_seed(arm_index: int) -> dict[int, list[float] | None]:
        return {job.spec["seed"]: _test_outcomes(job, "best", outcomes) for job in by_arm[arm_index]}

    results = []
    for index, arm in enumerate(arms):
        jobs = by_arm[index]
        finished = [j for j in jobs if j.best and j.best.get("test_score") is not None]
        scores = [j.best["test_score"] for j in finished]
        interval = bootstrap_mean_interval(scores, seed=STATISTICS_SEED) if scores else None
        mine = best_by_seed(index)
        comparisons = []
        if not arm.get("baseline"):
            initial = _comparison(
                "initial", [(mine[j.spec["seed"]], _test_outcomes(j, "initial", outcomes)) for j in jobs]
            )
            comparisons += [initial] if initial else []
        for other in baseline_arms:
            if other == index:
                continue
            theirs = best_by_seed(other)
            compared = _comparison(arms[other]["name"], [(mine.get(s), theirs.get(s)) for s in mine])
            comparisons += [compared] if compared else []

        def mean(values: list[float]) -> float | None:
            return round(sum(values) / len(values), 2) if values else None

        results.append(
            ArmResult(
                arm=arm["name"],
                method=arm["method"],
                baseline=bool(arm.get("baseline")),
                runs=len(jobs),
                finished=len(finished),
                test_mean=None if interval is None else round(interval.mean, 4),
                test_sd=None if interval is None else round(interval.sd, 4),
                test_interval=None
                if interval is None
                else Interval(low=round(interval.low, 4), high=round(interval.high, 4), method=interval.method),
                mean_llm_calls=mean([j.llm_calls for j in finished]),
                mean_tokens=mean([j.prompt_tokens + j.completion_tokens for j in finished]),
                mean_seconds=mean([j.elapsed_seconds for j in finished]),
                comparisons=comparisons,
            )
        )
    return sorted(results, key=lambda r: (r.test_mean is None, -(r.test_mean or 0.0)))


def study_read(
    study: Study,
    runs: list[Job],
    outcomes: dict[tuple[str, str], list[float]] | None = None,
    *,
    detailed: bool = False,
) -> StudyRead:
    """`detailed`: with the leaderboard, the runs and the spec (`outcomes` needed)."""
    status, counts = study_status(study, runs)
    read = StudyRead(id=study.id, name=study.name, status=status, created_at=study.created_at, jobs=counts)
    if detailed:
        names = [arm["name"] for arm in study.spec["arms"]]
        read.leaderboard = leaderboard(study, runs, outcomes or {})
        read.runs = [
            RunRead(
                job_id=job.id,
                arm=names[job.study_arm],
                seed=job.spec["seed"],
                status=job.status,
                test_score=(job.best or {}).get("test_score"),
                initial_test_score=(job.initial or {}).get("test_score"),
            )
            for job in runs
        ]
        read.spec = study.spec
    return read
