"""The dashboard at / in a real browser (Debian's chromium through playwright): every page loads without console
errors, the job plot has one point per candidate and grows from the event stream without a reload, the candidate
table sorts, the submit form shows a 422 next to its field, and with API keys the page asks for one before showing
data. Saves the screenshots in docs/screenshots/ that the README shows."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import importlib.util
import json
import re
import shutil
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from app.jobs.models import Artifact
from app.optimizers.base import instruction_hash
from tests.conftest import insert_job, label_job, served, wait_for_status
from tests.test_studies import study_body

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "app" / "ui" / "static"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / "docs" / "screenshots"
WAIT_MS = 30_000

needs_browser = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None,
    reason="needs Debian's chromium and playwright (scripts/test.sh installs both)",
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        await chromium.close()


class Tab:
    """A page in its own context, collecting console errors and uncaught exceptions."""

    def __init__(self, page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def unexpected_errors(self, *allowed_statuses: int) -> list[str]:
        """Errors other than the browser's own log line for an answer the test provoked (e.g. a 422)."""
        expected = [f"status of {status} (" for status in allowed_statuses]
        return [
            e for e in self.errors if not (e.startswith("Failed to load resource") and any(s in e for s in expected))
        ]


@contextlib.asynccontextmanager
async def tab(browser, width: int = 1280, height: int = 900) -> AsyncIterator[Tab]:
    context = await browser.new_context(
        viewport={"width": width, "height": height}, permissions=["clipboard-read", "clipboard-write"]
    )
    context.set_default_timeout(WAIT_MS)
    try:
        yield Tab(await context.new_page())
    finally:
        await context.close()


