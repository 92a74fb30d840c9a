// #/submit: a job form built from /v1/methods (each parameter from its JSON Schema); a 422's errors are shown next to
// the fields their `loc` names. Only fields the user changed are sent, so the server's defaults apply to the rest.

import { ApiError, get, post, withQuery } from "./api.js";
import { errorBox, h, isQuiet, replace } from "./dom.js";

const METRICS = ["exact_match", "contains", "label_accuracy", "numeric", "f1", "answer_match"];
const DEFAULT_DATASET = "builtin:snli16";

const idFor = (loc) => `f-${loc.replace(/[^a-zA-Z0-9_-]/g, "-")}`;

// One form control bound to a payload path: `read()` gives the value to send (undefined: leave it out).
class Field {
  constructor(loc, label, control, { hint, read, write, inline = false } = {}) {
    this.loc = loc;
    this.label = label;
    this.control = control;
    this.dirty = false;
    this.read = read || (() => control.value);
    this.write = write || ((value) => (control.value = value ?? ""));
    const id = idFor(loc);
    const hintId = `${id}-hint`;
    this.errorEl = h("p", { class: "field-error", id: `${id}-error`, hidden: true });
    control.id = control.id || id;
    control.dataset.loc = loc;
    control.setAttribute("aria-describedby", `${hint ? hintId : ""} ${id}-error`.trim());
    const mark = () => (this.dirty = true);
    control.addEventListener("input", mark);
    control.addEventListener("change", mark);
    const labelEl = h("label", { for: control.id }, label);
    this.element = h(
      "div",
      { class: inline ? "field checkbox" : "field", "data-field": loc },
      inline ? [control, " ", labelEl] : [labelEl, control],
      hint ? h("p", { class: "hint", id: hintId }, hint) : null,
      this.errorEl,
    );
  }

  init(value) {
    this.write(value);
    return this;
  }

  setError(messages) {
    this.errorEl.hidden = !messages.length;
    this.errorEl.textContent = messages.join(" ");
    if (messages.length) this.control.setAttribute("aria-invalid", "true");
    else this.control.removeAttribute("aria-invalid");
  }

  focus() {
    this.control.focus();
  }
}

// A group (fieldset) that shows errors aimed at the group itself, e.g. `task.split` from a cross-field check.
class Group {
  constructor(loc, legend, children) {
    this.loc = loc;
    this.label = legend;
    this.errorEl = h("p", { class: "field-error", hidden: true, id: `${idFor(loc)}-error` });
    this.element = h("fieldset", { "data-field": loc }, h("legend", {}, legend), this.errorEl, children);
  }

  setError(messages) {
    this.errorEl.hidden = !messages.length;
    this.errorEl.textContent = messages.join(" ");
  }

  focus() {
    this.element.querySelector("input, select, textarea")?.focus();
  }
}

function numberField(loc, label, { min, max, integer, hint, value, nullable }) {
  const control = h("input", { type: "number", step: integer ? "1" : "any", min, max, inputmode: "decimal" });
  return new Field(loc, label, control, {
    hint,
    write: (v) => (control.value = v ?? ""),
    read: () => {
      if (control.value === "") return nullable ? null : undefined;
      const number = Number(control.value);
      return Number.isFinite(number) ? number : control.value;
    },
  }).init(value);
}

function textField(loc, label, { multiline = false, hint, placeholder, rows = 3 } = {}) {
  const control = multiline ? h("textarea", { rows, placeholder }) : h("input", { type: "text", placeholder });
  return new Field(loc, label, control, { hint, read: () => (control.value === "" ? undefined : control.value) });
}

function selectField(loc, label, options, { hint, value } = {}) {
  const control = h(
    "select",
    {},
    options.map(([v, text]) => h("option", { value: v }, text)),
  );
  if (value !== undefined) control.value = value;
  return new Field(loc, label, control, { hint, read: () => (control.value === "" ? undefined : control.value) });
}

function boundsText(schema) {
  const low = schema.minimum ?? schema.exclusiveMinimum;
  const high = schema.maximum ?? schema.exclusiveMaximum;
  if (low === undefined && high === undefined) return "";
  const lowText = low === undefined ? "" : `${schema.exclusiveMinimum !== undefined ? "more than" : "from"} ${low}`;
  const highText = high === undefined ? "" : `${schema.exclusiveMaximum !== undefined ? "below" : "to"} ${high}`;
  return ` Range: ${[lowText, highText].filter(Boolean).join(" ")}.`;
}

