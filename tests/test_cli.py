"""The CLI as a new user meets it: every expected failure is one line on stderr and a non-zero exit code, output
off a terminal is plain, `best` prints the prompt alone."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.conftest import free_port, label_job, served


async def run_cli(url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptopt", *args,
        env={**os.environ, "PROMPTOPT_URL": url, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def test_expected_failures_are_one_line(settings, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    for args in (["list"], ["show", "x"], ["watch", "x"], ["cancel", "x"], ["datasets", "list"]):
        code, out, err = await run_cli(down, *args)
        assert code == 1 and "PROMPTOPT_URL" in one_line(err) and out == "", (args, err)

    broken = tmp_path / "job.json"
    broken.write_text('{"method": "opro",\n "task": }')
    async with served(settings) as url:
        code, _, err = await run_cli(url, "submit", str(broken))
        assert code == 1 and one_line(err) == f"error: {broken} is not valid JSON: Expecting value at line 2, column 10"
        code, _, err = await run_cli(url, "submit", str(tmp_path / "missing.json"))
        assert code == 1 and "cannot read" in one_line(err)
        for args in (["show", "nope"], ["cancel", "nope"], ["best", "nope"], ["watch", "nope"]):
            code, out, err = await run_cli(url, *args)
            assert code == 1 and one_line(err) == "error: 404 job 'nope' not found", (args, err)
        invalid = tmp_path / "invalid.json"
        invalid.write_text(json.dumps(label_job(params={"steps": -1})))
        code, _, err = await run_cli(url, "submit", str(invalid))
        assert code == 1 and one_line(err).startswith("error: 422 body.params.steps:")


async def test_commands_on_a_job(settings, worker, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(label_job()))
    async with served(settings) as url:
        code, out, err = await run_cli(url, "submit", str(spec))
        assert code == 0, err
        job_id = out.strip()
        code, out, _ = await run_cli(url, "watch", job_id)
        assert code == 0
        lines = out.splitlines()
        assert lines[0].startswith(f"job {job_id}: ")  # plain progress lines off a terminal
        assert any("succeeded, step 2/2" in line for line in lines), lines

        code, out, _ = await run_cli(url, "best", job_id)
        shown = json.loads((await run_cli(url, "show", job_id, "--json"))[1])
        assert code == 0 and out == shown["best"]["prompt"] + "\n"  # the prompt alone: `best ID > prompt.txt`
        code, out, _ = await run_cli(url, "best", job_id, "--json")
        assert json.loads(out)["test_score"] == shown["best"]["test_score"]
        code, out, _ = await run_cli(url, "list", "--json")
        assert job_id in {j["id"] for j in json.loads(out)["items"]}
        code, out, _ = await run_cli(url, "cancel", job_id)
        assert code == 0 and out.strip() == f"job {job_id}: succeeded"

        data = tmp_path / "mine.jsonl"
        data.write_text("\n".join(json.dumps({"input": f"x{n}", "target": "y"}) for n in range(5)))
        code, out, err = await run_cli(url, "datasets", "upload", str(data))
        assert code == 0 and "uploaded 5 examples" in err
        dataset_id = out.strip()
        code, out, _ = await run_cli(url, "datasets", "list", "--json")
        assert dataset_id in {d["id"] for d in json.loads(out)["items"]}


async def test_migrate_creates_a_missing_database():
    import asyncpg

    from tests.conftest import PG_ADMIN

    name = f"promptopt_migrate_{os.getpid()}"
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    env = {**os.environ, "PROMPTOPT_DATABASE_URL": url}
    try:
        for expected in ("created database", "migrated"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "promptopt", "migrate", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert expected in out.decode().splitlines()[0]  # the second run finds it and only migrates
    finally:
        conn = await asyncpg.connect(PG_ADMIN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def test_every_demo_job_is_valid_and_fits_its_budget(settings):
    """`promptopt demo --method M` submits `demo_job_body(method=M)`: each must pass validation, score on the
    largest split, and be expected to finish within its own budget (no stop on the budget before the test)."""
    from promptopt.cli import DEMO_PARAMS, demo_job_body
    from promptopt_client import AsyncClient

    async with served(settings) as url, AsyncClient(url) as client:
        for method in DEMO_PARAMS:
            body = demo_job_body(method=method, backend="local")
            estimate = await client.estimate_job(body)
            assert estimate.split["test"] > max(estimate.split["train"], estimate.split["dev"]), (method, estimate)
            assert estimate.expected_llm_calls <= body["budget"]["max_llm_calls"], (method, estimate)
