// #/jobs: every job, newest first, with filters; polled so new jobs and progress appear without a reload.

import { get, withQuery } from "./api.js";
import {
  errorBox,
  fmtInt,
  fmtScore,
  fmtTime,
  h,
  isQuiet,
  progressBar,
  replace,
  shortId,
  statusBadge,
  tableWrap,
} from "./dom.js";

export const JOB_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const POLL_MS = 3000;
const PAGE_SIZE = 50;

function jobRow(job) {
  const tokens = job.usage.prompt_tokens + job.usage.completion_tokens;
  const { step, total_steps: total, fraction } = job.progress;
  return h(
    "tr",
    { "data-job-id": job.id },
    h("th", { scope: "row" }, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, shortId(job.id))),
    h("td", {}, job.method),
    h(
      "td",
      {},
      statusBadge(job.status),
      job.stop_reason && job.stop_reason !== "completed" ? h("span", { class: "muted" }, ` ${job.stop_reason}`) : null,
    ),
    h(
      "td",
      { class: "progress-cell" },
      progressBar(fraction, `job ${shortId(job.id)} progress`),
      h("span", { class: "muted small" }, `${step}/${total}`),
    ),
    h("td", { class: "num" }, fmtScore(job.best?.test_score)),
    h("td", { class: "num" }, fmtInt(job.usage.llm_calls)),
    h("td", { class: "num" }, fmtInt(tokens)),
    h("td", {}, fmtTime(job.created_at)),
  );
}

export async function jobsView(main, { signal }) {
  const filters = { status: "", method: "" };
  let pages = 1;
  let timer = null;

  const statusSelect = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any"),
    JOB_STATUSES.map((s) => h("option", { value: s }, s)),
  );
  const methodSelect = h("select", { id: "filter-method", name: "method" }, h("option", { value: "" }, "any"));
  const tbody = h("tbody");
  const errorSlot = h("div");
  const olderButton = h("button", { type: "button", class: "secondary", hidden: true }, "Load older jobs");
  const table = h(
    "table",
    { class: "data", id: "jobs-table" },
    h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Job", "Method", "Status", "Progress", "Best test", "LLM calls", "Tokens", "Created"].map((label) =>
          h("th", { scope: "col" }, label),
        ),
      ),
    ),
    tbody,
  );

  replace(
    main,
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"), h("a", { href: "#/submit", class: "button" }, "Submit a job")),
    h(
      "form",
      { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => e.preventDefault() },
      h("div", { class: "field" }, h("label", { for: "filter-status" }, "Status"), statusSelect),
      h("div", { class: "field" }, h("label", { for: "filter-method" }, "Method"), methodSelect),
    ),
    errorSlot,
    tableWrap(table, "Jobs"),
    olderButton,
  );

  async function load() {
    const jobs = [];
    let cursor = null;
    for (let page = 0; page < pages; page++) {
      const url = withQuery("/v1/jobs", { status: filters.status, method: filters.method, limit: PAGE_SIZE, cursor });
      const data = await get(url, { signal });
      jobs.push(...data.items);
      cursor = data.next_cursor;
      if (!cursor) break;
    }
    if (signal.aborted) return;
    replace(
      tbody,
      jobs.length ? jobs.map(jobRow) : h("tr", {}, h("td", { colspan: "8", class: "muted" }, "No jobs yet.")),
    );
    olderButton.hidden = !cursor;
    replace(errorSlot);
  }

  // setTimeout after each load (not setInterval), so a slow answer never stacks requests.
  async function poll() {
    clearTimeout(timer);
    try {
      await load();
    } catch (error) {
      if (isQuiet(error)) return;
      replace(errorSlot, errorBox(error));
    }
    if (!signal.aborted) timer = setTimeout(poll, POLL_MS);
  }
  signal.addEventListener("abort", () => clearTimeout(timer));

  const onFilter = () => {
    filters.status = statusSelect.value;
    filters.method = methodSelect.value;
    pages = 1;
    poll();
  };
  statusSelect.addEventListener("change", onFilter);
  methodSelect.addEventListener("change", onFilter);
  olderButton.addEventListener("click", () => {
    pages += 1;
    poll();
  });

  const [methods] = await Promise.all([get("/v1/methods", { signal }), poll()]);
  methodSelect.append(...methods.map((m) => h("option", { value: m.name }, m.name)));
}
