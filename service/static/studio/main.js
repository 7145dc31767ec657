// AnyDoor Studio: a single page over the public API, in plain JavaScript modules (no build step, no other host).
//
//   api.js       fetch() with the API key, error bodies, the event stream, the result's JSON
//   controls.js  the parameter controls (basic / advanced) and the placement options, from openapi.json
//   editors.js   the image editors: mask brush, target boxes, the placement area
//   gallery.js   the result, and the candidates' gallery with their scores
//   main.js      this: the page's wiring and the run (multipart POST predict, Accept: text/event-stream)

import { $, announce, apiFetch, base64Blob, checkHealth, errorOf, parseResult, readEvents, serverTimings } from "./api.js";
import { appendParams, loadSpec, objectJson, paramControl, resetParams } from "./controls.js";
import { Editor, activeEditor, hasAlpha } from "./editors.js";
import { bindGallery, showResult } from "./gallery.js";

const reference = new Editor($("reference-editor"), { boxes: false });
const background = new Editor($("background-editor"), { boxes: true });

// --- notes and the target list -------------------------------------------------------------------------------------

function referenceNote() {
  const note = $("reference-note");
  if (!reference.image) {
    note.textContent = "";
  } else if (reference.maskUsed) {
    note.textContent = "Your brushed mask is sent as reference_mask (it replaces any transparency).";
  } else if (reference.alpha) {
    note.textContent = "This cut-out has transparency: the server uses it as the object's mask. Brushing is " +
      "optional and replaces it.";
  } else {
    note.textContent = "No transparency in this image: brush over the object to mark it.";
  }
}

function backgroundNote() {
  const note = $("background-note");
  if (!background.image) {
    note.textContent = "";
    return;
  }
  const n = background.boxes.length;
  if (background.area) {
    note.textContent = n || background.maskUsed
      ? "A placement area and other targets: the server takes one kind of target; remove the others."
      : "The service places the objects inside the placement area, with the placement options below.";
  } else if (background.maskUsed) {
    note.textContent = n
      ? `The brushed mask is sent, with the ${n} box${n > 1 ? "es" : ""} painted into it.`
      : "The brushed mask is sent as background_mask.";
  } else {
    note.textContent = n ? `${n} box${n > 1 ? "es" : ""} marked.` : "Mark at least one target.";
  }
}

// The placement options apply to a placement area only: disabled (and skipped by the keyboard) without one.
function syncPlacement() {
  const options = $("placement-fields");
  if (options) options.disabled = !background.area;
  $("placement-help").hidden = Boolean(background.area);
}

// The list of targets under the background, each with a Remove button (the keyboard way to edit them).
function renderTargets() {
  const list = $("targets");
  list.replaceChildren();
  const item = (text, label, remove) => {
    const li = document.createElement("li");
    li.textContent = `${text} `;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Remove";
    button.setAttribute("aria-label", label);
    button.addEventListener("click", remove);
    li.append(button);
    list.append(li);
  };
  background.boxes.forEach((op, i) => {
    item(`Box ${i + 1}: ${op.x},${op.y},${op.w},${op.h}`, `Remove box ${i + 1}`, () => {
      background.removeBox(op);
      announce(`Box ${i + 1} removed.`);
      $("box-text").focus();
    });
  });
  const a = background.area;
  if (a) {
    item(`Placement area: ${a.x},${a.y},${a.w},${a.h}`, "Remove the placement area", () => {
      background.removeArea();
      announce("Placement area removed.");
      $("box-text").focus();
    });
  }
  if (background.maskUsed) {
    const li = document.createElement("li");
    li.textContent = "A brushed mask (each separate region is a target)";
    list.append(li);
  }
  backgroundNote();
  syncPlacement();
}

background.root.addEventListener("targets-changed", renderTargets);
reference.root.addEventListener("targets-changed", referenceNote);

$("reference-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    await reference.loadImage(file);
    reference.alpha = hasAlpha(reference.image);
    referenceNote();
    announce(`Reference loaded: ${reference.width} × ${reference.height}.`);
  } catch (_) {
    announce(`${file.name} could not be shown as an image; it is still sent, and the server will say why.`);
    reference.file = file;
  }
});

