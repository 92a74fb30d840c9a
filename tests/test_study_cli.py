"""`promptopt study create|watch|show|cancel` against a real API server, and its failures as one clear line."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.conftest import free_port, served
from tests.test_studies import study_body


async def cli(url: str, *args: str) -> tuple[int, str]:
    """The CLI in a subprocess (stdout not a terminal); returns its exit code and its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptopt", *args,
        env={**os.environ, "PROMPTOPT_URL": url, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_study_commands_create_watch_and_show(settings, worker, tmp_path):
    spec = tmp_path / "study.json"
    spec.write_text(json.dumps(study_body(seeds=[0])))
    async with served(settings) as url:
        code, out = await cli(url, "study", "create", str(spec))
        assert code == 0, out
        study_id = out.strip().splitlines()[-1]

        code, out = await cli(url, "study", "watch", study_id, "--interval", "0.3")
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].startswith(f"study {study_id}: ")  # plain progress lines off a terminal
        assert any(": completed (3 succeeded)" in line for line in lines)
        assert "opro-2" in out and "baseline 1" in out and "vs initial" in out

        code, out = await cli(url, "study", "show", study_id, "--json")
        assert code == 0
        shown = json.loads(out)
        assert shown["status"] == "completed" and len(shown["leaderboard"]) == 3


async def test_study_command_failures_are_one_line(settings, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"arms": [}')
    async with served(settings) as url:
        code, out = await cli(url, "study", "show", "no-such-study")
        assert code == 1 and out.strip() == "error: 404 study 'no-such-study' not found"
        code, out = await cli(url, "study", "create", str(bad))
        assert code == 1 and "not valid JSON" in out and "line 1, column 11" in out
        invalid = tmp_path / "invalid.json"
        invalid.write_text(json.dumps(study_body(arms=[])))
        code, out = await cli(url, "study", "create", str(invalid))
        assert code == 1 and out.startswith("error: 422") and "arms" in out
    code, out = await cli(f"http://127.0.0.1:{free_port()}", "study", "show", "x")
    assert code == 1 and "PROMPTOPT_URL" in out and "Traceback" not in out
