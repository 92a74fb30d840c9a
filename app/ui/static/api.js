// The /v1 API: every call carries the key from sessionStorage; a 401 hands control to the key form.

const KEY_STORAGE = "promptopt.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
    this.details = Array.isArray(body?.error?.details) ? body.error.details : [];
  }
}

// Thrown after a 401 (the key form is already shown); callers just stop.
export class AuthRequired extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

let unauthorized = () => {};

export function onUnauthorized(handler) {
  unauthorized = handler;
}

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

export function withQuery(path, query) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") params.set(name, String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

async function raw(path, { method = "GET", json, body, headers, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers.set("Content-Type", "application/json");
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    unauthorized(Boolean(apiKey()));
    throw new AuthRequired("an API key is needed");
  }
  return response;
}

export async function request(path, options = {}) {
  const response = await raw(path, options);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: { message: text } };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const get = (path, options) => request(path, options);
export const post = (path, json, options = {}) => request(path, { ...options, method: "POST", json });

// A file download through the authenticated fetch (a plain link would not carry the key).
export async function download(path, filename, signal) {
  const response = await raw(path, { signal });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(response.status, body);
  }
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header). Calls `onEvent({id, event,
// data})` for each event until the server ends the stream; returns the last event id, for `Last-Event-ID`.
export async function readEventStream(path, { lastEventId, signal, onEvent }) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
  const response = await raw(path, { headers, signal });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(response.status, body);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let pending = { event: "message", data: [] };
  let lastId = lastEventId || null;
  const line = (text) => {
    if (text === "") {
      if (pending.data.length) {
        onEvent({ id: lastId, event: pending.event, data: pending.data.join("\n") });
      }
      pending = { event: "message", data: [] };
      return;
    }
    if (text.startsWith(":")) return; // a comment (keep-alive)
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") lastId = value;
    else if (field === "event") pending.event = value;
    else if (field === "data") pending.data.push(value);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      line(buffer.slice(0, newline).replace(/\r$/, ""));
      buffer = buffer.slice(newline + 1);
    }
  }
  return lastId;
}
