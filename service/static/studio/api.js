// The public API: fetch() with the API key, error bodies, the event stream and the result's JSON.
//
//   GET  openapi.json   the /predict form schema: every parameter control is generated from it (controls.js)
//   GET  health/ready   whether the model is loaded (shown in the header)
//   POST predict        multipart, `Accept: text/event-stream`: queued / started / progress, then result or error
//
// URLs are relative to the page's <base>, so the page also works behind a path prefix. When a request answers
// 401 the page asks for the API key once, keeps it in sessionStorage (this tab only) and sends it as
// `Authorization: Bearer <key>` on every request from then on.

const KEY_STORAGE = "anydoor.studio.apiKey";

export const $ = (id) => document.getElementById(id);

// The status line (an aria-live region).
export function announce(text) {
  $("status").textContent = text;
}

// --- the API key -------------------------------------------------------------------------------------------------

let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let keyPrompt = null; // the pending prompt: requests that get 401 meanwhile all wait for the same one

function withKey(headers) {
  const out = new Headers(headers || {});
  if (apiKey) out.set("Authorization", `Bearer ${apiKey}`);
  return out;
}

// Show the key form and resolve once a key is submitted.
function askForKey(refused) {
  if (keyPrompt) return keyPrompt;
  const form = $("key-form");
  $("key-reason").textContent = refused
    ? "The server refused this API key. Check it and enter it again."
    : "This server needs an API key. Enter it to go on.";
  form.hidden = false;
  const input = $("api-key");
  input.value = "";
  input.setAttribute("aria-invalid", refused ? "true" : "false");
  input.focus();
  announce(refused ? "The API key was refused; enter it again." : "This server needs an API key.");
  keyPrompt = new Promise((resolve) => {
    form.addEventListener("submit", function onSubmit(event) {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return;
      }
      form.removeEventListener("submit", onSubmit);
      apiKey = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      form.hidden = true;
      keyPrompt = null;
      announce("API key set.");
      resolve();
    });
  });
  return keyPrompt;
}

// fetch() with the key; a 401 asks for the key and retries (a FormData body can be sent again).
export async function apiFetch(path, init = {}) {
  for (;;) {
    const sentKey = apiKey;
    const response = await fetch(path, { ...init, headers: withKey(init.headers) });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    // Another request may have set a (new) key while this one was on the way: retry with it first.
    if (apiKey === sentKey) await askForKey(Boolean(sentKey));
  }
}

// The JSON error body of a 4xx/5xx, or one made up from the status when the body is not ours (a proxy's page).
export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!body || typeof body !== "object" || !body.error) {
    body = { error: "http_error", field: null, message: `HTTP ${response.status} ${response.statusText}` };
  }
  const retry = response.headers.get("Retry-After");
  if (retry) body.message += ` (retry in about ${retry} s)`;
  return body;
}

// --- server readiness ----------------------------------------------------------------------------------------------

let healthTimer = 0;

export async function checkHealth() {
  clearTimeout(healthTimer);
  const el = $("health");
  let ready = false;
  try {
    const response = await apiFetch("health/ready", { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => ({}));
    ready = response.ok && body.status === "ready";
    const demo = body.model && body.model.demo ? " (demo model: a tiny random model, not AnyDoor)" : "";
    el.textContent = ready ? `Server: ready${demo}` : `Server: ${body.status || `HTTP ${response.status}`}`;
    el.dataset.state = ready ? "ready" : "waiting";
  } catch (_) {
    el.textContent = "Server: unreachable";
    el.dataset.state = "down";
  }
  healthTimer = setTimeout(checkHealth, ready ? 30000 : 3000);
}

// --- answers -------------------------------------------------------------------------------------------------------

// Read Server-Sent Events from a fetch() response: yields {event, data} per frame (the SSE line format:
// "field: value" lines, a blank line ends an event, lines starting with ":" are comments).
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const newline = /\r\n|\r|\n/g;
  let buffer = "";
  let scanned = 0; // no line end before this index of buffer: a long line (the result's image) is scanned once
  let event = "message";
  let data = [];
  for (let finished = false; !finished;) {
    const { value, done } = await reader.read();
    finished = done;
    if (value) buffer += value;
    for (;;) {
      newline.lastIndex = scanned;
      const m = newline.exec(buffer);
      if (!m) {
        scanned = buffer.length;
        break;
      }
      // A lone \r at the end may be the first half of \r\n: wait for the next chunk.
      if (m[0] === "\r" && m.index === buffer.length - 1 && !finished) {
        scanned = m.index;
        break;
      }
      const line = buffer.slice(0, m.index);
      buffer = buffer.slice(m.index + m[0].length);
      scanned = 0;
      if (line === "") {
        if (data.length) yield { event, data: data.join("\n") };
        event = "message";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (name === "event") event = val;
      else if (name === "data") data.push(val);
    }
  }
}

// The JSON of a result, with its seeds kept exact: seeds go up to 2^63-1, past what JSON.parse keeps. In the
// answer's text the result's own seed comes first, then each candidate's in their order (no other key is named
// "seed", and the base64 images hold no quotes).
export function parseResult(text) {
  const body = JSON.parse(text);
  const seeds = [...text.matchAll(/"seed"\s*:\s*(\d+)/g)].map((m) => m[1]);
  if (seeds.length) body.seed = seeds[0];
  const candidates = Array.isArray(body.candidates) ? body.candidates : [];
  const exact = seeds.length === candidates.length + 1;
  candidates.forEach((c, i) => { c.seed = exact ? seeds[i + 1] : String(c.seed); });
  return body;
}

export function base64Blob(b64, type) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

// Timings from a Server-Timing header ("queue;dur=0.4, sample;dur=12.0"), for a plain image answer.
export function serverTimings(header) {
  const out = {};
  for (const item of (header || "").split(",")) {
    const [name, ...rest] = item.trim().split(";");
    const dur = rest.find((p) => p.trim().startsWith("dur="));
    if (name && dur) out[name] = Number(dur.trim().slice(4));
  }
  return out;
}