async def screenshot(page, name: str, *, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


async def all_candidates(client: httpx.AsyncClient, job_id: str) -> list[dict]:
    items, cursor = [], None
    while True:
        params = {"order": "step", "limit": 500, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/v1/jobs/{job_id}/candidates", params=params)).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


async def point_count(page) -> int:
    return await page.locator("#score-plot svg.chart .pt-train").count()


async def wait_for_points(page, n: int) -> None:
    await page.wait_for_function(
        "n => document.querySelectorAll('#score-plot svg.chart .pt-train').length === n", arg=n
    )


async def column_values(page, column: int) -> list[float]:
    cells = page.locator(f"#candidate-table tbody tr td:nth-child({column})")
    return [float(v) if v else float("-inf") for v in await cells.evaluate_all("cs => cs.map(c => c.dataset.value)")]


@needs_browser
async def test_every_page_loads_and_the_job_page_matches_the_api(settings, app_client, worker, browser):
    dataset = await app_client.post(
        "/v1/datasets",
        json={"name": "tiny", "examples": [{"input": f"q{i}", "target": "yes" if i % 2 else "no"} for i in range(6)]},
    )
    assert dataset.status_code == 201, dataset.text
    job_id = (await app_client.post("/v1/jobs", json=label_job())).json()["id"]
    study_id = (await app_client.post("/v1/studies", json=study_body(seeds=[0]))).json()["id"]
    await wait_for_status(app_client, job_id, {"succeeded"})
    candidates = await all_candidates(app_client, job_id)

    async with served(settings) as url, tab(browser) as t:
        page = t.page
        await page.goto(f"{url}/#/jobs")
        await page.locator(f'tr[data-job-id="{job_id}"]').wait_for()
        # A job submitted meanwhile shows up without a reload (the list polls); the status filter finds it.
        # A prompt of its own: with answers cached by other tests it could finish before the cancel arrives.
        late = label_job(seed=3, initial_prompt=f"Relate the sentences (late {uuid.uuid4()}).")
        late_id = (await app_client.post("/v1/jobs", json=late)).json()["id"]
        await app_client.post(f"/v1/jobs/{late_id}/cancel")
        await wait_for_status(app_client, late_id, {"cancelled"})
        await page.locator(f'tr[data-job-id="{late_id}"]').wait_for()
        await page.locator("#filter-status").select_option("cancelled")
        await page.locator(f'tr[data-job-id="{job_id}"]').wait_for(state="detached")
        assert await page.locator(f'tr[data-job-id="{late_id}"]').count() == 1
        await page.locator("#filter-status").select_option("")
        await page.locator(f'tr[data-job-id="{job_id}"]').wait_for()
        await screenshot(page, "jobs.png")

        await page.goto(f"{url}/#/jobs/{job_id}")
        await page.locator("#event-log li[data-event='state']").last.wait_for()
        await wait_for_points(page, len(candidates))
        assert await point_count(page) == len(candidates)  # one point per candidate
        dev_scored = sum(c["dev_score"] is not None for c in candidates)
        assert await page.locator("#score-plot svg.chart .pt-dev").count() == dev_scored
        assert await page.locator("#candidate-table tbody tr").count() == len(candidates)
        await page.locator("#best-title").wait_for()
        assert "95% interval" in await page.locator("dd[data-field='test']").last.inner_text()
        assert "of 2,000" in await page.locator("[data-budget='calls']").inner_text()
        await page.get_by_role("button", name="Copy prompt").last.click()
        await page.get_by_text("Copied.").wait_for()
        job = (await app_client.get(f"/v1/jobs/{job_id}")).json()
        assert await page.evaluate("navigator.clipboard.readText()") == job["best"]["prompt"]

        # Sorting: a click on "Train" sorts by train score, best first; again flips it; Enter on "#" restores id order.
        await page.get_by_role("button", name="Train").click()
        scores = await column_values(page, 3)
        assert scores == sorted(scores, reverse=True)
        assert await page.locator("th[data-key='score']").get_attribute("aria-sort") == "descending"
        await page.get_by_role("button", name="Train").click()
        scores = await column_values(page, 3)
        assert scores == sorted(scores)
        await page.get_by_role("button", name="#", exact=True).focus()
        await page.keyboard.press("Enter")
        ids = await column_values(page, 1)
        assert ids == sorted(ids) and len(ids) == len(candidates)
        await page.locator("#candidate-search").fill("zzz-no-such-words")
        assert await page.locator("#candidate-table tbody tr").count() == 0
        await page.locator("#candidate-search").fill("")
        await page.evaluate("document.activeElement.blur()")
        await page.mouse.move(0, 0)  # no hover style in the screenshot
        await screenshot(page, "job.png", full_page=True)

        await page.goto(f"{url}/#/datasets")
        await page.locator("#uploaded-datasets tr[data-dataset-id]").first.wait_for()
        # A bad JSONL line is reported in place with its line number; a good file is created and previewed.
        bad = '{"input": "a", "target": "b"}\n{"input": "c"}\n'
        await page.locator("#upload-file").set_input_files(
            files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad.encode()}]
        )
        await page.locator("#upload-form button[type=submit]").click()
        await page.locator("#upload-errors li", has_text="line 2").wait_for()
        good = "".join(json.dumps({"input": f"x{i}", "target": "y"}) + "\n" for i in range(3))
        await page.locator("#upload-file").set_input_files(
            files=[{"name": "good.jsonl", "mimeType": "application/jsonl", "buffer": good.encode()}]
        )
        await page.locator("#upload-form button[type=submit]").click()
        await page.locator("#preview-examples tbody tr").nth(2).wait_for()
        await page.locator('#builtin-datasets tr[data-dataset-id="builtin:snli16"] button').click()
        await page.locator("#preview-title", has_text="snli16").wait_for()
        await page.evaluate("window.scrollTo(0, 0)")  # the preview took focus and scrolled
        await screenshot(page, "datasets.png")

        for _ in range(600):
            if (await app_client.get(f"/v1/studies/{study_id}")).json()["status"] == "completed":
                break
            await asyncio.sleep(0.1)
        await page.goto(f"{url}/#/studies")
        await page.locator(f'tr[data-study-id="{study_id}"]').wait_for()
        await page.goto(f"{url}/#/studies/{study_id}")
        await page.locator("#leaderboard tbody tr").first.wait_for()
        study = (await app_client.get(f"/v1/studies/{study_id}")).json()
        assert await page.locator("#leaderboard tbody tr").count() == len(study["leaderboard"])
        assert await page.locator("svg.chart .pt-arm").count() == len(study["leaderboard"])
        assert await page.locator("#comparisons tbody tr").count() == sum(
            len(arm["comparisons"]) for arm in study["leaderboard"]
        )
        await screenshot(page, "study.png", full_page=True)

        await page.goto(f"{url}/#/submit")
        await page.locator('[data-loc="params.steps"]').wait_for()
        assert t.unexpected_errors(422) == []  # the bad upload's 422 was provoked

    async with served(settings) as url, tab(browser, width=390, height=844) as t:
        await t.page.goto(f"{url}/#/jobs")
        await t.page.locator(f'tr[data-job-id="{job_id}"]').wait_for()
        assert await t.page.evaluate("document.documentElement.scrollWidth") <= 390
        await t.page.goto(f"{url}/#/jobs/{job_id}")
        await t.page.locator("#score-plot svg.chart .pt-train").first.wait_for()
        await screenshot(t.page, "job-phone.png")
        # Nothing wider than the phone's screen except inside the scrolling table containers.
        overflow = await t.page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= 390, overflow
        assert t.errors == []


