// The shell: hash routes, the API key form, and one view at a time in <main>.

import { apiKey, onUnauthorized, setApiKey } from "./api.js";
import { datasetsView } from "./datasets.js";
import { errorBox, h, isQuiet, replace } from "./dom.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { studiesView, studyView } from "./studies.js";
import { submitView } from "./submit.js";

const main = document.getElementById("main");

const ROUTES = [
  { pattern: /^\/(?:jobs\/?)?$/, nav: "jobs", title: "Jobs", view: jobsView },
  { pattern: /^\/jobs\/([^/]+)$/, nav: "jobs", title: "Job", view: jobView },
  { pattern: /^\/datasets\/?$/, nav: "datasets", title: "Datasets", view: datasetsView },
  { pattern: /^\/studies\/?$/, nav: "studies", title: "Studies", view: studiesView },
  { pattern: /^\/studies\/([^/]+)$/, nav: "studies", title: "Study", view: studyView },
  { pattern: /^\/submit\/?$/, nav: "submit", title: "Submit a job", view: submitView },
];

// The running view: its AbortController stops its requests, timers and event stream on navigation.
let current = null;

function stopCurrent() {
  if (current) current.abort();
  current = null;
}

function markNav(name) {
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function route() {
  const hash = location.hash || "#/jobs";
  if (!hash.startsWith("#/")) return; // an in-page anchor such as the skip link, not a route
  const path = decodeURIComponent(hash.slice(1).split("?")[0]);
  const match = ROUTES.map((r) => ({ r, m: r.pattern.exec(path) })).find(({ m }) => m);
  stopCurrent();
  const controller = new AbortController();
  current = controller;
  replace(main);
  if (!match) {
    markNav(null);
    document.title = "Not found · promptopt";
    replace(main, h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", { href: "#/jobs" }, "Go to jobs")));
    return;
  }
  markNav(match.r.nav);
  document.title = `${match.r.title} · promptopt`;
  try {
    await match.r.view(main, { params: match.m.slice(1), signal: controller.signal });
  } catch (error) {
    if (isQuiet(error) || controller.signal.aborted) return;
    main.append(errorBox(error));
  }
}

// The key form replaces the page's content, so nothing the server refused is left on screen.
function showKeyForm(rejected) {
  stopCurrent();
  markNav(null);
  document.title = "API key · promptopt";
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    required: true,
    "aria-describedby": "api-key-help",
  });
  const form = h(
    "form",
    {
      class: "card key-form",
      id: "key-form",
      onsubmit: (event) => {
        event.preventDefault();
        setApiKey(input.value.trim());
        route();
      },
    },
    h("h1", {}, "API key"),
    rejected
      ? h("p", { class: "error-box", role: "alert" }, "The server refused this key. Enter another one.")
      : h("p", {}, "This server needs an API key for its data."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "p",
      { id: "api-key-help", class: "hint" },
      "Kept in this browser tab only (sessionStorage) and sent as Authorization: Bearer with each request.",
    ),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit" }, "Use key"),
      apiKey()
        ? h(
            "button",
            {
              type: "button",
              class: "secondary",
              onclick: () => {
                setApiKey("");
                route();
              },
            },
            "Forget key",
          )
        : null,
    ),
  );
  replace(main, form);
  input.focus();
}

onUnauthorized((hadKey) => {
  if (document.getElementById("key-form")) return; // already asked (several calls failed at once)
  if (hadKey) setApiKey("");
  showKeyForm(hadKey);
});

document.getElementById("key-button").addEventListener("click", () => showKeyForm(false));
document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault(); // keep the route in the hash
  main.focus();
});
window.addEventListener("hashchange", route);
if (!location.hash) history.replaceState(null, "", "#/jobs");
route();
