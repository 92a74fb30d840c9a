"""Datasets: uploaded ones live in the database, `builtin:<name>` ones ship with the package."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from pydantic import TypeAdapter, ValidationError

from app.datasets.builtin import BUILTIN_TASKS, BuiltinTask
from app.datasets.models import Dataset
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetName, DatasetRead, ExampleIn, TaskDefaults
from app.errors import InvalidPayload, NotFound
from app.idempotency.service import streamed_request_hash
from app.input_guard import disallowed_at
from app.input_limits import check_chars, check_count
from app.settings import InputLimits

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


def dataset_read(row: Dataset, examples: list[dict[str, str]]) -> DatasetRead:
    return DatasetRead(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        source="uploaded",
        n_examples=row.n_examples,
        created_at=row.created_at,
        examples=[ExampleIn(**ex) for ex in examples],
    )


# Examples are validated, and inserted, this many at a time (or fewer, once their text reaches CHUNK_CHARS): only a
# chunk of an upload is ever held as Python objects.
CHUNK_ROWS = 2_000
CHUNK_CHARS = 4_000_000

Chunks = Iterator[list[tuple[str, str]]]  # (input, target) pairs, a chunk at a time

_NAME = TypeAdapter(DatasetName)


def jsonl_chunks(file: BinaryIO, name: str, limits: InputLimits) -> Chunks:
    """The examples of a JSONL upload (one {"input", "target"} object per line), read from `file` a line at a time
    and yielded a chunk at a time. Checked as a JSON body is, with the file's line numbers: a bad line is a 422
    naming it as soon as it is read. An invalid `name`, an empty file, more than `max_examples_per_dataset`
    examples or one over `max_example_chars` is a 422 only at the end of the file (nothing more is yielded once
    one is seen), so that a bad line anywhere still wins and the count is the file's, as when the file was read
    whole; the caller's transaction then stores nothing."""
    try:
        _NAME.validate_python(name)
        refused: InvalidPayload | None = None
    except ValidationError as exc:
        refused = InvalidPayload(["file", "name"], exc.errors()[0]["msg"])
    too_long: InvalidPayload | None = None
    most = limits.max_examples_per_dataset
    count = number = size = 0
    chunk: list[tuple[str, str]] = []
    for raw in file:  # split at b"\n", which is never inside a multi-byte UTF-8 sequence
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidPayload(["file"], "file must be UTF-8 JSON Lines") from exc
        for line in text.splitlines():  # any other line break too, as a whole file's splitlines() numbers them
            number += 1
            if not line.strip():
                continue
            example = _jsonl_example(number, line)
            count += 1
            if too_long is None:
                too_long = _too_long(count - 1, example, limits)
            if refused is not None or too_long is not None or count > most:
                continue
            chunk.append((example.input, example.target))
            size += len(example.input) + len(example.target)
            if len(chunk) >= CHUNK_ROWS or size >= CHUNK_CHARS:
                yield chunk
                chunk, size = [], 0
    if refused is None and count == 0:
        refused = InvalidPayload(["file", "examples"], "List should have at least 1 item after validation, not 0")
    if refused is None:
        check_count(["file"], range(count), most, "max_examples_per_dataset")
        refused = too_long
    if refused is not None:
        raise refused
    if chunk:
        yield chunk


def _jsonl_example(number: int, line: str) -> ExampleIn:
    try:
        record = json.loads(line)
        problem = disallowed_at(record)
        if problem is not None:
            raise InvalidPayload(["file", f"line {number}", *problem[0]], problem[1])
        return ExampleIn.model_validate(record)
    except RecursionError as exc:
        raise InvalidPayload(["file", f"line {number}"], "nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise InvalidPayload(["file", f"line {number}"], f"not valid JSON: {exc.msg}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ["file", f"line {number}", *[str(p) for p in err["loc"]]]
        raise InvalidPayload(loc, err["msg"] + '; each line must be {"input": str, "target": str}') from exc


def _too_long(index: int, example: ExampleIn, limits: InputLimits) -> InvalidPayload | None:
    """Example `index` over `max_example_chars`, named as `check_examples` names it in a JSON body."""
    try:
        for field in ("input", "target"):
            check_chars(["file", index, field], getattr(example, field), limits.max_example_chars, "max_example_chars")
    except InvalidPayload as problem:
        return problem
    return None


def payload_chunks(examples: Sequence[ExampleIn]) -> Chunks:
    """A JSON body's (already validated) examples, a chunk at a time."""
    for start in range(0, len(examples), CHUNK_ROWS):
        yield [(ex.input, ex.target) for ex in examples[start : start + CHUNK_ROWS]]


def examples_hash(name: str, chunks: Chunks) -> str:
    """The Idempotency-Key hash of a dataset (as of a JSON body `{"name", "examples"}`), a chunk at a time: a JSON
    body and the same examples uploaded as JSONL hash alike."""
    examples = ({"input": text, "target": target} for chunk in chunks for text, target in chunk)
    return streamed_request_hash({"name": name}, "examples", examples)


async def create_dataset(repo: DatasetRepository, name: str, chunks: Chunks, tenant: str) -> Dataset:
    """Stores the dataset a chunk at a time (one executemany each) in the caller's transaction; nothing before
    the first chunk is ready. The chunks are produced (read, parsed, validated) in a thread, so a large upload
    does not stall the event loop. An error raised by `chunks` propagates, and the transaction stores nothing."""
    chunk = await asyncio.to_thread(next, chunks, None)
    row = Dataset(id=str(uuid.uuid4()), tenant=tenant, name=name, n_examples=0)
    await repo.add(row)
    count = 0
    while chunk is not None:
        await repo.add_examples(row.id, count, chunk)
        count += len(chunk)
        chunk = await asyncio.to_thread(next, chunks, None)
    row.n_examples = count
    await repo.session.flush()
    return row


async def resolve_examples(repo: DatasetRepository, ref: str, tenant: str) -> list[dict[str, str]]:
    builtin = builtin_task(ref)
    if builtin is not None:
        return builtin.examples()
    if ref.startswith(BUILTIN_PREFIX):
        raise NotFound(f"no builtin dataset {ref!r}", {"allowed": [BUILTIN_PREFIX + n for n in BUILTIN_TASKS]})
    row = await repo.get(ref, tenant)
    if row is None:
        raise NotFound(f"dataset {ref!r} not found")
    return await repo.examples(row.id)


async def resolve_task_examples(
    repo: DatasetRepository, task: dict, tenant: str
) -> tuple[list[dict[str, str]], list[dict[str, str]] | None]:
    """A task spec's examples, and its `test_dataset`'s when it names one."""
    examples = await resolve_examples(repo, task["dataset"], tenant)
    test_ref = task.get("test_dataset")
    return examples, None if test_ref is None else await resolve_examples(repo, test_ref, tenant)
