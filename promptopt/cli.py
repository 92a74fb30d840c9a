"""`promptopt` command line: serve, worker, migrate, demo, submit, watch, cancel."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.settings import Settings

cli = typer.Typer(help="promptopt: self-hosted prompt optimization.", no_args_is_help=True, add_completion=False)
console = Console()

TERMINAL = {"succeeded", "failed", "cancelled"}

DEMO_WEAK_PROMPT = "Say whether the review is positive or negative."
# With this frame the 135M model's topic accuracy depends strongly on the instruction (measured on the
# dbpedia16 dev split: 0.57 for the weak prompt above, 0.32-0.77 for other one-liners), so there is
# room for the search to show a gain; the builtin's own "Category:" frame is less prompt-sensitive.
DEMO_TEMPLATE = "{prompt}\nText: {input}\nTopic:"


@cli.command()
def serve(
    embedded: bool = typer.Option(False, help="API + worker + SQLite + in-process queue in one process."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
) -> None:
    """Run the HTTP API (with --embedded: everything in one process)."""
    import uvicorn

    from app.main import create_app
    from workers.embedded import create_embedded_app, embedded_settings

    settings = Settings()
    logging.basicConfig(level=settings.log_level)
    app = create_embedded_app(embedded_settings(settings)) if embedded else create_app(settings)
    uvicorn.run(app, host=host, port=port)


@cli.command()
def worker() -> None:
    """Run one queue worker (SAQ on Redis)."""
    from workers.__main__ import main

    asyncio.run(main())


@cli.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from app.migrate import upgrade

    settings = Settings()
    upgrade(settings.database_url)
    console.print(f"migrated {settings.database_url.split('@')[-1]}")


def show_result(job: dict, wall_seconds: float) -> None:
    table = Table(title=f"job {job['id']} - {job['status']} ({job['stop_reason']})", show_lines=True)
    table.add_column("")
    table.add_column("prompt", max_width=70)
    table.add_column("dev", justify="right")
    table.add_column("test", justify="right")

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    for label in ("initial", "best"):
        entry = job.get(label) or {}
        table.add_row(label, str(entry.get("prompt")), fmt(entry.get("dev_score")), fmt(entry.get("test_score")))
    console.print(table)
    usage = job["usage"]
    summary = Table(show_header=False)
    summary.add_row("LLM calls", str(usage["llm_calls"]))
    summary.add_row("cache hits", str(usage["cache_hits"]))
    summary.add_row("tokens (prompt / completion)", f"{usage['prompt_tokens']} / {usage['completion_tokens']}")
    summary.add_row("steps", f"{job['progress']['step']} / {job['progress']['total_steps']}")
    summary.add_row("wall time", f"{wall_seconds:.1f} s")
    console.print(summary)
    if job.get("error"):
        console.print(f"[red]error:[/red] {job['error']}")


async def follow(client: httpx.AsyncClient, job_id: str) -> dict:
    """Poll a job with a progress bar until it ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("optimizing", total=None, info="queued")
        while True:
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            best = job.get("best") or {}
            info = f"{job['status']}  calls {job['usage']['llm_calls']}  hits {job['usage']['cache_hits']}"
            if best.get("dev_score") is not None:
                info += f"  best dev {best['dev_score']:.3f}"
            progress.update(bar, total=job["progress"]["total_steps"], completed=job["progress"]["step"], info=info)
            if job["status"] in TERMINAL:
                return job
            await asyncio.sleep(0.5)


def demo_job_body(
    *,
    dataset: str,
    template: str,
    initial_prompt: str,
    steps: int,
    candidates: int,
    subset: int | None,
    max_llm_calls: int,
) -> dict:
    """The demo job, shared with `bench/bench_engine.py demo` so the benchmark measures exactly this."""
    params: dict = {"preset": "small", "steps": steps, "candidates_per_step": candidates}
    if subset:
        params["train_subset"] = subset
    return {
        "method": "opro",
        "task": {"dataset": dataset, "template": template},
        "initial_prompt": initial_prompt,
        "params": params,
        "budget": {"max_llm_calls": max_llm_calls},
        "seed": 0,
    }


@cli.command()
def demo(
    steps: int = typer.Option(3, help="OPRO steps."),
    candidates: int = typer.Option(4, help="Candidates per step."),
    subset: int = typer.Option(28, help="Score candidates on this many training examples (0: all)."),
    max_llm_calls: int = typer.Option(3000, help="Hard budget."),
    dataset: str = typer.Option("builtin:dbpedia16"),
    template: str = typer.Option(DEMO_TEMPLATE),
    initial_prompt: str = typer.Option(DEMO_WEAK_PROMPT, help="Deliberately weak starting instruction."),
) -> None:
    """Run OPRO on a bundled task with the local CPU model, embedded (no Postgres/Redis needed)."""
    from workers.embedded import embedded_settings

    settings = Settings()
    data_dir = settings.data_dir / "demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    database = data_dir / "demo.db"
    for suffix in ("", "-wal", "-shm"):  # a fresh database: every LLM call is made for real
        Path(str(database) + suffix).unlink(missing_ok=True)
    settings = embedded_settings(settings, database)
    logging.basicConfig(level=logging.WARNING)
    body = demo_job_body(
        dataset=dataset,
        template=template,
        initial_prompt=initial_prompt,
        steps=steps,
        candidates=candidates,
        subset=subset,
        max_llm_calls=max_llm_calls,
    )
    asyncio.run(_run_demo(settings, body))


