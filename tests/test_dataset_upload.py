"""JSONL uploads are read a line at a time and stored a chunk at a time, in one transaction: every row in order,
a bad line anywhere a 422 naming it with nothing stored, the configured limits as for a JSON body."""

from __future__ import annotations

import json
import platform
import uuid

import httpx
import pytest
import sqlalchemy as sa

from app.datasets import service
from app.datasets.models import DatasetExample
from app.datasets.repository import DatasetRepository
from app.idempotency.service import request_hash, streamed_request_hash
from app.main import create_app
from app.memory import release_freed_memory
from app.settings import ApiSettings, InputLimits


def error(response) -> dict:
    assert set(response.json()) == {"error"}, response.text
    return response.json()["error"]


def jsonl(examples: list[dict], newline: str = "\n") -> bytes:
    return newline.join(json.dumps(e) for e in examples).encode()


def examples(n: int, tag: str = "") -> list[dict]:
    return [{"input": f"{tag}question {i}", "target": ("yes", "no")[i % 2]} for i in range(n)]


async def upload(client: httpx.AsyncClient, name: str, data: bytes, **kwargs) -> httpx.Response:
    files = {"file": ("d.jsonl", data, "application/x-ndjson")}
    return await client.post("/v1/datasets", files=files, data={"name": name}, **kwargs)


async def stored_rows(db) -> int:
    async with db.transaction() as session:
        return (await session.execute(sa.select(sa.func.count()).select_from(DatasetExample))).scalar_one()


