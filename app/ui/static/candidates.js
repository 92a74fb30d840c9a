// A job's candidate table: sortable (header buttons), searchable, each row's parent and a word diff of its prompt.

import { renderDiff } from "./diff.js";
import { fmtScore, h, replace, tableWrap } from "./dom.js";

const ROW_LIMIT = 200; // rows drawn before "Show all" (a soft-prompt job can have thousands)
// Long or bulky details stay out of the summary column (they are in the row's expanded view).
const SUMMARY_SKIP = new Set([
  "origin", "parent", "parent_id", "raw", "exemplars", "gradient", "instruction", "demonstrations", "nearest", "pool",
]);

const COLUMNS = [
  { key: "id", label: "#", numeric: true },
  { key: "step", label: "Step", numeric: true },
  { key: "score", label: "Train", numeric: true, descFirst: true },
  { key: "dev_score", label: "Dev", numeric: true, descFirst: true },
  { key: "test_score", label: "Test", numeric: true, descFirst: true },
  { key: "origin", label: "Origin" },
  { key: "parent", label: "Parent", numeric: true },
  { key: "details", label: "Details", sortable: false },
  { key: "prompt", label: "Prompt (diff against parent, else the initial prompt)", sortable: false },
];

// Each candidate's parent candidate, where its details name one: `parent_id` (a candidate id), `parent` as text (the
// parent prompt), or `parent` as an index into its step's parents (APO: the beam, listed first in the step with
// origin "beam").
export function resolveParents(candidates) {
  const byId = new Map(candidates.map((c) => [c.id, c]));
  const beamByStep = new Map();
  for (const c of candidates) {
    if (c.details?.origin !== "beam") continue;
    if (!beamByStep.has(c.step)) beamByStep.set(c.step, []);
    beamByStep.get(c.step).push(c);
  }
  const parents = new Map();
  for (const c of candidates) {
    const details = c.details || {};
    let parent = null;
    if (Number.isInteger(details.parent_id)) parent = byId.get(details.parent_id) || null;
    else if (typeof details.parent === "string") {
      parent = candidates.find((other) => other.id < c.id && other.prompt === details.parent) || null;
    } else if (Number.isInteger(details.parent)) parent = beamByStep.get(c.step)?.[details.parent] || null;
    if (parent && parent.id !== c.id) parents.set(c.id, parent);
  }
  return parents;
}

// A prompt with demonstrations (fewshot, or a method carrying a set) is shown as its structure: the instruction,
// which is what the method edits and what the diff compares, and what it shows before each input.
function instructionOf(c) {
  return typeof c?.details?.instruction === "string" ? c.details.instruction : null;
}

export function demonstrationNote(details) {
  if (Number.isInteger(details?.nearest)) {
    return `${details.nearest} nearest train examples per input (of ${details.pool ?? "?"})`;
  }
  const positions = details?.demonstrations;
  if (!Array.isArray(positions)) return null;
  if (positions.length === 0) return "no demonstrations";
  const shown = positions.slice(0, 8).map((p) => `#${p}`).join(", ");
  const more = positions.length > 8 ? `, … ${positions.length - 8} more` : "";
  return `${positions.length} demonstration${positions.length === 1 ? "" : "s"} (train ${shown}${more})`;
}

function summary(details) {
  const parts = [];
  for (const [key, value] of Object.entries(details || {})) {
    if (SUMMARY_SKIP.has(key) || parts.length >= 5) continue;
    if (typeof value === "number" || typeof value === "boolean") parts.push(`${key}=${value}`);
    else if (typeof value === "string" && value.length <= 24) parts.push(`${key}=${value}`);
    else if (Array.isArray(value) && value.every((v) => typeof v === "string") && value.join(",").length <= 40) {
      parts.push(`${key}=${value.join(",") || "–"}`);
    }
  }
  return parts.join(" · ");
}

export class CandidateTable {
  constructor() {
    this.sort = { key: "id", dir: "asc" };
    this.query = "";
    this.showAll = false;
    this.open = new Set(); // candidate ids whose prompt row is expanded (kept across re-renders)
    this.candidates = [];
    this.initialPrompt = "";
    this.headers = new Map();
    this.tbody = h("tbody");
    this.count = h("p", { class: "muted small", "aria-live": "polite", id: "candidate-count" });
    this.more = h("button", { type: "button", class: "secondary", hidden: true }, "Show all rows");
    this.more.addEventListener("click", () => {
      this.showAll = true;
      this.renderBody();
    });
    const search = h("input", {
      id: "candidate-search",
      type: "search",
      placeholder: "words in the prompt or details",
      autocomplete: "off",
    });
    search.addEventListener("input", () => {
      this.query = search.value.trim().toLowerCase();
      this.renderBody();
    });
    const headRow = h(
      "tr",
      {},
      COLUMNS.map((column) => {
        const th = h("th", { scope: "col", "data-key": column.key });
        if (column.sortable === false) return append(th, column.label);
        const button = h(
          "button",
          { type: "button", class: "sort", onclick: () => this.sortBy(column) },
          column.label,
          h("span", { class: "sort-mark", "aria-hidden": "true" }),
        );
        th.append(button);
        this.headers.set(column.key, th);
        return th;
      }),
    );
    this.table = h(
      "table",
      { class: "data candidates", id: "candidate-table" },
      h("caption", { class: "visually-hidden" }, "Candidates; column headers sort"),
      h("thead", {}, headRow),
      this.tbody,
    );
    this.element = h(
      "div",
      {},
      h(
        "div",
        { class: "field inline" },
        h("label", { for: "candidate-search" }, "Search candidates"),
        search,
      ),
      this.count,
      tableWrap(this.table, "Candidates"),
      this.more,
    );
    this.markSort();
  }