async def _run_demo(settings: Settings, body: dict) -> None:
    from workers.embedded import create_embedded_app

    app = create_embedded_app(settings)
    console.print(f"[bold]promptopt demo[/bold]: OPRO on {body['task']['dataset']} with the local model")
    console.print(f"starting from: [italic]{body['initial_prompt']}[/italic]")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo", timeout=60) as client:
            started = time.monotonic()
            response = await client.post("/v1/jobs", json=body)
            if response.status_code != 202:
                console.print(response.json())
                raise typer.Exit(1)
            job = await follow(client, response.json()["id"])
            show_result(job, time.monotonic() - started)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def _client(url: str, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=30)


@cli.command()
def submit(
    file: Path,
    wait: bool = typer.Option(False, help="Follow the job until it ends."),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="PROMPTOPT_URL"),
    api_key: str | None = typer.Option(None, envvar="PROMPTOPT_API_KEY"),
) -> None:
    """Submit a job from a JSON file."""

    body = json.loads(file.read_text())

    async def go() -> None:
        async with _client(url, api_key) as client:
            started = time.monotonic()
            response = await client.post("/v1/jobs", json=body)
            if response.status_code != 202:
                console.print_json(response.text)
                raise typer.Exit(1)
            job = response.json()
            console.print(f"submitted {job['id']}")
            if wait:
                show_result(await follow(client, job["id"]), time.monotonic() - started)

    asyncio.run(go())


@cli.command()
def watch(
    job_id: str,
    url: str = typer.Option("http://127.0.0.1:8000", envvar="PROMPTOPT_URL"),
    api_key: str | None = typer.Option(None, envvar="PROMPTOPT_API_KEY"),
) -> None:
    """Follow a job with a progress bar."""

    async def go() -> None:
        async with _client(url, api_key) as client:
            started = time.monotonic()
            show_result(await follow(client, job_id), time.monotonic() - started)

    asyncio.run(go())


@cli.command()
def cancel(
    job_id: str,
    url: str = typer.Option("http://127.0.0.1:8000", envvar="PROMPTOPT_URL"),
    api_key: str | None = typer.Option(None, envvar="PROMPTOPT_API_KEY"),
) -> None:
    """Cancel a job (idempotent)."""

    async def go() -> None:
        async with _client(url, api_key) as client:
            response = await client.post(f"/v1/jobs/{job_id}/cancel")
            console.print_json(response.text)

    asyncio.run(go())


study_cli = typer.Typer(help="Studies: methods x seeds on one task, with a leaderboard.", no_args_is_help=True)
cli.add_typer(study_cli, name="study")
URL_OPTION = typer.Option("http://127.0.0.1:8000", envvar="PROMPTOPT_URL", help="The API (env PROMPTOPT_URL).")
KEY_OPTION = typer.Option(None, envvar="PROMPTOPT_API_KEY", help="API key (env PROMPTOPT_API_KEY).")
STUDY_DONE = {"completed", "cancelled"}


def fail(message: str) -> typer.Exit:
    console.print(f"error: {message}", style="red", highlight=False)
    return typer.Exit(1)


async def api_call(client: httpx.AsyncClient, method: str, path: str, **kwargs) -> dict:
    """One API request; an expected failure becomes one line and exit code 1, never a traceback."""
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the API at {client.base_url} ({type(exc).__name__}); set PROMPTOPT_URL") from None
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise fail(f"{response.status_code} {message}")
    return response.json()


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def leaderboard_table(study: dict) -> Table:
    table = Table(title=f"study {study['id']} ({study.get('name') or '-'}) - {study['status']}")
    for column in ("arm", "method", "runs", "test mean ± sd", "95% interval", "vs initial", "vs baselines", "calls"):
        table.add_column(column, justify="left" if column in ("arm", "method") else "right")

    def versus(comparison: dict) -> str:
        mark = "*" if comparison["significant"] else ""
        return f"{comparison['difference']:+.3f} p={comparison['p_value']:.3g}{mark}"

    for row in study.get("leaderboard") or []:
        interval = row["test_interval"]
        comparisons = {c["against"]: c for c in row["comparisons"]}
        initial = comparisons.pop("initial", None)
        table.add_row(
            row["arm"],
            row["method"],
            f"{row['finished']}/{row['runs']}",
            f"{_fmt(row['test_mean'])} ± {_fmt(row['test_sd'])}",
            "-" if interval is None else f"[{interval['low']:.3f}, {interval['high']:.3f}]",
            "-" if initial is None else versus(initial),
            " ".join(f"{name}: {versus(c)}" for name, c in comparisons.items()) or "-",
            _fmt(row["mean_llm_calls"], 0),
        )
    table.caption = (
        "* p < 0.05 (paired test on the same test examples, pooled over seeds; the test is named in --json). "
        "An interval that contains the baseline's mean, or p ≥ 0.05, means the difference may be noise."
    )
    return table