@needs_browser
async def test_a_step_event_adds_points_without_a_reload(settings, app_client, worker, browser, fake_llm):
    fake_llm.hold_after(0, kinds="chat")  # the initial prompt is scored (step 0); step 1's optimizer call waits
    # Its own prompt and seed, so no answer comes from the cache the other tests' jobs filled.
    body = label_job(initial_prompt="Does the premise entail the hypothesis?", seed=16)
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    await fake_llm.wait_held(1)
    async with served(settings) as url, tab(browser) as t:
        page = t.page
        await page.goto(f"{url}/#/jobs/{job_id}")
        await page.locator("#score-plot svg.chart .pt-train").first.wait_for()
        before = await point_count(page)
        assert before == len(await all_candidates(app_client, job_id))
        await page.evaluate("window.__same_document = true")  # gone if the page reloads
        # The held step shows as the phase in progress (from the stream's progress events), with its answers.
        phase = page.locator("#phase-text", has_text="step 1 of 2 · ")
        try:
            await phase.wait_for(timeout=10_000)
        except Exception:
            raise AssertionError(await page.locator("#phase-text").text_content()) from None
        assert "answers" in await phase.text_content()

        fake_llm.release()
        await wait_for_status(app_client, job_id, {"succeeded"})
        total = len(await all_candidates(app_client, job_id))
        assert total > before
        await wait_for_points(page, total)
        assert await page.evaluate("window.__same_document === true")
        assert await page.locator("#event-log li[data-event='step']").count() >= 2

        # The page's stream reader resumes after Last-Event-ID.
        read = """async (path) => {
            const { readEventStream } = await import("/ui/api.js");
            const read = async (lastEventId) => {
                const ids = [];
                const signal = new AbortController().signal;
                await readEventStream(path, { lastEventId, signal, onEvent: (e) => ids.push(e.id) });
                return ids;
            };
            const all = await read(null);
            return { all, resumed: await read(all[1]) };
        }"""
        ids = await page.evaluate(read, f"/v1/jobs/{job_id}/events")
        assert len(ids["all"]) > 3 and ids["resumed"] == ids["all"][2:]
        assert t.errors == []


