// #/studies and #/studies/<id>: the list; a study's leaderboard with interval bars, score vs cost, paired comparisons.

import { get, post, withQuery } from "./api.js";
import {
  errorBox,
  fmtInt,
  fmtNumber,
  fmtScore,
  fmtSeconds,
  fmtTime,
  h,
  isQuiet,
  replace,
  run,
  shortId,
  statusBadge,
  dataTable,
} from "./dom.js";
import { chart, extent, fitWidth, legend, point, s, seriesColor } from "./plot.js";

const POLL_MS = 3000;
const ENDED = new Set(["completed", "cancelled"]);

function runsByStatus(jobs) {
  return (
    Object.entries(jobs || {})
      .filter(([, n]) => n > 0)
      .map(([status, n]) => `${n} ${status}`)
      .join(", ") || "no runs"
  );
}

// Polls `load` until `done()` or navigation; errors are shown in `where` and polling goes on. `delayed`: the first
// load waits one interval too (the caller has just loaded).
function poll(load, done, where, signal, { delayed = false } = {}) {
  let timer = null;
  signal.addEventListener("abort", () => clearTimeout(timer));
  const tick = async () => {
    try {
      await load();
      replace(where);
    } catch (error) {
      if (isQuiet(error)) return;
      replace(where, errorBox(error));
    }
    if (!signal.aborted && !done()) timer = setTimeout(tick, POLL_MS);
  };
  if (!delayed) return tick();
  timer = setTimeout(tick, POLL_MS);
  return Promise.resolve();
}

export async function studiesView(main, { signal }) {
  const slot = h("div");
  const errorSlot = h("div");
  replace(main, h("h1", {}, "Studies"), errorSlot, slot);
  const load = async () => {
    const page = await get(withQuery("/v1/studies", { limit: 100 }), { signal });
    if (signal.aborted) return;
    replace(
      slot,
      page.items.length
        ? dataTable(
            "studies-table",
            "Studies, newest first",
            ["Study", "Status", "Runs", "Arms", "Created"],
            page.items.map((study) =>
              h(
                "tr",
                { "data-study-id": study.id },
                h("th", { scope: "row" }, h("a", { href: `#/studies/${study.id}` }, study.name || shortId(study.id))),
                h("td", {}, statusBadge(study.status)),
                h("td", { class: "small" }, runsByStatus(study.jobs)),
                h("td", { class: "small" }, (study.spec?.arms || []).map((a) => a.name || a.method).join(", ")),
                h("td", {}, fmtTime(study.created_at)),
              ),
            ),
          )
        : h("p", { class: "muted" }, "No studies yet. Create one with POST /v1/studies or `promptopt study create`."),
    );
  };
  await poll(load, () => false, errorSlot, signal);
}

// A row's interval as a bar on the scale shared by every row.
function intervalBar(arm, scale) {
  const width = 160;
  const height = 18;
  const x = (v) => 4 + ((v - scale[0]) / (scale[1] - scale[0] || 1)) * (width - 8);
  const interval = arm.test_interval;
  const label = interval
    ? `${fmtScore(interval.low)} to ${fmtScore(interval.high)}`
    : typeof arm.test_mean === "number"
      ? "no interval"
      : "no test score yet";
  const svg = s("svg", { class: "interval", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
  svg.append(s("line", { class: "interval-track", x1: 4, x2: width - 4, y1: height / 2, y2: height / 2 }));
  if (interval) {
    svg.append(
      s("line", { class: "interval-range", x1: x(interval.low), x2: x(interval.high), y1: height / 2, y2: height / 2 }),
    );
  }
  if (typeof arm.test_mean === "number") svg.append(s("circle", { class: "interval-mean", cx: x(arm.test_mean), cy: height / 2, r: 4 }));
  return h("span", { class: "interval-cell" }, svg, h("span", { class: "small" }, interval ? label : ""));
}

function leaderboard(arms) {
  const bounds = arms.flatMap((a) => [a.test_mean, a.test_interval?.low, a.test_interval?.high]);
  const scale = extent(bounds, { pad: 0.05 });
  return dataTable(
    "leaderboard",
    "Leaderboard, best test mean first",
    ["#", "Arm", "Method", "Runs", "Test mean", "SD", "95% interval", "LLM calls", "Tokens", "Seconds"],
    arms.map((arm, index) =>
      h(
        "tr",
        { "data-arm": arm.arm },
        h("td", { class: "num" }, index + 1),
        h("th", { scope: "row" }, arm.arm, arm.baseline ? h("span", { class: "badge" }, "baseline") : null),
        h("td", {}, arm.method),
        h("td", { class: "num" }, `${arm.finished}/${arm.runs}`),
        h("td", { class: "num" }, fmtScore(arm.test_mean)),
        h("td", { class: "num" }, fmtScore(arm.test_sd)),
        h("td", {}, intervalBar(arm, scale)),
        h("td", { class: "num" }, fmtNumber(arm.mean_llm_calls, 0)),
        h("td", { class: "num" }, fmtNumber(arm.mean_tokens, 0)),
        h("td", { class: "num" }, fmtSeconds(arm.mean_seconds)),
      ),
    ),
  );
}

// Each arm at (mean LLM calls, test mean), with its interval as a whisker.
function costScatter(arms, width) {
  const placed = arms.filter((a) => typeof a.test_mean === "number" && typeof a.mean_llm_calls === "number");
  if (!placed.length) return h("p", { class: "muted" }, "No arm has a test score yet.");
  const ys = placed.flatMap((a) => [a.test_mean, a.test_interval?.low, a.test_interval?.high]);
  const parts = chart({
    width,
    title: "Test score against cost, per arm",
    description: `${placed.length} arms: mean LLM calls per run against the test mean, with 95% intervals.`,
    x: { domain: extent(placed.map((a) => a.mean_llm_calls), { pad: 0.15, floor: 0 }), label: "mean LLM calls per run" },
    y: { domain: extent(ys, { pad: 0.1 }), label: "test mean" },
  });
  placed.forEach((arm, index) => {
    const color = seriesColor(index);
    const cx = parts.sx(arm.mean_llm_calls);
    if (arm.test_interval) {
      parts.plot.append(
        s("line", {
          class: "whisker",
          x1: cx,
          x2: cx,
          y1: parts.sy(arm.test_interval.low),
          y2: parts.sy(arm.test_interval.high),
          stroke: color,
        }),
      );
    }
    parts.plot.append(
      point(cx, parts.sy(arm.test_mean), {
        size: 5,
        shape: arm.baseline ? "square" : "circle",
        cls: "pt pt-arm",
        tip: `${arm.arm}: test ${fmtScore(arm.test_mean)} at ${fmtNumber(arm.mean_llm_calls, 0)} calls`,
        attrs: { fill: color, "data-arm": arm.arm },
      }),
    );
  });
  return h(
    "div",
    {},
    parts.svg,
    legend(
      placed.map((arm, index) => ({
        label: arm.baseline ? `${arm.arm} (baseline)` : arm.arm,
        cls: "pt pt-arm",
        shape: arm.baseline ? "square" : "circle",
        color: seriesColor(index),
      })),
    ),
  );
}

function comparisons(arms) {
  const rows = arms.flatMap((arm) =>
    arm.comparisons.map((c) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, arm.arm),
        h("td", {}, c.against),
        h("td", { class: "num" }, fmtInt(c.n)),
        h("td", { class: "num" }, (c.difference >= 0 ? "+" : "") + c.difference.toFixed(3)),
        h("td", { class: "num" }, `${c.interval.low.toFixed(3)} to ${c.interval.high.toFixed(3)}`),
        h("td", { class: "num" }, c.p_value < 0.001 ? c.p_value.toExponential(1) : c.p_value.toFixed(3)),
        h("td", { class: "small" }, c.test),
        h("td", {}, c.significant ? h("strong", {}, "yes") : "no"),
        h("td", { class: "num" }, `${c.wins}/${c.losses}/${c.ties}`),
      ),
    ),
  );
  if (!rows.length) return h("p", { class: "muted" }, "No finished pairs to compare yet.");
  return dataTable(
    "comparisons",
    "Paired comparisons",
    ["Arm", "Against", "Pairs", "Difference", "95% interval", "p", "Test", "Significant (p < 0.05)", "W/L/T"],
    rows,
  );
}