$("background-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    await background.loadImage(file);
    renderTargets();
    announce(`Background loaded: ${background.width} × ${background.height}.`);
  } catch (_) {
    announce(`${file.name} could not be shown as an image; it is still sent, and the server will say why.`);
    background.file = file;
  }
});

$("box-add").addEventListener("click", () => {
  const input = $("box-text");
  const parts = input.value.split(",").map((s) => s.trim());
  const nums = parts.map(Number);
  if (!background.image) {
    announce("Load the background first.");
    return;
  }
  if (parts.length !== 4 || nums.some((n) => !Number.isInteger(n) || n < 0) || nums[2] < 1 || nums[3] < 1) {
    input.setAttribute("aria-invalid", "true");
    announce("A box is four whole numbers: x,y,w,h.");
    return;
  }
  input.removeAttribute("aria-invalid");
  const [x, y, w, h] = nums;
  background.push({ type: "box", x, y, w, h });
  input.value = "";
  announce(`Box ${background.boxes.length} added: ${x},${y},${w},${h}.`);
});
$("box-text").addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    $("box-add").click();
  }
});

// Brush size with [ and ], undo with Ctrl/Cmd+Z: not while typing into a text field.
document.addEventListener("keydown", (event) => {
  const t = event.target;
  const typing = t instanceof HTMLInputElement && !["range", "radio", "checkbox", "file", "button"].includes(t.type)
    || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement;
  if (typing || event.altKey) return;
  const e = activeEditor;
  if (event.key === "[" || event.key === "]") {
    const factor = event.key === "]" ? 1.25 : 0.8;
    e.setSize(event.key === "]" ? Math.max(e.size + 1, e.size * factor) : Math.min(e.size - 1, e.size * factor));
    announce(`Brush size ${e.size} px.`);
    event.preventDefault();
  } else if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
    e.undo();
    event.preventDefault();
  }
});

// --- running a prediction ------------------------------------------------------------------------------------------

let running = null; // the AbortController of the request in flight

async function buildForm() {
  const form = new FormData();
  if (reference.file) form.append("reference", reference.file, reference.file.name);
  if (reference.image && reference.maskUsed) {
    form.append("reference_mask", await reference.maskBlob(), "reference_mask.png");
  }
  if (background.file) form.append("background", background.file, background.file.name);
  if (background.image && background.maskUsed) {
    form.append("background_mask", await background.maskBlob(background.boxes), "background_mask.png");
  } else {
    for (const b of background.boxes) form.append("box", `${b.x},${b.y},${b.w},${b.h}`);
  }
  if (background.image && background.area) {
    // The placement options as the JSON text of the placement field, and the area as a mask of its rectangle.
    form.append("placement", objectJson("placement"));
    form.append("placement_area", await background.areaBlob(), "placement_area.png");
  }
  appendParams(form);
  return form;
}

function setProgress(step, total) {
  const bar = $("progress");
  if (step === null) { // unknown: indeterminate
    bar.removeAttribute("value");
    bar.removeAttribute("aria-valuenow");
    return;
  }
  bar.max = total;
  bar.value = step;
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(step));
}

function clearErrors() {
  $("error").hidden = true;
  document.querySelectorAll("[aria-invalid='true']").forEach((el) => el.removeAttribute("aria-invalid"));
}

// The control to point at for an error's field.
function controlOfField(field, message) {
  if (!field) return null;
  const direct = {
    reference: "reference-file", background: "background-file", reference_mask: "reference-canvas",
    background_mask: "background-canvas", box: "background-canvas", placement_area: "background-canvas",
    Authorization: "api-key",
  }[field];
  return direct ? $(direct) : paramControl(field, message);
}

function showError(body) {
  const field = body.field || null;
  $("error-code").textContent = body.error || "error";
  $("error-field").textContent = field || "";
  $("error-field-wrap").hidden = !field;
  $("error-message").textContent = body.message || "";
  const more = $("error-more");
  more.replaceChildren();
  for (const item of Array.isArray(body.errors) ? body.errors.slice(1) : []) {
    const li = document.createElement("li");
    li.textContent = item.field ? `${item.field}: ${item.message}` : item.message;
    more.append(li);
  }
  $("error").hidden = false;
  const control = controlOfField(field, body.message);
  if (control) control.setAttribute("aria-invalid", "true");
  announce(`Failed${field ? ` (${field})` : ""}: ${body.message}`);
}

