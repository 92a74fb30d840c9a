// #/datasets: upload (JSONL file, JSON file or pasted JSON) with the server's validation errors in place, the uploaded
// datasets and the builtin tasks, and a preview of any of them.

import { ApiError, get, request, withQuery } from "./api.js";
import { dataTable, errorBox, fmtInt, fmtTime, h, isQuiet, replace, run } from "./dom.js";

const PREVIEW_EXAMPLES = 10;

// A 422's details as a list ("file › line 3 › target: Field required"); anything else as one line.
function problems(error) {
  if (!(error instanceof ApiError) || !error.details.length) return [errorBox(error)];
  return h(
    "div",
    { class: "error-box", role: "alert" },
    h("p", {}, error.message && error.status !== 422 ? error.message : "The server did not accept this dataset:"),
    h(
      "ul",
      {},
      error.details.map((d) => {
        const loc = (d.loc || []).filter((part, i) => !(i === 0 && part === "body")).join(" › ");
        return h("li", {}, loc ? `${loc}: ` : "", d.msg || "");
      }),
    ),
  );
}

export async function datasetsView(main, { signal }) {
  const uploadErrors = h("div", { id: "upload-errors" });
  const jsonErrors = h("div", { id: "json-errors" });
  const pageErrors = h("div");
  const uploadedSlot = h("div");
  const builtinSlot = h("div");
  const previewSlot = h("section", { class: "card", id: "preview", "aria-labelledby": "preview-title", hidden: true });
  const nameInput = h("input", { id: "upload-name", name: "name", autocomplete: "off" });
  const fileInput = h("input", {
    id: "upload-file",
    name: "file",
    type: "file",
    required: true,
    accept: ".jsonl,.json,.txt,application/json",
    "aria-describedby": "upload-help",
  });
  const jsonInput = h("textarea", {
    id: "json-body",
    rows: "5",
    required: true,
    placeholder: '{"name": "my-task", "examples": [{"input": "…", "target": "…"}]}',
  });

  async function created(dataset, where) {
    replace(where, h("p", { class: "ok-box", role: "status" }, `Created ${dataset.name} (${dataset.id}).`));
    await loadUploaded();
    await preview(dataset.id);
  }

  async function upload(event) {
    event.preventDefault();
    replace(uploadErrors);
    const file = fileInput.files[0];
    if (!file) return;
    try {
      let dataset;
      if (file.name.toLowerCase().endsWith(".json")) {
        // A .json file is the JSON body itself (name from the form or the file when it has none).
        let body;
        try {
          body = JSON.parse(await file.text());
        } catch (error) {
          replace(uploadErrors, h("p", { class: "error-box", role: "alert" }, `Not valid JSON: ${error.message}`));
          return;
        }
        if (body && typeof body === "object" && !Array.isArray(body)) {
          body.name = nameInput.value.trim() || body.name || file.name;
        }
        dataset = await request("/v1/datasets", { method: "POST", json: body, signal });
      } else {
        const form = new FormData();
        form.append("file", file);
        if (nameInput.value.trim()) form.append("name", nameInput.value.trim());
        dataset = await request("/v1/datasets", { method: "POST", body: form, signal });
      }
      await created(dataset, uploadErrors);
    } catch (error) {
      if (!isQuiet(error)) replace(uploadErrors, problems(error));
    }
  }

  async function submitJson(event) {
    event.preventDefault();
    replace(jsonErrors);
    let body;
    try {
      body = JSON.parse(jsonInput.value);
    } catch (error) {
      replace(jsonErrors, h("p", { class: "error-box", role: "alert" }, `Not valid JSON: ${error.message}`));
      return;
    }
    try {
      await created(await request("/v1/datasets", { method: "POST", json: body, signal }), jsonErrors);
    } catch (error) {
      if (!isQuiet(error)) replace(jsonErrors, problems(error));
    }
  }

  async function preview(id) {
    const dataset = await get(withQuery(`/v1/datasets/${encodeURIComponent(id)}`, { examples_limit: PREVIEW_EXAMPLES }), {
      signal,
    });
    const defaults = dataset.defaults;
    replace(
      previewSlot,
      h("h2", { id: "preview-title", tabindex: "-1" }, `Preview: ${dataset.name}`),
      h("p", { class: "muted small" }, `${dataset.id} · ${fmtInt(dataset.n_examples)} examples`),
      dataset.description ? h("p", {}, dataset.description) : null,
      defaults
        ? h(
            "dl",
            { class: "defaults" },
            h("dt", {}, "Template"),
            h("dd", {}, h("pre", { class: "prompt" }, defaults.template)),
            h("dt", {}, "Metric"),
            h("dd", {}, defaults.metric),
            h("dt", {}, "Labels"),
            h("dd", {}, defaults.labels ? defaults.labels.join(", ") : "–"),
            h("dt", {}, "Verbalizer"),
            h("dd", {}, defaults.verbalizer ? JSON.stringify(defaults.verbalizer) : "–"),
            h("dt", {}, "Initial prompt"),
            h("dd", {}, defaults.initial_prompt),
            h("dt", {}, "Max new tokens"),
            h("dd", {}, defaults.max_new_tokens),
          )
        : null,
      h("h3", {}, `First ${Math.min(PREVIEW_EXAMPLES, dataset.n_examples)} examples`),
      dataTable(
        "preview-examples",
        "Examples",
        ["Input", "Target"],
        dataset.examples.map((ex) => h("tr", {}, h("td", { class: "pre-wrap" }, ex.input), h("td", {}, ex.target))),
      ),
    );
    previewSlot.hidden = false;
    previewSlot.querySelector("h2").focus();
  }

  const previewButton = (dataset) =>
    h(
      "button",
      {
        type: "button",
        class: "secondary small-button",
        "aria-label": `Preview ${dataset.name}`,
        onclick: () => run(() => preview(dataset.id), pageErrors),
      },
      "Preview",
    );

  async function loadUploaded() {
    const page = await get(withQuery("/v1/datasets", { limit: 200 }), { signal });
    replace(
      uploadedSlot,
      page.items.length
        ? dataTable(
            "uploaded-datasets",
            "Uploaded datasets",
            ["Name", "Id", "Examples", "Created", ""],
            page.items.map((d) =>
              h(
                "tr",
                { "data-dataset-id": d.id },
                h("th", { scope: "row" }, d.name),
                h("td", { class: "mono small" }, d.id),
                h("td", { class: "num" }, fmtInt(d.n_examples)),
                h("td", {}, fmtTime(d.created_at)),
                h("td", {}, previewButton(d)),
              ),
            ),
          )
        : h("p", { class: "muted" }, "None uploaded yet."),
      page.next_cursor ? h("p", { class: "muted small" }, "Showing the newest 200.") : null,
    );
  }

  async function loadBuiltin() {
    const page = await get(withQuery("/v1/datasets", { source: "builtin" }), { signal });
    replace(
      builtinSlot,
      dataTable(
        "builtin-datasets",
        "Builtin tasks",
        ["Task", "Examples", "Metric", "Labels", "Description", ""],
        page.items.map((d) =>
          h(
            "tr",
            { "data-dataset-id": d.id },
            h("th", { scope: "row", class: "mono small" }, d.id),
            h("td", { class: "num" }, fmtInt(d.n_examples)),
            h("td", {}, d.defaults?.metric ?? "–"),
            h("td", { class: "small" }, d.defaults?.labels ? d.defaults.labels.join(", ") : "–"),
            h("td", { class: "small" }, d.description || ""),
            h("td", {}, previewButton(d)),
          ),
        ),
      ),
    );
  }

  replace(
    main,
    h("h1", {}, "Datasets"),
    pageErrors,
    h(
      "section",
      { class: "card", "aria-labelledby": "upload-title" },
      h("h2", { id: "upload-title" }, "Upload"),
      h(
        "div",
        { class: "two-col" },
        h(
          "form",
          { id: "upload-form", onsubmit: upload, novalidate: true },
          h("div", { class: "field" }, h("label", { for: "upload-name" }, "Name (optional)"), nameInput),
          h("div", { class: "field" }, h("label", { for: "upload-file" }, "File"), fileInput),
          h(
            "p",
            { id: "upload-help", class: "hint" },
            'JSON Lines: one {"input": "…", "target": "…"} per line. A .json file is sent as {"name", "examples"}.',
          ),
          h("button", { type: "submit" }, "Upload"),
          uploadErrors,
        ),
        h(
          "form",
          { id: "json-form", onsubmit: submitJson, novalidate: true },
          h("div", { class: "field" }, h("label", { for: "json-body" }, "Or paste JSON"), jsonInput),
          h("button", { type: "submit" }, "Create"),
          jsonErrors,
        ),
      ),
    ),
    previewSlot,
    h("section", { class: "card", "aria-labelledby": "uploaded-title" }, h("h2", { id: "uploaded-title" }, "Uploaded"), uploadedSlot),
    h(
      "section",
      { class: "card", "aria-labelledby": "builtin-title" },
      h("h2", { id: "builtin-title" }, "Builtin tasks"),
      builtinSlot,
    ),
  );
  await Promise.all([loadUploaded(), loadBuiltin()]);
}