// A method parameter's field from its JSON Schema (nullable via anyOf [X, null]).
function paramField(name, prop) {
  const nullable = Array.isArray(prop.anyOf) && prop.anyOf.some((x) => x.type === "null");
  const schema = prop.anyOf ? prop.anyOf.find((x) => x.type !== "null") || {} : prop;
  const loc = `params.${name}`;
  const label = prop.title || name;
  const defaultText = prop.default === undefined ? "" : ` Default: ${JSON.stringify(prop.default)}.`;
  const hint = `${prop.description || ""}${defaultText}${boundsText(schema)}`.trim();
  if (schema.enum) {
    return selectField(
      loc,
      label,
      [...(nullable ? [["", "none"]] : []), ...schema.enum.map((v) => [v, v])],
      { hint, value: prop.default ?? "" },
    );
  }
  if (schema.type === "boolean") {
    const control = h("input", { type: "checkbox", checked: Boolean(prop.default) });
    return new Field(loc, label, control, {
      hint,
      inline: true,
      read: () => control.checked,
      write: (v) => (control.checked = Boolean(v)),
    });
  }
  if (schema.type === "integer" || schema.type === "number") {
    return numberField(loc, label, {
      min: schema.minimum,
      max: schema.maximum,
      integer: schema.type === "integer",
      hint,
      value: prop.default,
      nullable,
    });
  }
  if (schema.type === "array" && schema.items?.enum) {
    const boxes = schema.items.enum.map((v) => h("input", { type: "checkbox", value: v, name: loc }));
    const control = h(
      "div",
      { class: "checks", role: "group", tabindex: "-1" },
      boxes.map((box, i) => h("label", { class: "check" }, box, ` ${schema.items.enum[i]}`)),
    );
    const field = new Field(loc, label, control, {
      hint,
      read: () => boxes.filter((b) => b.checked).map((b) => b.value),
      write: (values) => boxes.forEach((b) => (b.checked = (values || []).includes(b.value))),
    });
    // A group of checkboxes is labelled by its heading, not a <label for>.
    const heading = field.element.querySelector("label[for]");
    heading.replaceWith(h("span", { class: "label", id: `${idFor(loc)}-label` }, label));
    control.setAttribute("aria-labelledby", `${idFor(loc)}-label`);
    return field.init(prop.default);
  }
  // Anything else is entered as JSON (objects, free arrays) or text.
  const control = h("input", { type: "text" });
  return new Field(loc, label, control, {
    hint,
    read: () => {
      if (control.value === "") return nullable ? null : undefined;
      if (schema.type === "string") return control.value;
      try {
        return JSON.parse(control.value);
      } catch {
        return control.value;
      }
    },
    write: (v) => (control.value = v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v)),
  }).init(prop.default);
}

function setPath(target, path, value) {
  let node = target;
  path.slice(0, -1).forEach((part) => (node = node[part] ??= {}));
  node[path[path.length - 1]] = value;
}