@needs_browser
async def test_submit_form_shows_a_422_next_to_its_field(settings, app_client, browser):
    async with served(settings) as url, tab(browser) as t:
        page = t.page
        await page.goto(f"{url}/#/submit")
        # Every method's parameters become fields.
        for method in (await app_client.get("/v1/methods")).json():
            await page.locator("#f-method").select_option(method["name"])
            fields = page.locator('fieldset[data-field="params"] [data-field^="params."]')
            assert await fields.count() == len(method["parameters"]["properties"]), method["name"]
        await page.locator("#f-method").select_option("opro")
        await page.locator("#f-params-steps").fill("100000")  # the schema's maximum is 10000
        await page.get_by_role("button", name="Submit job").click()
        error = page.locator('[data-field="params.steps"] .field-error')
        await error.wait_for()
        assert "10000" in await error.inner_text()
        assert await page.locator("#f-params-steps").get_attribute("aria-invalid") == "true"
        assert await page.locator('[data-field="params.candidates_per_step"] .field-error').is_hidden()
        await screenshot(page, "submit.png")

        # A preset fills its values in; a field edited after it overrides it; the form then submits and opens the job.
        await page.locator("#f-params-preset").select_option("small")
        assert await page.locator("#f-params-optimizer_max_tokens").input_value() == "60"
        await page.locator("#f-params-steps").fill("1")
        # Task options beyond the template: calibration and how demonstrations are shown (a bad template is a 422).
        await page.locator("#f-task-calibration").select_option("cbm")
        await page.locator("#f-task-demo_template").fill("{input} is a")
        await page.locator("#f-task-demo_max_chars").fill("80")
        await page.get_by_role("button", name="Submit job").click()
        error = page.locator('[data-field="task.demo_template"] .field-error')
        await error.wait_for()
        assert "{target}" in await error.inner_text()
        await page.locator("#f-task-demo_template").fill("{input} is a {target}.")
        await page.get_by_role("button", name="Submit job").click()
        await page.wait_for_url(f"{url}/#/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        job = (await app_client.get(f"/v1/jobs/{job_id}")).json()
        assert job["method"] == "opro" and job["spec"]["params"]["steps"] == 1
        assert job["spec"]["params"]["optimizer_max_tokens"] == 60  # from the preset
        task = job["spec"]["task"]
        assert (task["calibration"], task["demo_template"], task["demo_max_chars"]) == (
            "cbm",
            "{input} is a {target}.",
            80,
        )
        # No worker here: the job stays queued until the page's cancel button ends it.
        await page.locator(".job-meta .status-queued").wait_for()
        await page.get_by_role("button", name="Cancel job").click()
        await page.locator(".job-meta .status-cancelled").wait_for()
        assert (await app_client.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"
        assert t.unexpected_errors(422) == []


@needs_browser
async def test_with_api_keys_the_page_asks_for_a_key_before_showing_data(settings, browser):
    keyed = settings.model_copy(update={"api_keys": ["t:secret"]})
    async with served(keyed) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer secret"}) as client:
            created = await client.post("/v1/jobs", json=label_job())
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
        async with tab(browser) as t:
            page = t.page
            await page.goto(f"{url}/#/jobs")
            await page.locator("#key-form").wait_for()
            assert await page.locator("tr[data-job-id]").count() == 0  # no data without a key

            await page.locator("#api-key").fill("wrong")
            await page.get_by_role("button", name="Use key").click()
            await page.locator("#key-form .error-box", has_text="refused").wait_for()

            await page.locator("#api-key").fill("secret")
            await page.get_by_role("button", name="Use key").click()
            await page.locator(f'tr[data-job-id="{job_id}"]').wait_for()
            assert await page.evaluate("sessionStorage.getItem('promptopt.apiKey')") == "secret"
            await page.goto(f"{url}/#/jobs/{job_id}")  # the event stream sends the key too
            await page.locator("#event-log li[data-event='state']").first.wait_for()
            assert t.unexpected_errors(401) == []


@needs_browser
async def test_candidates_show_their_parent_and_a_word_diff(settings, db, browser):
    """APO's details name a parent by its index in the step's beam (the step's candidates with origin "beam")."""
    job_id = await insert_job(
        db,
        "apo",
        [
            {"step": 0, "prompt": "Classify the text.", "score": 0.5, "details": {"origin": "initial"}},
            {"step": 1, "prompt": "Classify the text.", "score": 0.5, "details": {"origin": "beam"}},
            {"step": 1, "prompt": "Classify the text carefully.", "score": 0.6,
             "details": {"origin": "edit", "parent": 0}},
            {"step": 1, "prompt": "Sort the text.", "score": 0.4, "details": {"origin": "paraphrase", "parent": 0}},
        ],
        spec={"initial_prompt": "Classify the text.", "budget": {"max_llm_calls": 100}},
        initial={"prompt": "Classify the text.", "train_score": 0.5},
        best={"prompt": "Classify the text carefully.", "train_score": 0.6},
    )  # fmt: skip
    async with served(settings) as url, tab(browser) as t:
        page = t.page
        await page.goto(f"{url}/#/jobs/{job_id}")
        rows = page.locator("#candidate-table tbody tr")
        await rows.nth(3).wait_for()
        beam_id = await rows.nth(1).get_attribute("data-candidate-id")
        for index, inserted, deleted in ((2, ["carefully"], []), (3, ["Sort"], ["Classify"])):
            row = rows.nth(index)
            assert (await row.locator("td").nth(6).inner_text()) == f"#{beam_id}"
            await row.locator("summary").click()
            diff = row.locator(".diff")
            assert await diff.locator("ins").all_inner_texts() == inserted
            assert await diff.locator("del").all_inner_texts() == deleted
            assert f"parent #{beam_id}" in await row.locator("details").inner_text()
        assert t.errors == []


@needs_browser
async def test_a_prompt_with_demonstrations_shows_its_instruction_and_its_demonstrations(settings, db, browser):
    """A candidate carrying demonstrations reads as its instruction plus its demonstrations; the diff compares
    instructions, and the prompt as scored is one click away."""
    block = "A bank in Ohio.\nCategory: Company\n\nA river in Peru.\nCategory: NaturalPlace"
    job_id = await insert_job(
        db,
        "fewshot",
        [
            {"step": 0, "prompt": "Classify the text.", "score": 0.5,
             "details": {"origin": "initial", "instruction": "Classify the text.", "demonstrations": []}},
            {"step": 1, "prompt": f"{block}\n\nClassify the text carefully.", "score": 0.8,
             "details": {"instruction": "Classify the text carefully.", "strategy": "random",
                         "demonstrations": [4, 17]}},
            {"step": 1, "prompt": "Classify the text. [3 nearest train examples per input]", "score": 0.7,
             "details": {"instruction": "Classify the text.", "strategy": "nearest", "nearest": 3, "pool": 56}},
        ],
        spec={"initial_prompt": "Classify the text.", "budget": {"max_llm_calls": 100}},
        initial={"prompt": "Classify the text.", "train_score": 0.5},
        best={"prompt": f"{block}\n\nClassify the text carefully.", "train_score": 0.8},
    )  # fmt: skip
    async with served(settings) as url, tab(browser) as t:
        page = t.page
        await page.goto(f"{url}/#/jobs/{job_id}")
        rows = page.locator("#candidate-table tbody tr")
        await rows.nth(2).wait_for()
        lines = await page.locator("#candidate-table .prompt-line").all_inner_texts()
        assert lines == ["Classify the text.", "Classify the text carefully.", "Classify the text."]
        notes = await page.locator("#candidate-table .demo-note").all_inner_texts()
        assert [n.strip() for n in notes] == [
            "+ no demonstrations",
            "+ 2 demonstrations (train #4, #17)",
            "+ 3 nearest train examples per input (of 56)",
        ]
        row = rows.nth(1)
        await row.locator("summary").click()
        assert await row.locator(".diff ins").all_inner_texts() == ["carefully"]
        assert await row.locator(".diff del").all_inner_texts() == []
        assert (await row.locator(".scored-prompt").inner_text()).startswith("A bank in Ohio.")
        assert "(the instruction)" in await row.locator("details").inner_text()
        await page.mouse.move(0, 0)
        await screenshot(page, "candidates-demonstrations.png")
        assert t.errors == []


@needs_browser
async def test_a_soft_prompt_job_shows_loss_curves_per_layer_and_its_artifact(settings, db, browser):
    """Running BBTv2 needs the local model, so the job is written to the database."""
    best = "[bbtv2 soft prompt: 2 layers]"
    candidates = [
        {
            "step": step, "prompt": f"[soft prompt {step}.{layer}]", "score": 0.4 + 0.05 * step,
            "details": {"loss": 1.0 - 0.1 * step - 0.05 * layer, "layer": layer, "round": step},
        }
        for step in range(4)
        for layer in range(2)
    ]  # fmt: skip
    job_id = await insert_job(
        db,
        "bbtv2",
        candidates,
        spec={"initial_prompt": "Classify.", "budget": {"max_llm_calls": 500}},
        initial={"prompt": "Classify.", "train_score": 0.4},
        best={"prompt": best, "train_score": 0.6},
    )
    async with db.transaction() as session:
        session.add(
            Artifact(job_id=job_id, prompt_hash=instruction_hash(best), kind="bbtv2", model_id="m", data={"z": [0.1]})
        )
    async with served(settings) as url, tab(browser) as t:
        page = t.page
        await page.goto(f"{url}/#/jobs/{job_id}")
        await page.locator("#soft-prompt svg.chart .pt-loss").first.wait_for()
        assert await page.locator("#soft-prompt svg.chart .pt-loss").count() == 8
        legend = await page.locator("#soft-prompt .legend").inner_text()
        assert "layer 0" in legend and "layer 1" in legend
        async with page.expect_download() as download:
            await page.locator("#artifact-link").click()
        assert (await download.value).suggested_filename == f"artifact-{job_id}.json"
        assert t.errors == []


async def test_the_shell_and_its_assets_are_public_offline_and_packaged(app_client):
    """No browser needed: what the server sends, that nothing points off the server, and that the wheel has it all."""
    shell = await app_client.get("/")
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in shell.headers["content-security-policy"]
    script = await app_client.get("/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    paths = (await app_client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not any(path.startswith("/ui") for path in paths)

    files = [path for path in STATIC.iterdir() if path.is_file()]
    for path in files:
        text = path.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://|//cdn", text), f"{path.name} refers to another server"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app.ui"]
    unpackaged = [p.name for p in files if not any(fnmatch.fnmatch(f"static/{p.name}", g) for g in globs)]
    assert unpackaged == [], f"add these to [tool.setuptools.package-data] app.ui: {unpackaged}"
