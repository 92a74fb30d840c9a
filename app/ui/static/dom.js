// Small DOM and formatting helpers. Text always goes in as text nodes, so prompts never become markup.

import { ApiError, AuthRequired } from "./api.js";

const PROPERTIES = new Set(["value", "checked", "selected", "disabled", "hidden"]);

// h("button", {class: "x", onclick: fn, "aria-label": "..."}, "text", child, [more]) -> element
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      element.className = value;
    } else if (PROPERTIES.has(name)) {
      element[name] = value;
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

export function fmtScore(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : "–";
}

export function fmtInt(value) {
  return typeof value === "number" ? Math.round(value).toLocaleString("en-US") : "–";
}

export function fmtNumber(value, digits = 1) {
  return typeof value === "number" && Number.isFinite(value)
    ? value.toLocaleString("en-US", { maximumFractionDigits: digits })
    : "–";
}

export function fmtSeconds(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  if (seconds < 90) return `${seconds.toFixed(0)} s`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
}

export function shortId(id) {
  return String(id).slice(0, 8);
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function promptText(prompt) {
  if (prompt === null || prompt === undefined) return "";
  return typeof prompt === "string" ? prompt : JSON.stringify(prompt, null, 2);
}

// An error box for a failed call; a 401 has already brought up the key form.
export function errorBox(error) {
  const message = error instanceof ApiError ? `${error.status}: ${error.message}` : String(error?.message || error);
  return h("p", { class: "error-box", role: "alert" }, message);
}

export function isQuiet(error) {
  return error instanceof AuthRequired || error?.name === "AbortError";
}

// Runs an async task from an event handler or timer: aborted and unauthorized calls end quietly, anything else is
// shown in `where` (when given) instead of surfacing as an unhandled rejection.
export function run(task, where) {
  Promise.resolve()
    .then(task)
    .catch((error) => {
      if (isQuiet(error)) return;
      if (where) replace(where, errorBox(error));
    });
}

// Copies text; falls back to a selected textarea where the Clipboard API is unavailable or refused.
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = h("textarea", { class: "offscreen", "aria-hidden": "true", tabindex: "-1" });
    area.value = text;
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}

// A table inside a scroll container (wide tables scroll on their own on a phone).
export function tableWrap(table, label) {
  return h("div", { class: "table-wrap", role: "region", "aria-label": label, tabindex: "0" }, table);
}

// A plain data table: a hidden caption for screen readers, column headers, the given rows.
export function dataTable(id, label, columns, rows) {
  return tableWrap(
    h(
      "table",
      { class: "data", id },
      h("caption", { class: "visually-hidden" }, label),
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows),
    ),
    label,
  );
}

export function progressBar(fraction, label) {
  const percent = Math.max(0, Math.min(100, (fraction || 0) * 100));
  return h(
    "div",
    {
      class: "bar",
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": percent.toFixed(0),
      "aria-label": label,
    },
    h("span", { class: "bar-fill", style: `width: ${percent.toFixed(1)}%` }),
  );
}
