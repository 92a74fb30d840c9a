// #/jobs/<id>: live score plot, budget, prompts, candidates and the event log, fed by the job's event stream.

import { ApiError, download, get, post, readEventStream, withQuery } from "./api.js";
import { CandidateTable } from "./candidates.js";
import {
  copyText,
  errorBox,
  fmtInt,
  fmtNumber,
  fmtScore,
  fmtSeconds,
  fmtTime,
  h,
  isQuiet,
  progressBar,
  promptText,
  replace,
  run,
  shortId,
  statusBadge,
} from "./dom.js";
import { burnDownPlot, lossPlot, scorePlot } from "./job_plots.js";
import { fitWidth } from "./plot.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SOFT_PROMPT_METHODS = new Set(["bbt", "bbtv2"]);
const CANDIDATE_PAGE = 500;
const LOG_LIMIT = 1000; // entries kept in the event log's DOM

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

function card(title, id, ...children) {
  return h("section", { class: "card", "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

function elapsedSeconds(job) {
  if (!job.started_at) return 0;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return Math.max(0, (end - new Date(job.started_at)) / 1000);
}

function intervalText(result) {
  if (typeof result.test_low !== "number" || typeof result.test_high !== "number") return "";
  const n = result.test_n ? `, n=${result.test_n}` : "";
  const method = result.test_method ? `, ${result.test_method}` : "";
  return ` (95% interval ${fmtScore(result.test_low)}–${fmtScore(result.test_high)}${n}${method})`;
}

function promptCard(title, id, result) {
  if (!result) return card(title, id, h("p", { class: "muted" }, "Not scored yet."));
  const text = promptText(result.prompt);
  const status = h("span", { class: "muted small", role: "status" });
  const copy = h("button", { type: "button", class: "secondary" }, "Copy prompt");
  copy.addEventListener("click", () =>
    run(async () => {
      status.textContent = (await copyText(text)) ? "Copied." : "Copy failed; select the text instead.";
    }),
  );
  return card(
    title,
    id,
    h("pre", { class: "prompt" }, text),
    h(
      "dl",
      { class: "scores" },
      h("dt", {}, "Train"),
      h("dd", {}, fmtScore(result.train_score)),
      h("dt", {}, "Dev"),
      h("dd", {}, fmtScore(result.dev_score)),
      h("dt", {}, "Test"),
      h("dd", { "data-field": "test" }, fmtScore(result.test_score), h("span", { class: "muted" }, intervalText(result))),
      typeof result.step === "number" ? [h("dt", {}, "Step"), h("dd", {}, result.step)] : null,
    ),
    h("div", { class: "actions" }, copy, status),
  );
}

function eventSummary(type, data) {
  const rest = Object.entries(data)
    .filter(([key]) => key !== "created_at")
    .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(" ");
  if (type === "state") {
    return [
      `status ${data.status}`,
      data.attempt ? ` (attempt ${data.attempt})` : "",
      data.stop_reason ? `, stop reason ${data.stop_reason}` : "",
      data.error ? `: ${data.error}` : "",
    ].join("");
  }
  if (type === "step") {
    const best = `best train ${fmtScore(data.best_train_score)}, dev ${fmtScore(data.best_dev_score)}`;
    const calls = data.usage ? `, ${fmtInt(data.usage.llm_calls)} calls` : "";
    return `step ${data.step}/${data.total_steps}: ${data.candidates} candidates; ${best}${calls}${data.message ? ` — ${data.message}` : ""}`;
  }
  if (type === "warning") return data.message || rest;
  if (type === "cancel_requested") return "cancel requested";
  return rest;
}

export async function jobView(main, { params: [jobId], signal }) {
  const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const state = { job: null, candidates: new Map(), tailCursor: null, stepEvents: [] };

  const title = h("h1", {}, `Job ${shortId(jobId)}`);
  const meta = h("div", { class: "job-meta" });
  const errorSlot = h("div");
  const cancelButton = h("button", { type: "button", class: "danger", id: "cancel-job" }, "Cancel job");
  const progressSlot = h("div", { class: "job-progress" });
  const scoreSlot = h("div", { id: "score-plot" });
  const budgetSlot = h("div", { id: "budget" });
  const promptsSlot = h("div", { class: "prompt-pair" });
  const softSlot = h("div", { id: "soft-prompt" });
  const streamStatus = h("span", { class: "muted small", role: "status" });
  const log = h("ol", { class: "event-log", id: "event-log", role: "log", "aria-label": "Job events" });
  const table = new CandidateTable();
  const softSection = card("Soft prompt", "soft-title", softSlot);
  softSection.hidden = true;

  replace(
    main,
    h("div", { class: "page-head" }, title, cancelButton),
    meta,
    progressSlot,
    errorSlot,
    h(
      "div",
      { class: "job-grid" },
      h(
        "section",
        { class: "card wide", "aria-labelledby": "score-title" },
        h("h2", { id: "score-title" }, "Score by step"),
        scoreSlot,
      ),
      card("Budget", "budget-title", budgetSlot),
      h("section", { class: "full", "aria-label": "Prompts" }, promptsSlot),
      softSection,
      h(
        "section",
        { class: "card full", "aria-labelledby": "candidates-title" },
        h("h2", { id: "candidates-title" }, "Candidates"),
        table.element,
      ),
      h(
        "section",
        { class: "card full", "aria-labelledby": "events-title" },
        h("div", { class: "section-head" }, h("h2", { id: "events-title" }, "Events"), streamStatus),
        h("div", { class: "log-box" }, log),
      ),
    ),
  );

  cancelButton.addEventListener("click", () =>
    run(async () => {
      cancelButton.disabled = true;
      cancelButton.textContent = "Cancelling…";
      const job = await post(`${base}/cancel`, undefined, { signal });
      state.job = { ...job, spec: state.job.spec }; // the cancel answer has no spec
      renderJob();
    }, errorSlot),
  );

  async function loadJob() {
    state.job = await get(base, { signal });
  }

  // Candidates in id order. The last (not full) page is read again from its cursor next time, so a refresh fetches
  // only what is new; `full` re-reads everything (test scores arrive for earlier candidates at the end).
  async function loadCandidates(full = false) {
    let cursor = full ? null : state.tailCursor;
    for (;;) {
      const url = withQuery(`${base}/candidates`, { order: "step", limit: CANDIDATE_PAGE, cursor });
      const page = await get(url, { signal });
      for (const c of page.items) state.candidates.set(c.id, c);
      if (!page.next_cursor) break;
      cursor = page.next_cursor;
    }
    state.tailCursor = cursor;
  }

  function knownStep() {
    let step = state.job?.progress.step ?? -1;
    for (const c of state.candidates.values()) step = Math.max(step, c.step);
    return step;
  }

  function renderJob() {
    const job = state.job;
    const terminal = TERMINAL.has(job.status);
    replace(
      meta,
      h(
        "p",
        {},
        statusBadge(job.status),
        ` ${job.method}`,
        job.stop_reason ? ` · stop reason ${job.stop_reason}` : "",
        ` · attempts ${job.attempts} · created ${fmtTime(job.created_at)}`,
        job.finished_at ? ` · finished ${fmtTime(job.finished_at)}` : "",
      ),
      h("p", { class: "muted small mono" }, job.id),
      job.error ? h("p", { class: "error-box" }, job.error) : null,
    );
    if (terminal) {
      cancelButton.disabled = true;
      cancelButton.textContent = "Cancel job";
    }
    renderProgress();
    renderBudget();
    replace(
      promptsSlot,
      promptCard("Initial prompt", "initial-title", job.initial),
      promptCard("Best prompt", "best-title", job.best),
    );
  }

  // The phase while running (initial scoring, a step, test scoring) with its answers, else the steps saved.
  function renderProgress() {
    const progress = state.job.progress;
    let text = `step ${progress.step} of ${progress.total_steps}`;
    if (state.job.status === "running") {
      const what = {
        initial: "scoring the initial prompt",
        search: `step ${progress.phase_step} of ${progress.total_steps}`,
        test: "scoring on test",
      }[progress.phase];
      if (what) text = what;
      if (progress.phase_total) {
        const approx = progress.phase === "search" ? "~" : "";
        text += ` · ${progress.phase_done} of ${approx}${progress.phase_total} answers`;
      }
    }
    replace(
      progressSlot,
      progressBar(progress.fraction, "job progress"),
      h("span", { class: "muted small", id: "phase-text" }, text),
    );
  }

  function renderBudget() {
    const job = state.job;
    const caps = job.spec?.budget || {};
    const used = {
      calls: job.usage.llm_calls,
      tokens: job.usage.prompt_tokens + job.usage.completion_tokens,
      seconds: elapsedSeconds(job),
      cost: job.usage.cost,
    };
    const fmtCost = (value) => fmtNumber(value, 4);
    const rows = [
      ["calls", "LLM calls", caps.max_llm_calls, fmtInt],
      ["tokens", "Tokens", caps.max_tokens, fmtInt],
      ["seconds", "Seconds (wall clock)", caps.max_seconds, fmtSeconds],
      // Money, where the backends have prices (the server reports 0 otherwise) or the job has a cap on it.
      ...(used.cost > 0 || caps.max_cost ? [["cost", "Cost", caps.max_cost, fmtCost]] : []),
    ].map(([name, label, cap, fmt]) => {
      const value = used[name];
      const capped = typeof cap === "number" && cap > 0;
      return h(
        "div",
        { class: "budget-row", "data-budget": name },
        h("span", { class: "budget-label" }, label),
        capped ? progressBar(value / cap, `${label} used of the cap`) : h("span", { class: "bar bar-empty" }),
        h(
          "span",
          { class: "small" },
          capped
            ? `${fmt(value)} of ${fmt(cap)} · ${fmt(Math.max(0, cap - value))} left`
            : `${fmt(value)} (no cap)`,
        ),
      );
    });
    const chart = burnDownPlot(
      state.stepEvents,
      { calls: caps.max_llm_calls, tokens: caps.max_tokens, seconds: caps.max_seconds, cost: caps.max_cost },
      job.started_at,
      fitWidth(budgetSlot, 480),
    );
    replace(
      budgetSlot,
      rows,
      h("p", { class: "muted small" }, `${fmtInt(job.usage.cache_hits)} cache hits (free).`),
      chart,
    );
  }

  // Replaying a long stream sends hundreds of step events at once: redraw the budget once for the burst.
  let budgetTimer = null;
  function renderBudgetSoon() {
    if (budgetTimer === null) {
      budgetTimer = setTimeout(() => {
        budgetTimer = null;
        if (!signal.aborted) renderBudget();
      }, 100);
    }
  }

  function renderCandidates() {
    const candidates = [...state.candidates.values()].sort((a, b) => a.id - b.id);
    replace(scoreSlot, scorePlot(candidates, fitWidth(scoreSlot)));
    table.update(candidates, promptText(state.job.initial?.prompt ?? state.job.spec?.initial_prompt));
    if (SOFT_PROMPT_METHODS.has(state.job.method)) {
      softSection.hidden = false; // shown before drawing, so the plot can take its width
      const artifactUrl = `${base}/artifact`;
      const link = h("a", { href: artifactUrl, id: "artifact-link" }, "Download the best soft prompt's artifact (JSON)");
      link.addEventListener("click", (event) => {
        event.preventDefault();
        run(() => download(artifactUrl, `artifact-${jobId}.json`, signal), errorSlot);
      });
      const plot = lossPlot(candidates, state.job.method === "bbtv2", fitWidth(softSlot));
      replace(softSlot, plot, h("p", {}, link));
    }
  }

  // One refresh at a time; events arriving meanwhile ask for one more, not one each.
  let refreshing = false;
  let again = false;
  let fullAgain = false;
  function scheduleRefresh(full = false) {
    fullAgain ||= full;
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    run(async () => {
      try {
        do {
          again = false;
          const full = fullAgain;
          fullAgain = false;
          await loadJob(); // the job first, so the candidates read next cover its step
          await loadCandidates(full);
          if (signal.aborted) return;
          renderJob();
          renderCandidates();
        } while (again);
      } finally {
        refreshing = false;
      }
    }, errorSlot);
  }

  function addLogEntry(event, data) {
    const box = log.parentElement;
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    log.append(
      h(
        "li",
        { "data-event": event },
        h("time", { datetime: data.created_at || "" }, fmtTime(data.created_at)),
        " ",
        h("span", { class: `badge event-${event}` }, event),
        " ",
        eventSummary(event, data),
      ),
    );
    while (log.childElementCount > LOG_LIMIT) log.firstElementChild.remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function onEvent({ event, data: text }) {
    let data = {};
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text };
    }
    if (event === "progress") {
      // Not logged: it comes every second while the job runs.
      if (state.job && state.job.status === "running") {
        state.job.progress = data;
        renderProgress();
      }
      return;
    }
    addLogEntry(event, data);
    if (event === "step") {
      state.stepEvents.push(data);
      if (data.step > knownStep()) scheduleRefresh();
      else renderBudgetSoon(); // a replayed step (already loaded): only the burn-down gains a point
    } else if (event === "state") {
      scheduleRefresh(TERMINAL.has(data.status));
    } else if (event === "cancel_requested") {
      scheduleRefresh();
    }
  }

  // Reads the stream, resuming with Last-Event-ID after a drop, until the job has ended.
  async function follow() {
    let lastEventId = null;
    let failures = 0;
    while (!signal.aborted) {
      try {
        streamStatus.textContent = "live";
        lastEventId = await readEventStream(`${base}/events`, { lastEventId, signal, onEvent });
        failures = 0;
        // The server ends the stream once the job has ended; anything else was a dropped connection.
        await loadJob();
        if (TERMINAL.has(state.job.status)) {
          streamStatus.textContent = "job ended; stream closed";
          return;
        }
      } catch (error) {
        if (isQuiet(error) || signal.aborted) return;
        if (error instanceof ApiError && error.status === 404) throw error;
        failures += 1;
        streamStatus.textContent = `connection lost; reconnecting (try ${failures})`;
      }
      await sleep(Math.min(15000, 500 * 2 ** failures), signal);
    }
  }

  await loadJob();
  await loadCandidates();
  renderJob();
  renderCandidates();
  // Keeps the wall-clock budget moving between events while the job runs.
  const ticker = setInterval(() => {
    if (state.job && state.job.status === "running") renderBudget();
  }, 5000);
  signal.addEventListener("abort", () => clearInterval(ticker));
  follow().catch((error) => {
    if (!isQuiet(error)) errorSlot.append(errorBox(error));
  });
}
