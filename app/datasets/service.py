"""Datasets: uploaded ones live in the database, `builtin:<name>` ones ship with the package."""

from __future__ import annotations

import json
import uuid

from pydantic import ValidationError

from app.datasets.builtin import BUILTIN_TASKS, BuiltinTask
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetCreate, DatasetRead, ExampleIn, TaskDefaults
from app.errors import InvalidPayload, NotFound
from app.input_guard import disallowed_at

BUILTIN_PREFIX = "builtin:"


def builtin_task(ref: str) -> BuiltinTask | None:
    if not ref.startswith(BUILTIN_PREFIX):
        return None
    return BUILTIN_TASKS.get(ref[len(BUILTIN_PREFIX) :])


def builtin_read(task: BuiltinTask, examples_limit: int) -> DatasetRead:
    examples = task.examples()
    return DatasetRead(
        id=BUILTIN_PREFIX + task.name,
        name=task.name,
        source="builtin",
        n_examples=len(examples),
        description=task.description,
        license=task.license,
        defaults=TaskDefaults(
            template=task.template,
            metric=task.metric,
            labels=task.labels,
            verbalizer=task.verbalizer,
            initial_prompt=task.initial_prompt,
            max_new_tokens=task.max_new_tokens,
        ),
        examples=[ExampleIn(**ex) for ex in examples[:examples_limit]],
    )


def dataset_read(row: Dataset, examples_limit: int) -> DatasetRead:
    return DatasetRead(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        source="uploaded",
        n_examples=row.n_examples,
        created_at=row.created_at,
        examples=[ExampleIn(**ex) for ex in row.examples[:examples_limit]],
    )


def parse_jsonl(name: str, raw: bytes) -> DatasetCreate:
    """A JSONL upload: one {"input", "target"} object per line; errors name the line."""
    examples = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(["file"], "file must be UTF-8 JSON Lines") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = disallowed_at(record)
            if problem is not None:
                raise InvalidPayload(["file", f"line {number}", *problem[0]], problem[1])
            examples.append(ExampleIn.model_validate(record))
        except RecursionError as exc:
            raise InvalidPayload(["file", f"line {number}"], "nested too deeply") from exc
        except json.JSONDecodeError as exc:
            raise InvalidPayload(["file", f"line {number}"], f"not valid JSON: {exc.msg}") from exc
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ["file", f"line {number}", *[str(p) for p in err["loc"]]]
            raise InvalidPayload(loc, err["msg"] + '; each line must be {"input": str, "target": str}') from exc
    try:
        return DatasetCreate(name=name, examples=examples)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidPayload(["file", *[str(p) for p in err["loc"]]], err["msg"]) from exc


async def create_dataset(repo: DatasetRepository, payload: DatasetCreate, tenant: str) -> Dataset:
    examples = [ex.model_dump() for ex in payload.examples]
    row = Dataset(id=str(uuid.uuid4()), tenant=tenant, name=payload.name, examples=examples, n_examples=len(examples))
    return await repo.add(row)


async def resolve_examples(repo: DatasetRepository, ref: str, tenant: str) -> list[dict[str, str]]:
    builtin = builtin_task(ref)
    if builtin is not None:
        return builtin.examples()
    if ref.startswith(BUILTIN_PREFIX):
        raise NotFound(f"no builtin dataset {ref!r}", {"allowed": [BUILTIN_PREFIX + n for n in BUILTIN_TASKS]})
    row = await repo.get(ref, tenant)
    if row is None:
        raise NotFound(f"dataset {ref!r} not found")
    return row.examples


async def resolve_task_examples(
    repo: DatasetRepository, task: dict, tenant: str
) -> tuple[list[dict[str, str]], list[dict[str, str]] | None]:
    """A task spec's examples, and its `test_dataset`'s when it names one."""
    examples = await resolve_examples(repo, task["dataset"], tenant)
    test_ref = task.get("test_dataset")
    return examples, None if test_ref is None else await resolve_examples(repo, test_ref, tenant)