function showAnswer(body) {
  showResult(body, base64Blob(body.image, body.media_type || "image/png"), background.imageUrl);
}

async function run() {
  if (running) return;
  clearErrors();
  $("result").hidden = true; // the previous result goes: what shows next belongs to this run
  const controller = new AbortController();
  running = controller;
  $("run").disabled = true;
  $("cancel").disabled = false;
  setProgress(0, 1);
  $("progress-text").textContent = "Uploading…";
  announce("Uploading…");
  let lastQuarter = -1;
  try {
    const form = await buildForm();
    const response = await apiFetch("predict", {
      method: "POST", body: form, signal: controller.signal, headers: { Accept: "text/event-stream" },
    });
    if (!response.ok) {
      showError(await errorOf(response));
      $("progress-text").textContent = "";
      return;
    }
    const type = (response.headers.get("Content-Type") || "").split(";")[0].trim();
    if (type.startsWith("image/")) { // a server without the event stream: the plain image answer
      const blob = await response.blob();
      showResult({ seed: response.headers.get("X-Seed"), request_id: response.headers.get("X-Request-ID"),
        timings_ms: serverTimings(response.headers.get("Server-Timing")) }, blob, background.imageUrl);
      setProgress(1, 1);
      return;
    }
    if (type === "application/json") {
      showAnswer(parseResult(await response.text()));
      setProgress(1, 1);
      return;
    }
    let ended = false;
    for await (const { event, data } of readEvents(response)) {
      if (event === "result") {
        const body = parseResult(data);
        setProgress(1, 1);
        $("progress-text").textContent = "Done";
        showAnswer(body);
        ended = true;
        break;
      }
      const info = JSON.parse(data);
      if (event === "queued") {
        setProgress(null);
        const text = info.position <= 1 ? "Queued: next" : `Queued: position ${info.position}`;
        $("progress-text").textContent = text;
        announce(`${text}.`);
      } else if (event === "started") {
        setProgress(null);
        $("progress-text").textContent = "Started";
        announce("Started.");
      } else if (event === "progress") {
        setProgress(info.step, info.total);
        const secs = typeof info.elapsed_s === "number" ? `, ${info.elapsed_s.toFixed(1)} s` : "";
        $("progress-text").textContent = `Step ${info.step} of ${info.total}${secs}`;
        // Announce every quarter, not every step.
        const quarter = Math.floor((4 * info.step) / info.total);
        if (quarter !== lastQuarter) {
          lastQuarter = quarter;
          announce(`Step ${info.step} of ${info.total}.`);
        }
      } else if (event === "error") {
        showError(info);
        $("progress-text").textContent = "";
        ended = true;
        break;
      }
    }
    if (!ended) {
      showError({ error: "bad_response", field: null, message: "The connection closed before the result." });
    }
  } catch (error) {
    if (controller.signal.aborted) {
      announce("Cancelled.");
      $("progress-text").textContent = "Cancelled";
      setProgress(0, 1);
    } else {
      showError({ error: "unreachable", field: null, message: `The request failed: ${error.message}` });
    }
  } finally {
    running = null;
    $("run").disabled = false;
    $("cancel").disabled = true;
  }
}

$("run").addEventListener("click", run);
$("cancel").addEventListener("click", () => running && running.abort());
$("params-reset").addEventListener("click", () => {
  resetParams();
  announce("Parameters reset to their defaults.");
});
$("seed").addEventListener("click", () => {
  const seed = $("seed").dataset.seed;
  const control = $("param-seed");
  if (!seed || !control) return;
  control.value = seed;
  announce(`Seed ${seed} is in the seed field: run again for the same image.`);
});
$("compare-slider").addEventListener("input", (event) => {
  $("compare").style.setProperty("--split", `${event.target.value}%`);
});
bindGallery();

checkHealth();
loadSpec().then(syncPlacement);
