"""`promptopt` command line: the service (serve, worker, migrate, demo, keys) and the API through the Python
client (submit, watch, list, show, best, cancel, datasets, study). An expected failure is one line on stderr and
exit code 1, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.settings import Settings
from promptopt_client import AsyncClient, ConnectionFailed, PromptoptError

cli = typer.Typer(help="promptopt: self-hosted prompt optimization.", no_args_is_help=True, add_completion=False)
console = Console()
errors = Console(stderr=True)

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
    """Apply database migrations (alembic upgrade head), creating the database first if it does not exist."""
    from app.migrate import ensure_database, upgrade

    settings = Settings()
    where = settings.database_url.split("@")[-1]
    try:
        created = asyncio.run(ensure_database(settings.database_url))
    except OSError as exc:
        raise fail(f"cannot reach the database at {where} ({exc}); check PROMPTOPT_DATABASE_URL") from None
    if created:
        console.print(f"created database {where}")
    upgrade(settings.database_url)
    console.print(f"migrated {where}")


URL_OPTION = typer.Option("http://127.0.0.1:8000", envvar="PROMPTOPT_URL", help="The API (env PROMPTOPT_URL).")
KEY_OPTION = typer.Option(None, envvar="PROMPTOPT_API_KEY", help="API key (env PROMPTOPT_API_KEY).")
STUDY_DONE = {"completed", "cancelled"}


def fail(message: str) -> typer.Exit:
    errors.print(f"error: {message}", style="red", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@contextlib.asynccontextmanager
async def api(url: str, api_key: str | None, **kwargs):
    """A client whose failures end the command with one line (and exit code 1)."""
    client = AsyncClient(url, api_key, **kwargs)
    try:
        yield client
    except ConnectionFailed as exc:
        raise fail(f"{exc.message}; is the server running? Set PROMPTOPT_URL to its address") from None
    except PromptoptError as exc:
        raise fail(str(exc)) from None
    finally:
        await client.aclose()


def read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise fail(f"{path} is not valid JSON: {message}{where}") from None


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(entry) -> str:
    if entry is None or entry.test_low is None:
        return "-"
    return f"[{entry.test_low:.3f}, {entry.test_high:.3f}] n={entry.test_n}"


def show_result(job, wall_seconds: float | None = None) -> None:
    table = Table(title=f"job {job.id} - {job.status} ({job.stop_reason})", show_lines=True)
    table.add_column("")
    table.add_column("prompt", max_width=70)
    table.add_column("dev", justify="right")
    table.add_column("test", justify="right")
    table.add_column("test 95% interval", justify="right")
    for label in ("initial", "best"):
        entry = getattr(job, label)
        if entry is None:
            table.add_row(label, "-", "-", "-", "-")
        else:
            table.add_row(label, str(entry.prompt), _fmt(entry.dev_score), _fmt(entry.test_score), _interval(entry))
    console.print(table)
    gain = job.best.test_gain if job.best is not None else None
    if gain is not None:
        verdict = (
            "the gain is unlikely to be noise"
            if gain.p_value < 0.05 and gain.difference > 0
            else "not distinguishable from noise at this test size"
        )
        console.print(
            f"held-out gain of the best prompt over the initial: [bold]{gain.difference:+.3f}[/bold] "
            f"(95% interval {gain.low:+.3f} to {gain.high:+.3f}; p = {gain.p_value:.2g}, {gain.test}; "
            f"{gain.wins} examples won, {gain.losses} lost, of {gain.n}): {verdict}"
        )
    usage = job.usage
    summary = Table(show_header=False)
    summary.add_row("LLM calls", str(usage.llm_calls))
    summary.add_row("cache hits", str(usage.cache_hits))
    summary.add_row("tokens (prompt / completion)", f"{usage.prompt_tokens} / {usage.completion_tokens}")
    summary.add_row("steps", f"{job.progress.step} / {job.progress.total_steps}")
    if wall_seconds is not None:
        summary.add_row("wall time", f"{wall_seconds:.1f} s")
    console.print(summary)
    if job.error:
        console.print(f"[red]error:[/red] {job.error}")


def phase_text(progress) -> str:
    """What a job is doing, e.g. `step 2/3 (41/~80 answers)`."""
    if progress.phase == "initial":
        what = "scoring the initial prompt"
    elif progress.phase == "search":
        what = f"step {progress.phase_step}/{progress.total_steps}"
    elif progress.phase == "test":
        what = "scoring on test"
    else:
        return progress.phase
    if progress.phase_total:
        approx = "~" if progress.phase == "search" else ""
        what += f" ({progress.phase_done}/{approx}{progress.phase_total} answers)"
    return what


def progress_line(job) -> str:
    """One line per change of state, phase or step (not per answer)."""
    progress = job.progress
    where = phase_text(progress) if job.status == "running" else f"step {progress.step}/{progress.total_steps}"
    line = f"job {job.id}: {job.status}, {where.split(' (')[0]}, {job.usage.llm_calls} LLM calls"
    if job.best is not None and job.best.dev_score is not None:
        line += f", best dev {job.best.dev_score:.3f}"
    return line


async def follow(client: AsyncClient, job_id: str, poll_s: float = 0.5):
    """Poll a job until it ends: a progress bar on a terminal (every phase: initial scoring, each step, test
    scoring), a line per change otherwise."""
    if not console.is_terminal:
        last = None
        while True:
            job = await client.get_job(job_id)
            key = (job.status, job.progress.phase, job.progress.phase_step, job.progress.step)
            if key != last:
                print(progress_line(job), flush=True)
                last = key
            if job.status in TERMINAL:
                return job
            await asyncio.sleep(poll_s)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("queued", total=1.0, info="")
        while True:
            job = await client.get_job(job_id)
            info = f"calls {job.usage.llm_calls}  hits {job.usage.cache_hits}"
            if job.best is not None and job.best.dev_score is not None:
                info += f"  best dev {job.best.dev_score:.3f}"
            description = phase_text(job.progress) if job.status == "running" else job.status
            progress.update(bar, completed=job.progress.fraction, description=description, info=info)
            if job.status in TERMINAL:
                return job
            await asyncio.sleep(poll_s)


# Each method's demo parameters, sized so the job ends in minutes on 2 CPU cores with the local model.
DEMO_PARAMS: dict[str, dict] = {
    "opro": {"preset": "small", "steps": 3, "candidates_per_step": 4, "train_subset": 28},
    "plum": {"preset": "small", "train_subset": 28},
    "claps": {"preset": "small", "train_subset": 16, "n_clusters": 64, "prompt_length": 3, "percentile": 85},
}
DEMO_METHOD = "opro"
# A quarter for the search's scoring, a quarter for dev selection, half for the held-out test: the test set is the
# largest split so the gain's interval is narrow enough to mean something.
DEMO_SPLIT = {"train": 0.25, "dev": 0.25, "test": 0.5}


def demo_job_body(
    *,
    method: str = DEMO_METHOD,
    dataset: str = "builtin:dbpedia16",
    template: str = DEMO_TEMPLATE,
    initial_prompt: str = DEMO_WEAK_PROMPT,
    max_llm_calls: int = 3000,
    seed: int = 0,
    backend: str | None = None,
) -> dict:
    """The demo job, shared with `bench/bench_demo.py` so the benchmark measures exactly this."""
    body = {
        "method": method,
        "task": {"dataset": dataset, "template": template, "split": DEMO_SPLIT},
        "initial_prompt": initial_prompt,
        "params": DEMO_PARAMS[method],
        "budget": {"max_llm_calls": max_llm_calls},
        "seed": seed,
    }
    if backend is not None:
        body["backends"] = {"scorer": backend, "optimizer": backend}
    return body


@cli.command()
def demo(
    method: str = typer.Option(DEMO_METHOD, help=f"One of {', '.join(DEMO_PARAMS)}."),
    backend: str = typer.Option(
        None, help="An OpenAI-compatible server's base URL (e.g. vLLM: http://HOST:8000/v1) instead of the local model."
    ),
    model: str = typer.Option(None, help="The served model's name, with --backend."),
    max_llm_calls: int = typer.Option(3000, help="Hard budget."),
    dataset: str = typer.Option("builtin:dbpedia16"),
    template: str = typer.Option(DEMO_TEMPLATE),
    initial_prompt: str = typer.Option(DEMO_WEAK_PROMPT, help="Deliberately weak starting instruction."),
    seed: int = typer.Option(0),
) -> None:
    """Optimize a prompt on a bundled task, embedded (no Postgres/Redis needed): the local CPU model by default."""
    from app.settings import BackendSettings
    from workers.embedded import embedded_settings

    if method not in DEMO_PARAMS:
        raise fail(f"--method must be one of {', '.join(DEMO_PARAMS)}")
    settings = Settings()
    if backend is not None:
        served = BackendSettings(kind="openai_compat", base_url=backend, model=model)
        settings = settings.model_copy(update={"backends": {**settings.backends, "server": served}})
    data_dir = settings.data_dir / "demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    database = data_dir / "demo.db"
    for suffix in ("", "-wal", "-shm"):  # a fresh database: every LLM call is made for real
        Path(str(database) + suffix).unlink(missing_ok=True)
    settings = embedded_settings(settings, database)
    logging.basicConfig(level=logging.WARNING)
    body = demo_job_body(
        method=method,
        dataset=dataset,
        template=template,
        initial_prompt=initial_prompt,
        max_llm_calls=max_llm_calls,
        seed=seed,
        backend="server" if backend is not None else None,
    )
    model_text = (
        f"the model served at {backend}"
        if backend
        else "the default model, SmolLM2-135M on this CPU: small on purpose so the demo runs anywhere; point it at a "
        "real server with --backend http://HOST:8000/v1 --model NAME"
    )
    asyncio.run(_run_demo(settings, body, model_text))


async def _run_demo(settings: Settings, body: dict, model_text: str) -> None:
    from workers.embedded import create_embedded_app

    app = create_embedded_app(settings)
    console.print(f"[bold]promptopt demo[/bold]: {body['method']} on {body['task']['dataset']} with {model_text}.")
    console.print(f"starting from: [italic]{body['initial_prompt']}[/italic]")
    async with app.router.lifespan_context(app):
        async with api("http://demo", None, transport=httpx.ASGITransport(app=app), timeout=60) as client:
            started = time.monotonic()
            job = await client.submit_job(body)
            job = await follow(client, job.id)
            wall = time.monotonic() - started
            top = await client.candidates(job.id, order="score", limit=5)
    show_top_candidates(top.items)
    show_result(job, wall)
    if "SmolLM2" in model_text:
        console.print(
            "A 135M model follows instructions poorly: the search finds what works for this model (often not good "
            "English), and the test interval says whether the gain is real."
        )
    if job.status != "succeeded":
        raise typer.Exit(1)


def show_top_candidates(candidates) -> None:
    table = Table(title="top candidates (by score on the search's training examples)")
    table.add_column("step", justify="right")
    table.add_column("prompt", max_width=70)
    table.add_column("train", justify="right")
    table.add_column("dev", justify="right")
    for candidate in candidates:
        table.add_row(str(candidate.step), repr(candidate.prompt), _fmt(candidate.score), _fmt(candidate.dev_score))
    console.print(table)


@cli.command()
def submit(
    file: Path = typer.Argument(..., help="The job as JSON."),
    wait: bool = typer.Option(False, help="Follow the job until it ends."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Submit a job from a JSON file; prints its id."""
    body = read_json(file)

    async def go() -> None:
        async with api(url, api_key) as client:
            started = time.monotonic()
            job = await client.submit_job(body)
            for warning in job.warnings:
                errors.print(f"warning: {warning}", style="yellow", highlight=False)
            print(job.id, flush=True)
            if wait:
                show_result(await follow(client, job.id), time.monotonic() - started)

    asyncio.run(go())