async def names(client: httpx.AsyncClient) -> set[str]:
    return {d["name"] for d in (await client.get("/v1/datasets", params={"limit": 200})).json()["items"]}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 examples: a handful of lines spans several."""
    monkeypatch.setattr(service, "CHUNK_ROWS", 3)


async def test_an_upload_of_many_chunks_stores_every_example_in_order(app_client, db):
    many = examples(service.CHUNK_ROWS * 2 + 345, tag=uuid.uuid4().hex[:6])  # three chunks at the real size
    # CRLF line ends and blank lines (skipped) as a text editor might leave them
    data = jsonl(many[:10], "\r\n") + b"\r\n\r\n" + jsonl(many[10:]) + b"\n\n"
    answer = await upload(app_client, "many", data)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["n_examples"] == len(many) and created["examples"] == []
    read = (await app_client.get(f"/v1/datasets/{created['id']}", params={"examples_limit": 10_000})).json()
    assert read["n_examples"] == len(many) and read["examples"] == many
    async with db.transaction() as session:
        assert await service.resolve_examples(DatasetRepository(session), created["id"], "default") == many


async def test_a_bad_line_in_a_later_chunk_names_its_line_and_stores_nothing(app_client, db):
    good = examples(service.CHUNK_ROWS + 500)
    lines = [json.dumps(e) for e in good]
    lines.insert(9, "")  # a blank line counts in the numbering
    lines[service.CHUNK_ROWS + 300] = json.dumps({"input": "no target"})  # line CHUNK_ROWS + 301
    before = await stored_rows(db)
    answer = await upload(app_client, f"bad-{uuid.uuid4().hex[:6]}", "\n".join(lines).encode())
    assert answer.status_code == 422, answer.text
    detail = error(answer)["details"][0]
    assert detail["loc"] == ["body", "file", f"line {service.CHUNK_ROWS + 301}", "target"]
    assert '{"input": str, "target": str}' in detail["msg"]
    assert await stored_rows(db) == before  # the chunks already inserted were rolled back
    assert not any(n.startswith("bad-") for n in await names(app_client))


@pytest.mark.parametrize(
    ("line", "loc", "says"),
    [
        ("{not json", ["body", "file", "line 8"], "not valid JSON"),
        (json.dumps({"input": "nul\x00", "target": "t"}), ["body", "file", "line 8", "input"], "U+0000"),
        (json.dumps({"input": "x", "target": "t", "extra": 1}), ["body", "file", "line 8", "extra"], "Extra"),
        (json.dumps({"input": "", "target": "t"}), ["body", "file", "line 8", "input"], "at least 1"),
    ],
)
async def test_each_kind_of_bad_line_after_stored_chunks(app_client, db, small_chunks, line, loc, says):
    lines = [json.dumps(e) for e in examples(7)] + [line] + [json.dumps(e) for e in examples(2)]
    before = await stored_rows(db)
    answer = await upload(app_client, "kinds", "\n".join(lines).encode())
    assert answer.status_code == 422, answer.text
    detail = error(answer)["details"][0]
    assert detail["loc"] == loc and says in detail["msg"]
    assert await stored_rows(db) == before


async def test_a_file_that_is_not_utf8_or_empty(app_client, small_chunks):
    latin1 = jsonl(examples(7)) + b'\n{"input": "caf\xe9", "target": "t"}\n'
    answer = await upload(app_client, "latin1", latin1)
    assert answer.status_code == 422 and error(answer)["details"][0]["loc"] == ["body", "file"]
    answer = await upload(app_client, "empty", b"\n  \n")
    assert answer.status_code == 422 and error(answer)["details"][0]["loc"] == ["body", "file", "examples"]
    answer = await upload(app_client, "n" * 201, jsonl(examples(7)))
    assert answer.status_code == 422 and error(answer)["details"][0]["loc"] == ["body", "file", "name"]


@pytest.fixture
async def tight_client(settings):
    """At most 8 examples of at most 100 characters, and uploads of at most 4 KiB."""
    limits = InputLimits(max_examples_per_dataset=8, max_example_chars=100)
    api = ApiSettings(limits=limits, max_upload_bytes=4096)
    app = create_app(settings.model_copy(update={"api": api}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client


async def test_the_limits_hold_across_chunks(tight_client, db, small_chunks):
    name = f"limits-{uuid.uuid4().hex[:6]}"
    before = await stored_rows(db)

    too_many = await upload(tight_client, name, jsonl(examples(11)))  # three chunks stored before the ninth
    detail = error(too_many)["details"][0]
    assert too_many.status_code == 422 and detail["loc"] == ["body", "file"]
    assert "11 items; at most 8 (api.limits.max_examples_per_dataset)" in detail["msg"]  # the file's count

    long = examples(8)
    long[6]["target"] = "x" * 101
    too_long = await upload(tight_client, name, jsonl(long))
    detail = error(too_long)["details"][0]
    assert detail["loc"] == ["body", "file", "6", "target"] and "api.limits.max_example_chars" in detail["msg"]

    both = await upload(tight_client, name, jsonl([*long, *examples(3)]))  # the count first, as for a JSON body
    assert error(both)["details"][0]["loc"] == ["body", "file"]
    bad_line_last = await upload(tight_client, name, jsonl(long) + b"\n{oops")  # a bad line before either
    assert error(bad_line_last)["details"][0]["loc"] == ["body", "file", "line 9"]

    assert await stored_rows(db) == before and name not in await names(tight_client)
    assert (await upload(tight_client, name, jsonl(examples(8)))).status_code == 201


async def test_an_upload_streamed_past_the_size_limit_is_413(tight_client, db):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/x-ndjson\r\n\r\n"
    ).encode()
    line = jsonl(examples(1)) + b"\n"

    async def streamed(lines: int):  # no content-length: counted as it streams in
        yield head
        for _ in range(lines):
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    before = await stored_rows(db)
    answer = await tight_client.post("/v1/datasets", content=streamed(200), headers=headers)
    assert answer.status_code == 413, answer.text
    assert error(answer)["code"] == "payload_too_large" and "4096" in error(answer)["message"]
    assert error(answer)["details"] == [
        {"loc": ["body"], "msg": "larger than the limit of 4096 bytes", "type": "value_error"}
    ]
    assert await stored_rows(db) == before
    declared = await upload(tight_client, "big", line * 200)  # a declared length over it: refused unread
    assert declared.status_code == 413 and error(declared)["code"] == "payload_too_large"
    fits = await tight_client.post("/v1/datasets", content=streamed(8), headers=headers)
    assert fits.status_code == 201 and fits.json()["n_examples"] == 8


async def test_an_idempotent_upload_hashes_as_the_json_body_does(app_client, small_chunks):
    name, some = f"idem-{uuid.uuid4().hex[:6]}", examples(10)
    key = {"Idempotency-Key": f"upload-{name}"}
    first = await upload(app_client, name, jsonl(some), headers=key)
    again = await upload(app_client, name, jsonl(some, "\r\n") + b"\n", headers=key)  # same examples
    as_json = await app_client.post("/v1/datasets", json={"name": name, "examples": some}, headers=key)
    assert first.status_code == again.status_code == as_json.status_code == 201
    assert again.json()["id"] == as_json.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == as_json.headers.get("idempotent-replayed") == "true"
    other = await upload(app_client, name, jsonl(some[:-1]), headers=key)
    assert other.status_code == 409
    assert sorted(await names(app_client)).count(name) == 1


def test_the_streamed_hash_is_the_whole_body_hash():
    for many in (0, 1, 2_500):
        body = {"name": 'ünï "q"', "examples": examples(many, tag="\u2028\\")}
        streamed = streamed_request_hash({"name": body["name"]}, "examples", iter(body["examples"]), batch=7)
        assert streamed == request_hash(body)
    assert streamed_request_hash({"a": [1, {"z": 1, "b": 2}], "z": None}, "m", []) == request_hash(
        {"a": [1, {"z": 1, "b": 2}], "z": None, "m": []}
    )


def test_freed_memory_goes_back_where_glibc_can():
    assert release_freed_memory() is (platform.libc_ver()[0] == "glibc")