def study_progress_line(study: dict) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in study["jobs"].items() if n)
    return f"study {study['id']}: {study['status']} ({counts})"


@study_cli.command("create")
def study_create(
    file: Path = typer.Argument(..., help="The study as JSON: task, arms, seeds, baselines, budget."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Create a study from a JSON file; prints its id."""
    try:
        body = json.loads(file.read_text())
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise fail(f"{file} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None

    async def go() -> None:
        async with _client(url, api_key) as client:
            study = await api_call(client, "POST", "/v1/studies", json=body)
        for warning in study.get("warnings", []):
            console.print(f"warning: {warning}", style="yellow", highlight=False)
        console.print(f"created study {study['id']} with {sum(study['jobs'].values())} runs", highlight=False)
        print(study["id"])

    asyncio.run(go())


@study_cli.command("show")
def study_show(
    study_id: str,
    as_json: bool = typer.Option(False, "--json", help="The whole study as JSON."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """The study's leaderboard."""

    async def go() -> None:
        async with _client(url, api_key) as client:
            study = await api_call(client, "GET", f"/v1/studies/{study_id}")
        if as_json:
            print(json.dumps(study, indent=2))
        else:
            console.print(study_progress_line(study), highlight=False)
            console.print(leaderboard_table(study))

    asyncio.run(go())


@study_cli.command("watch")
def study_watch(
    study_id: str,
    interval: float = typer.Option(2.0, min=0.2, help="Seconds between polls."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Follow a study until every run has ended: a live table on a terminal, progress lines otherwise."""
    from rich.live import Live

    async def poll(client) -> dict:
        return await api_call(client, "GET", f"/v1/studies/{study_id}")

    async def go() -> None:
        async with _client(url, api_key) as client:
            study = await poll(client)
            if console.is_terminal:
                with Live(leaderboard_table(study), console=console, refresh_per_second=2) as live:
                    while study["status"] not in STUDY_DONE:
                        await asyncio.sleep(interval)
                        study = await poll(client)
                        live.update(leaderboard_table(study))
            else:
                last = None
                while True:
                    line = study_progress_line(study)
                    if line != last:
                        print(line, flush=True)
                        last = line
                    if study["status"] in STUDY_DONE:
                        break
                    await asyncio.sleep(interval)
                    study = await poll(client)
                console.print(leaderboard_table(study))

    asyncio.run(go())


@study_cli.command("cancel")
def study_cancel(study_id: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Cancel every run of a study that has not ended."""

    async def go() -> None:
        async with _client(url, api_key) as client:
            study = await api_call(client, "POST", f"/v1/studies/{study_id}/cancel")
        console.print(study_progress_line(study), highlight=False)

    asyncio.run(go())


keys_cli = typer.Typer(help="API keys stored (hashed) in the database: create, list, revoke.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


async def _with_keys(work):
    from app.db import Database
    from app.keys.repository import ApiKeyRepository

    db = Database(Settings().database_url)
    try:
        async with db.transaction() as session:
            return await work(ApiKeyRepository(session))
    finally:
        await db.dispose()


@keys_cli.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts for."),
    name: str = typer.Option(None, help="A label to tell keys apart."),
    admin: bool = typer.Option(False, "--admin", help="May also list every tenant's jobs and datasets."),
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from app.keys.service import new_key

    if not tenant or len(tenant) > 64:
        raise typer.BadParameter("1 to 64 characters", param_hint="--tenant")
    record, key = new_key(tenant, name=name, role="admin" if admin else "user")
    asyncio.run(_with_keys(lambda keys: keys.add(record)))
    console.print(f"created key {record.id} for tenant {tenant!r} ({record.role}); it is shown only now:", style="bold")
    print(key)


@keys_cli.command("list")
def keys_list(
    tenant: str = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List keys (never the keys themselves: their id, prefix, tenant, role and state)."""
    rows = asyncio.run(_with_keys(lambda keys: keys.list(tenant)))
    items = [
        {
            "id": r.id,
            "prefix": r.prefix,
            "tenant": r.tenant,
            "name": r.name,
            "role": r.role,
            "created_at": r.created_at.isoformat(),
            "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        }
        for r in rows
    ]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("id", "prefix", "tenant", "name", "role", "created", "revoked")
    for item in items:
        table.add_row(
            *(str(item[k] or "-") for k in ("id", "prefix", "tenant", "name", "role", "created_at")),
            str(item["revoked_at"] or "-"),
        )
    console.print(table)


@keys_cli.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id or its prefix (as `keys list` shows).")) -> None:
    """Revoke a key: API processes refuse it within `api.key_cache_seconds`."""
    revoked = asyncio.run(_with_keys(lambda keys: keys.revoke(key_id)))
    if not revoked:
        console.print(f"no active key with id or prefix {key_id!r}", style="red")
        raise typer.Exit(1)
    for record in revoked:
        console.print(f"revoked {record.id} ({record.prefix}, tenant {record.tenant!r})")


def main() -> None:
    cli()