  sortBy(column) {
    if (this.sort.key === column.key) this.sort.dir = this.sort.dir === "asc" ? "desc" : "asc";
    else this.sort = { key: column.key, dir: column.descFirst ? "desc" : "asc" };
    this.markSort();
    this.renderBody();
  }

  markSort() {
    for (const [key, th] of this.headers) {
      const mark = th.querySelector(".sort-mark");
      if (key === this.sort.key) {
        th.setAttribute("aria-sort", this.sort.dir === "asc" ? "ascending" : "descending");
        mark.textContent = this.sort.dir === "asc" ? " ▲" : " ▼";
      } else {
        th.removeAttribute("aria-sort");
        mark.textContent = "";
      }
    }
  }

  update(candidates, initialPrompt) {
    this.candidates = candidates;
    this.initialPrompt = initialPrompt || "";
    this.renderBody();
  }

  sortValue(c, key) {
    if (key === "origin") return c.details?.origin ?? null;
    if (key === "parent") return this.parents.get(c.id)?.id ?? null;
    return c[key] ?? null;
  }

  renderBody() {
    this.parents = resolveParents(this.candidates);
    const { key, dir } = this.sort;
    const sign = dir === "asc" ? 1 : -1;
    let rows = this.candidates;
    if (this.query) {
      rows = rows.filter((c) =>
        `${c.prompt} ${JSON.stringify(c.details || {})}`.toLowerCase().includes(this.query),
      );
    }
    rows = [...rows].sort((a, b) => {
      const va = this.sortValue(a, key);
      const vb = this.sortValue(b, key);
      if (va === vb) return a.id - b.id;
      if (va === null) return 1; // missing values last, either direction
      if (vb === null) return -1;
      return (va < vb ? -1 : 1) * sign;
    });
    const shown = this.showAll ? rows : rows.slice(0, ROW_LIMIT);
    replace(this.tbody, shown.map((c) => this.row(c)));
    this.more.hidden = shown.length === rows.length;
    const label = COLUMNS.find((c) => c.key === key).label;
    this.count.textContent =
      `${shown.length} of ${rows.length} candidates shown` +
      (rows.length !== this.candidates.length ? ` (${this.candidates.length} in all)` : "") +
      `, sorted by ${label.toLowerCase()} ${dir === "asc" ? "ascending" : "descending"}.`;
  }

  row(c) {
    const parent = this.parents.get(c.id);
    const details = c.details || {};
    const unresolved = details.parent !== undefined && !parent ? `${details.parent}` : "–";
    const instruction = instructionOf(c);
    const note = instruction === null ? null : demonstrationNote(details);
    const shown = instruction ?? c.prompt;
    const base = parent ? (instructionOf(parent) ?? parent.prompt) : this.initialPrompt;
    const baseLabel = parent ? `parent #${parent.id}` : "the initial prompt";
    const what = instruction === null ? "" : " (the instruction)";
    const expanded = h(
      "details",
      { open: this.open.has(c.id) },
      h(
        "summary",
        {},
        h("span", { class: "prompt-line" }, shown),
        note ? h("span", { class: "demo-note muted small" }, ` + ${note}`) : null,
      ),
      details.origin === "initial" || shown === base
        ? h("p", { class: "muted small" }, `Same as ${baseLabel}${what}.`)
        : [h("p", { class: "muted small" }, `Diff against ${baseLabel}${what}:`), renderDiff(base, shown)],
      instruction === null || c.prompt === instruction
        ? null
        : [
            h("p", { class: "muted small" }, "The prompt as scored, demonstrations included:"),
            h("pre", { class: "scored-prompt" }, c.prompt),
          ],
      h("pre", { class: "details-json" }, JSON.stringify(details, null, 2)),
    );
    expanded.addEventListener("toggle", () => {
      if (expanded.open) this.open.add(c.id);
      else this.open.delete(c.id);
    });
    const num = (value) => h("td", { class: "num", "data-value": value ?? "" }, fmtScore(value));
    return h(
      "tr",
      { "data-candidate-id": c.id },
      h("td", { class: "num", "data-value": c.id }, c.id),
      h("td", { class: "num", "data-value": c.step }, c.step),
      num(c.score),
      num(c.dev_score),
      num(c.test_score),
      h("td", {}, details.origin ?? "–"),
      h("td", { class: "num" }, parent ? `#${parent.id}` : unresolved),
      h("td", { class: "small" }, summary(details)),
      h("td", { class: "prompt-cell" }, expanded),
    );
  }
}

function append(element, text) {
  element.append(text);
  return element;
}