@cli.command()
def watch(job_id: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Follow a job until it ends: a progress bar on a terminal, plain progress lines otherwise."""

    async def go() -> None:
        async with api(url, api_key) as client:
            started = time.monotonic()
            show_result(await follow(client, job_id), time.monotonic() - started)

    asyncio.run(go())


@cli.command()
def cancel(job_id: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Cancel a job (idempotent); exit code 1 if there is no such job."""

    async def go() -> None:
        async with api(url, api_key) as client:
            job = await client.cancel_job(job_id)
        if job.status == "running":
            print(f"job {job.id}: cancel requested; it stops at its next request (about a second)")
        else:
            print(f"job {job.id}: {job.status}")

    asyncio.run(go())


@cli.command("list")
def list_jobs(
    status: str = typer.Option(None, help="Only jobs in this status."),
    method: str = typer.Option(None, help="Only jobs of this method."),
    limit: int = typer.Option(20, min=1, max=200),
    as_json: bool = typer.Option(False, "--json"),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """The newest jobs."""

    async def go() -> None:
        async with api(url, api_key) as client:
            page = await client.list_jobs(status=status, method=method, limit=limit)
        if as_json:
            print(page.model_dump_json(indent=2))
            return
        table = Table("id", "method", "status", "steps", "best test", "LLM calls", "created")
        for job in page.items:
            best = job.best.test_score if job.best else None
            table.add_row(
                job.id,
                job.method,
                job.status,
                f"{job.progress.step}/{job.progress.total_steps}",
                _fmt(best),
                str(job.usage.llm_calls),
                job.created_at.strftime("%Y-%m-%d %H:%M"),
            )
        console.print(table)

    asyncio.run(go())


@cli.command()
def show(
    job_id: str, as_json: bool = typer.Option(False, "--json"), url: str = URL_OPTION, api_key: str | None = KEY_OPTION
) -> None:
    """A job: status, the initial and best prompts with their scores, usage."""

    async def go() -> None:
        async with api(url, api_key) as client:
            job = await client.get_job(job_id)
        if as_json:
            print(job.model_dump_json(indent=2))
        else:
            show_result(job)

    asyncio.run(go())


@cli.command()
def best(
    job_id: str,
    as_json: bool = typer.Option(False, "--json", help="The prompt with its scores and interval, as JSON."),
    use: str = typer.Option("best", help="best or initial"),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """The job's best prompt alone (`promptopt best ID > prompt.txt`); exit code 1 while it has none."""

    async def go() -> None:
        async with api(url, api_key) as client:
            job = await client.get_job(job_id)
        entry = job.best if use == "best" else job.initial
        if entry is None:
            raise fail(f"job {job_id} has no {use} prompt yet ({job.status})")
        if as_json:
            print(entry.model_dump_json(indent=2))
        else:
            sys.stdout.write(str(entry.prompt) + "\n")

    asyncio.run(go())


datasets_cli = typer.Typer(help="Datasets: upload and list.", no_args_is_help=True)
cli.add_typer(datasets_cli, name="datasets")


@datasets_cli.command("upload")
def datasets_upload(
    file: Path = typer.Argument(..., help='JSON Lines of {"input", "target"}, or JSON: a list of them or a dataset.'),
    name: str = typer.Option(None, help="Default: the file's name."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Upload a dataset; prints its id."""
    if not file.is_file():
        raise fail(f"cannot read {file}: no such file")

    async def go() -> None:
        async with api(url, api_key) as client:
            if file.suffix == ".json":
                body = read_json(file)
                examples = body.get("examples") if isinstance(body, dict) else body
                dataset = await client.create_dataset(name or file.stem, examples)
            else:
                dataset = await client.upload_dataset(file, name=name)
        errors.print(f"uploaded {dataset.n_examples} examples as {dataset.name!r}", highlight=False)
        print(dataset.id)

    asyncio.run(go())


@datasets_cli.command("list")
def datasets_list(
    builtin: bool = typer.Option(False, "--builtin", help="The bundled tasks instead of uploaded datasets."),
    as_json: bool = typer.Option(False, "--json"),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Uploaded datasets (or the bundled tasks)."""

    async def go() -> None:
        async with api(url, api_key) as client:
            page = await client.list_datasets(source="builtin" if builtin else "uploaded", limit=200)
        if as_json:
            print(page.model_dump_json(indent=2))
            return
        table = Table("id", "name", "examples", "created")
        for dataset in page.items:
            created = dataset.created_at.strftime("%Y-%m-%d %H:%M") if dataset.created_at else "-"
            table.add_row(dataset.id, dataset.name, str(dataset.n_examples), created)
        console.print(table)

    asyncio.run(go())


study_cli = typer.Typer(help="Studies: methods x seeds on one task, with a leaderboard.", no_args_is_help=True)
cli.add_typer(study_cli, name="study")


def leaderboard_table(study) -> Table:
    table = Table(title=f"study {study.id} ({study.name or '-'}) - {study.status}")
    for column in ("arm", "method", "runs", "test mean ± sd", "95% interval", "vs initial", "vs baselines", "calls"):
        table.add_column(column, justify="left" if column in ("arm", "method") else "right")

    def versus(comparison) -> str:
        mark = "*" if comparison.significant else ""
        return f"{comparison.difference:+.3f} p={comparison.p_value:.3g}{mark}"

    for row in study.leaderboard or []:
        comparisons = {c.against: c for c in row.comparisons}
        initial = comparisons.pop("initial", None)
        interval = row.test_interval
        table.add_row(
            row.arm,
            row.method,
            f"{row.finished}/{row.runs}",
            f"{_fmt(row.test_mean)} ± {_fmt(row.test_sd)}",
            "-" if interval is None else f"[{interval.low:.3f}, {interval.high:.3f}]",
            "-" if initial is None else versus(initial),
            " ".join(f"{name}: {versus(c)}" for name, c in comparisons.items()) or "-",
            _fmt(row.mean_llm_calls, 0),
        )
    table.caption = (
        "* p < 0.05 (paired test on the same test examples, pooled over seeds; the test is named in --json). "
        "An interval that contains the baseline's mean, or p ≥ 0.05, means the difference may be noise."
    )
    return table


def study_progress_line(study) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in study.jobs.items() if n)
    return f"study {study.id}: {study.status} ({counts})"


@study_cli.command("create")
def study_create(
    file: Path = typer.Argument(..., help="The study as JSON: task, arms, seeds, baselines, budget."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Create a study from a JSON file; prints its id."""
    body = read_json(file)

    async def go() -> None:
        async with api(url, api_key) as client:
            answer = await client.request("POST", "/v1/studies", json=body)
        for warning in answer.get("warnings", []):
            errors.print(f"warning: {warning}", style="yellow", highlight=False)
        errors.print(f"created study {answer['id']} with {sum(answer['jobs'].values())} runs", highlight=False)
        print(answer["id"])

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
        async with api(url, api_key) as client:
            study = await client.get_study(study_id)
        if as_json:
            print(study.model_dump_json(indent=2))
        else:
            print(study_progress_line(study))
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

    async def go() -> None:
        async with api(url, api_key) as client:
            study = await client.get_study(study_id)
            if console.is_terminal:
                with Live(leaderboard_table(study), console=console, refresh_per_second=2) as live:
                    while study.status not in STUDY_DONE:
                        await asyncio.sleep(interval)
                        study = await client.get_study(study_id)
                        live.update(leaderboard_table(study))
            else:
                last = None
                while True:
                    line = study_progress_line(study)
                    if line != last:
                        print(line, flush=True)
                        last = line
                    if study.status in STUDY_DONE:
                        break
                    await asyncio.sleep(interval)
                    study = await client.get_study(study_id)
                console.print(leaderboard_table(study))

    asyncio.run(go())


@study_cli.command("cancel")
def study_cancel(study_id: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Cancel every run of a study that has not ended."""

    async def go() -> None:
        async with api(url, api_key) as client:
            study = await client.cancel_study(study_id)
        print(study_progress_line(study))

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