export async function submitView(main, { signal }) {
  const [methods, builtin, uploaded] = await Promise.all([
    get("/v1/methods", { signal }),
    get(withQuery("/v1/datasets", { source: "builtin" }), { signal }),
    get(withQuery("/v1/datasets", { limit: 200 }), { signal }),
  ]);
  const builtinById = new Map(builtin.items.map((d) => [d.id, d]));
  const methodByName = new Map(methods.map((m) => [m.name, m]));

  const summary = h("div", { id: "form-errors", tabindex: "-1" });
  const methodField = selectField("method", "Method", methods.map((m) => [m.name, m.name]), { value: "opro" });
  const presetField = selectField("params.preset", "Preset", [["", "none (defaults)"]]);
  const methodHelp = h("p", { class: "hint", id: "method-help" });
  const paramsBox = h("div", { class: "param-grid" });
  const paramsGroup = new Group("params", "Parameters", paramsBox);
  let paramFields = [];

  const datasetOptions = h(
    "select",
    {},
    h(
      "optgroup",
      { label: "Builtin tasks" },
      builtin.items.map((d) => h("option", { value: d.id }, d.id)),
    ),
    uploaded.items.length
      ? h(
          "optgroup",
          { label: "Uploaded" },
          uploaded.items.map((d) => h("option", { value: d.id }, `${d.name} (${d.n_examples} examples)`)),
        )
      : null,
  );
  datasetOptions.value = builtinById.has(DEFAULT_DATASET) ? DEFAULT_DATASET : builtin.items[0]?.id || "";
  const datasetField = new Field("task.dataset", "Dataset", datasetOptions, {
    hint: "A builtin task brings its template, metric, labels and initial prompt as defaults.",
  });
  const metricField = selectField("task.metric", "Metric", [["", "the task's default"], ...METRICS.map((m) => [m, m])]);
  const templateField = textField("task.template", "Template", {
    multiline: true,
    hint: "Contains {prompt} and {input}. Empty: the task's default (shown greyed).",
  });
  const labelsField = textField("task.labels", "Labels", { hint: "Comma-separated; empty: the task's labels." });
  labelsField.read = () => {
    const text = labelsField.control.value.trim();
    return text ? text.split(",").map((label) => label.trim()) : undefined;
  };
  const calibrationField = selectField(
    "task.calibration",
    "Calibration",
    [["", "none (default)"], ["cbm", "cbm"], ["contextual", "contextual"]],
    {
      hint:
        "Label tasks scored by label log-probs: cbm divides p(label|input) by its mean over the inputs scored " +
        'together; contextual by p(label|"N/A") for the same prompt. Predict applies the same.',
    },
  );
  const demoTemplateField = textField("task.demo_template", "Demonstration template", {
    hint:
      "How a train example is shown as a demonstration (fewshot, or params.demonstrations): {input} and {target}. " +
      "Empty: the template's query, then the answer as it is scored.",
    placeholder: "{input}\nCategory: {target}",
  });
  const demoCharsField = numberField("task.demo_max_chars", "Demonstration input characters", {
    min: 1,
    integer: true,
    hint: "A demonstration's input is cut to this many characters. Default: 150.",
  });
  const split = {
    kind: selectField("task.split.kind", "Split kind", [["fraction", "fraction"], ["k_shot", "k_shot"]]),
    train: numberField("task.split.train", "Train share", { min: 0, max: 1, value: 0.5 }),
    dev: numberField("task.split.dev", "Dev share", { min: 0, max: 1, value: 0.25 }),
    test: numberField("task.split.test", "Test share", { min: 0, max: 1, value: 0.25 }),
    train_per_class: numberField("task.split.train_per_class", "Train per class (k_shot)", { min: 1, integer: true }),
    dev_per_class: numberField("task.split.dev_per_class", "Dev per class (k_shot)", { min: 0, integer: true }),
    seed: numberField("task.split.seed", "Split seed", { min: 0, integer: true, value: 0 }),
  };
  const splitGroup = new Group(
    "task.split",
    "Split",
    h("div", { class: "param-grid" }, Object.values(split).map((f) => f.element)),
  );
  const initialField = textField("initial_prompt", "Initial prompt", {
    multiline: true,
    hint: "Empty: the builtin task's initial prompt (shown greyed).",
  });
  const budget = {
    calls: numberField("budget.max_llm_calls", "Max LLM calls", { min: 1, integer: true, value: 2000 }),
    tokens: numberField("budget.max_tokens", "Max tokens", { min: 1, integer: true }),
    seconds: numberField("budget.max_seconds", "Max seconds", { min: 0 }),
    cost: numberField("budget.max_cost", "Max cost", { min: 0, hint: "Money, from the backends' prices." }),
  };
  const scorerField = selectField("backends.scorer", "Scorer backend", [["default", "default"]]);
  const optimizerField = selectField("backends.optimizer", "Optimizer backend", [["default", "default"]]);
  const seedField = numberField("seed", "Seed", { min: 0, integer: true, value: 0 });
  const taskGroup = new Group("task", "Task", [
    datasetField.element,
    metricField.element,
    templateField.element,
    labelsField.element,
    calibrationField.element,
    demoTemplateField.element,
    demoCharsField.element,
    splitGroup.element,
  ]);
  const budgetGroup = new Group("budget", "Budget", h("div", { class: "param-grid" }, Object.values(budget).map((f) => f.element)));
  const runGroup = new Group("backends", "Backends and seed", h("div", { class: "param-grid" }, [scorerField.element, optimizerField.element, seedField.element]));

  const fixedFields = [
    methodField,
    presetField,
    datasetField,
    metricField,
    templateField,
    labelsField,
    calibrationField,
    demoTemplateField,
    demoCharsField,
    ...Object.values(split),
    initialField,
    ...Object.values(budget),
    scorerField,
    optimizerField,
    seedField,
  ];
  const groups = [paramsGroup, taskGroup, splitGroup, budgetGroup, runGroup];

  function showMethod() {
    const method = methodByName.get(methodField.control.value);
    const presets = Object.keys(method.presets || {});
    replace(presetField.control, h("option", { value: "" }, "none (defaults)"), presets.map((p) => h("option", { value: p }, p)));
    presetField.dirty = false;
    const properties = method.parameters.properties || {};
    paramFields = Object.entries(properties).map(([name, prop]) => paramField(name, prop));
    replace(paramsBox, paramFields.map((f) => f.element));
    paramsGroup.element.querySelector("legend").textContent = `Parameters of ${method.name}`;
    showMethodHelp();
  }

  function showMethodHelp() {
    const method = methodByName.get(methodField.control.value);
    const preset = presetField.control.value || "default";
    const calls = method.expected_calls?.[preset];
    const setting = preset === "default" ? "the defaults" : `preset ${preset}`;
    replace(
      methodHelp,
      method.description && method.description !== method.name ? `${method.description} ` : "",
      calls ? `Expected: about ${calls.toLocaleString("en-US")} LLM calls with ${setting} on builtin:dbpedia16.` : "",
    );
  }

  // A preset fills the fields it sets (others back to their defaults); fields edited afterwards override it.
  function applyPreset() {
    const method = methodByName.get(methodField.control.value);
    const values = method.presets?.[presetField.control.value] || {};
    const properties = method.parameters.properties || {};
    for (const field of paramFields) {
      const name = field.loc.slice("params.".length);
      field.write(name in values ? values[name] : properties[name].default);
      field.dirty = false;
    }
    showMethodHelp();
  }

  function showTaskDefaults() {
    const defaults = builtinById.get(datasetField.control.value)?.defaults;
    templateField.control.placeholder = defaults?.template || "{prompt}\n\n{input}";
    initialField.control.placeholder = defaults?.initial_prompt || "";
    labelsField.control.placeholder = defaults?.labels ? defaults.labels.join(", ") : "";
    metricField.control.options[0].textContent = defaults ? `the task's default (${defaults.metric})` : "exact_match (default)";
  }

  methodField.control.addEventListener("change", showMethod);
  presetField.control.addEventListener("change", applyPreset);
  datasetField.control.addEventListener("change", showTaskDefaults);

  function payload() {
    const body = { method: methodField.control.value, task: { dataset: datasetField.control.value } };
    const preset = presetField.control.value;
    if (preset) setPath(body, ["params", "preset"], preset);
    for (const field of [...fixedFields, ...paramFields]) {
      if (!field.dirty || field === methodField || field === presetField) continue;
      const value = field.read();
      if (value !== undefined) setPath(body, field.loc.split("."), value);
    }
    return body;
  }

  function clearErrors() {
    for (const target of [...fixedFields, ...paramFields, ...groups]) target.setError([]);
    replace(summary);
  }

  // Each detail goes to the field its loc names, or the nearest enclosing group, or the summary.
  function showErrors(error) {
    const targets = new Map([...fixedFields, ...paramFields, ...groups].map((t) => [t.loc, t]));
    const messages = new Map();
    const unplaced = [];
    for (const detail of error.details) {
      const path = (detail.loc || []).map(String);
      if (path[0] === "body") path.shift();
      let target = null;
      for (let n = path.length; n > 0 && !target; n--) target = targets.get(path.slice(0, n).join(".")) || null;
      const text = detail.msg + (detail.allowed !== undefined ? ` (allowed: ${JSON.stringify(detail.allowed)})` : "");
      if (!target) unplaced.push(`${path.join(".") || "body"}: ${text}`);
      else messages.set(target, [...(messages.get(target) || []), text]);
    }
    for (const [target, texts] of messages) target.setError(texts);
    const links = [...messages.keys()].map((target) =>
      h(
        "li",
        {},
        h(
          "a",
          {
            href: "#",
            onclick: (event) => {
              event.preventDefault();
              target.focus();
            },
          },
          target.label,
        ),
        `: ${messages.get(target).join(" ")}`,
      ),
    );
    replace(
      summary,
      h(
        "div",
        { class: "error-box", role: "alert" },
        h("p", {}, error.status === 422 ? "The server did not accept the job:" : error.message),
        h("ul", {}, links, unplaced.map((text) => h("li", {}, text))),
      ),
    );
    summary.focus();
  }

  const submitButton = h("button", { type: "submit" }, "Submit job");
  const form = h(
    "form",
    { id: "submit-form", novalidate: true },
    summary,
    h(
      "fieldset",
      {},
      h("legend", {}, "Method"),
      h("div", { class: "param-grid" }, methodField.element, presetField.element),
      methodHelp,
    ),
    paramsGroup.element,
    taskGroup.element,
    initialField.element,
    budgetGroup.element,
    runGroup.element,
    h("div", { class: "actions" }, submitButton),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    submitButton.disabled = true;
    try {
      const job = await post("/v1/jobs", payload(), { signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      if (isQuiet(error)) return;
      if (error instanceof ApiError && error.details.length) showErrors(error);
      else replace(summary, errorBox(error));
    } finally {
      submitButton.disabled = false;
    }
  });

  replace(main, h("h1", {}, "Submit a job"), form);
  showMethod();
  showTaskDefaults();

  // The backends list does live checks, so it fills the selects when it arrives instead of holding the form.
  get("/v1/backends", { signal })
    .then((backends) => {
      for (const field of [scorerField, optimizerField]) {
        replace(field.control, backends.map((b) => h("option", { value: b.name }, `${b.name} (${b.kind}, ${b.model_id})`)));
        field.control.value = "default";
      }
    })
    .catch(() => {}); // the "default" choice stays; a 401 has brought up the key form already
}