export async function studyView(main, { params: [studyId], signal }) {
  const base = `/v1/studies/${encodeURIComponent(studyId)}`;
  let study = null;
  const title = h("h1", {}, `Study ${shortId(studyId)}`);
  const meta = h("div");
  const errorSlot = h("div");
  const cancelButton = h("button", { type: "button", class: "danger" }, "Cancel study");
  const boardSlot = h("div");
  const scatterSlot = h("div");
  const comparisonSlot = h("div");
  const runsSlot = h("div");
  const card = (heading, id, slot) =>
    h("section", { class: "card", "aria-labelledby": id }, h("h2", { id }, heading), slot);
  replace(
    main,
    h("div", { class: "page-head" }, title, cancelButton),
    meta,
    errorSlot,
    card("Leaderboard", "board-title", boardSlot),
    h(
      "div",
      { class: "two-col" },
      card("Score against cost", "scatter-title", scatterSlot),
      card("Runs", "runs-title", runsSlot),
    ),
    card("Paired comparisons", "comparisons-title", comparisonSlot),
  );
  cancelButton.addEventListener("click", () =>
    run(async () => {
      cancelButton.disabled = true;
      await post(`${base}/cancel`, undefined, { signal });
      await load();
    }, errorSlot),
  );

  async function load() {
    study = await get(base, { signal });
    if (signal.aborted) return;
    title.textContent = `Study ${study.name || shortId(study.id)}`;
    cancelButton.disabled = ENDED.has(study.status);
    replace(
      meta,
      h("p", {}, statusBadge(study.status), ` ${runsByStatus(study.jobs)} · created ${fmtTime(study.created_at)}`),
      h("p", { class: "muted small mono" }, study.id),
    );
    const arms = study.leaderboard || [];
    replace(boardSlot, arms.length ? leaderboard(arms) : h("p", { class: "muted" }, "No arms."));
    replace(scatterSlot, costScatter(arms, fitWidth(scatterSlot, 560)));
    replace(comparisonSlot, comparisons(arms));
    replace(
      runsSlot,
      dataTable(
        "runs",
        "Runs",
        ["Job", "Arm", "Seed", "Status", "Test", "Initial test"],
        (study.runs || []).map((r) =>
          h(
            "tr",
            { "data-job-id": r.job_id },
            h("th", { scope: "row" }, h("a", { href: `#/jobs/${r.job_id}`, class: "mono" }, shortId(r.job_id))),
            h("td", {}, r.arm),
            h("td", { class: "num" }, r.seed),
            h("td", {}, statusBadge(r.status)),
            h("td", { class: "num" }, fmtScore(r.test_score)),
            h("td", { class: "num" }, fmtScore(r.initial_test_score)),
          ),
        ),
      ),
    );
  }

  // The first load's errors (a 404) go to the router; later ones are shown while polling goes on.
  await load();
  if (!ENDED.has(study.status)) poll(load, () => ENDED.has(study.status), errorSlot, signal, { delayed: true });
}
