// AnyDoor Studio: a single page over the public API, in plain JavaScript (no build step, no other host).
//
//   GET  openapi.json   the /predict form schema: every parameter control below is generated from it
//   GET  health/ready   whether the model is loaded (shown in the header)
//   POST predict        multipart, `Accept: text/event-stream`: queued / started / progress, then result or error
//
// URLs are relative to the page's <base>, so the page also works behind a path prefix. When a request answers
// 401 the page asks for the API key once, keeps it in sessionStorage (this tab only) and sends it as
// `Authorization: Bearer <key>` on every request from then on.
"use strict";

(() => {
  const KEY_STORAGE = "anydoor.studio.apiKey";
  const $ = (id) => document.getElementById(id);

  // --- status line (an aria-live region) -----------------------------------------------------------------------

  function announce(text) {
    $("status").textContent = text;
  }

  // --- API access and the API key ------------------------------------------------------------------------------

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
  async function apiFetch(path, init = {}) {
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
  async function errorOf(response) {
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

  // --- server readiness ------------------------------------------------------------------------------------------

  let healthTimer = 0;

  async function checkHealth() {
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

  // --- the parameter form, generated from the OpenAPI schema -----------------------------------------------------

  let paramNames = []; // the generated controls, in schema order

  // Markdown `code` in descriptions as <code>, everything else as text (never as HTML).
  function describe(el, text) {
    String(text || "").split(/(`[^`]*`)/).forEach((part) => {
      if (part.startsWith("`") && part.endsWith("`") && part.length > 1) {
        const code = document.createElement("code");
        code.textContent = part.slice(1, -1);
        el.append(code);
      } else if (part) {
        el.append(document.createTextNode(part));
      }
    });
  }

  // A step for a number input: a round fraction (about 1/100) of its range, so the arrows move usefully.
  function stepFor(schema) {
    if (schema.type === "integer") return "1";
    if (typeof schema.minimum !== "number" || typeof schema.maximum !== "number") return "any";
    const range = schema.maximum - schema.minimum;
    if (!(range > 0)) return "any";
    return String(10 ** Math.floor(Math.log10(range / 100)));
  }

  // A bound as text. JSON numbers past 2^53 arrive rounded (2^63-1 reads as 9223372036854775808): name the
  // int64 limit instead of printing a wrong number.
  function bound(value, schema) {
    if (!Number.isInteger(value) || Number.isSafeInteger(value)) return String(value);
    if (schema.format === "int64" && value >= 2 ** 63 - 2 ** 11) return "2^63−1";
    return `about ${value.toExponential(3)}`;
  }

  // One schema property as a labelled control with its description; null for the images and targets.
  function controlFor(name, schema) {
    if (Array.isArray(schema.anyOf)) schema = { ...schema, ...(schema.anyOf.find((s) => s.type !== "null") || {}) };
    if (schema.format === "binary" || (schema.items || {}).format === "binary" || name === "box") return null; // the images and targets: the editors
    const id = `param-${name}`;
    const field = document.createElement("div");
    field.className = "field";
    field.dataset.name = name;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = name;
    const help = document.createElement("p");
    help.className = "hint";
    help.id = `${id}-help`;
    describe(help, schema.description);

    let control;
    if (Array.isArray(schema.enum)) {
      control = document.createElement("select");
      for (const value of schema.enum) {
        const option = document.createElement("option");
        option.value = option.textContent = String(value);
        control.append(option);
      }
    } else if (schema.type === "boolean") {
      control = document.createElement("input");
      control.type = "checkbox";
    } else if (schema.type === "integer" && schema.format === "int64") {
      // 64-bit integers (the seed) exceed what a JavaScript number holds exactly: keep them as text.
      control = document.createElement("input");
      control.type = "text";
      control.inputMode = "numeric";
      control.pattern = "[0-9]*";
      control.spellcheck = false;
    } else if (schema.type === "integer" || schema.type === "number") {
      control = document.createElement("input");
      control.type = "number";
      if (typeof schema.minimum === "number") control.min = String(schema.minimum);
      if (typeof schema.maximum === "number") control.max = String(schema.maximum);
      control.step = stepFor(schema);
    } else {
      control = document.createElement("input");
      control.type = "text";
      if (schema.type === "array") control.dataset.repeat = "true"; // sent once per `;`-separated value
    }
    control.id = id;
    control.name = name;
    control.setAttribute("aria-describedby", help.id);
    const hasDefault = schema.default !== undefined && schema.default !== null;
    control.dataset.default = hasDefault ? String(schema.default) : "";
    if (!hasDefault && control.type !== "checkbox") control.placeholder = "empty: left out";

    // The bounds and the default, after the description.
    const facts = [];
    if (typeof schema.minimum === "number" && typeof schema.maximum === "number") {
      facts.push(`${bound(schema.minimum, schema)} to ${bound(schema.maximum, schema)}`);
    }
    if (hasDefault) facts.push(`default ${schema.default}`);
    if (control.dataset.repeat) facts.push("several: separate them with ;");
    if (facts.length) help.append(document.createTextNode(` (${facts.join(", ")})`));

    if (control.type === "checkbox") {
      field.classList.add("check");
      field.append(control, label, help);
    } else {
      field.append(label, control, help);
    }
    return { field, control };
  }

  function resetParams() {
    for (const name of paramNames) {
      const control = $(`param-${name}`);
      if (control.type === "checkbox") control.checked = control.dataset.default === "true";
      else control.value = control.dataset.default;
    }
  }

  async function loadSpec() {
    const box = $("params");
    try {
      const response = await apiFetch("openapi.json", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error((await errorOf(response)).message);
      const spec = await response.json();
      const schema = spec.paths["/predict"].post.requestBody.content["multipart/form-data"].schema;
      box.replaceChildren();
      paramNames = [];
      for (const [name, property] of Object.entries(schema.properties || {})) {
        const made = controlFor(name, property);
        if (!made) continue;
        box.append(made.field);
        paramNames.push(name);
      }
      resetParams();
      document.body.dataset.spec = "loaded"; // for tests and styles: the form is ready
    } catch (error) {
      box.replaceChildren();
      const p = document.createElement("p");
      p.className = "error-text";
      p.textContent = `The parameters could not be loaded from openapi.json: ${error.message}`;
      const retry = document.createElement("button");
      retry.type = "button";
      retry.textContent = "Try again";
      retry.addEventListener("click", loadSpec);
      box.append(p, retry);
    }
  }

  // --- the image editors: an image, a mask brushed over it and (background) target boxes ----------------------

  const MASK_TINT = "rgb(255, 48, 96)";
  const BOX_COLOR = "rgb(0, 200, 255)";

  class Editor {
    constructor(root, { boxes }) {
      this.root = root;
      this.kind = root.dataset.kind;
      this.allowBoxes = boxes;
      this.canvas = root.querySelector("canvas");
      this.ctx = this.canvas.getContext("2d");
      this.wrap = root.querySelector(".canvas-wrap");
      this.file = null;
      this.image = null;
      this.imageUrl = "";
      this.width = 0;
      this.height = 0;
      // Every edit is an operation; the mask and the boxes are rebuilt from them, so undo is "drop the last".
      this.ops = [];
      this.layer = document.createElement("canvas"); // the mask at image size: white = inside, transparent = out
      this.boxes = [];
      this.maskUsed = false; // brushed, erased or loaded since the last clear: the mask is sent
      this.tool = boxes ? "box" : "brush";
      this.size = 24;
      this.opacity = 0.5;
      this.zoom = "fit";
      this.drag = null; // the box or stroke being drawn
      this.pointer = null; // where the brush outline is drawn
      this.buildTools(root.querySelector(".tools"));
      this.bindCanvas();
      this.canvas.setAttribute("aria-label", boxes
        ? "Background: drag boxes or brush where the object goes"
        : "Reference: brush over the object");
    }

    // The tool bar: tool choice, brush size, mask opacity, zoom, undo, clear, a mask from a file.
    buildTools(tools) {
      const k = this.kind;
      const toolChoices = (this.allowBoxes ? [["box", "Box"]] : []).concat([["brush", "Brush"], ["erase", "Eraser"]]);
      // Each label sits with its control (.tool); the groups wrap as the panel narrows.
      tools.innerHTML = `
        <fieldset class="tool-choice"><legend>Tool</legend>
          ${toolChoices.map(([value, text]) => `
            <label><input type="radio" name="${k}-tool" value="${value}" id="${k}-tool-${value}"> ${text}</label>`)
            .join("")}
        </fieldset>
        <span class="tool"><label for="${k}-size">Brush <output id="${k}-size-out" for="${k}-size"></output></label>
          <input id="${k}-size" type="range" min="1" max="200" step="1"></span>
        <span class="tool"><label for="${k}-opacity">Mask opacity</label>
          <input id="${k}-opacity" type="range" min="0" max="100" step="5"></span>
        <span class="tool"><label for="${k}-zoom">Zoom</label>
          <select id="${k}-zoom">
            <option value="fit">Fit</option><option value="0.25">25%</option><option value="0.5">50%</option>
            <option value="1">100%</option><option value="2">200%</option><option value="4">400%</option>
          </select></span>
        <span class="tool"><button type="button" id="${k}-undo">Undo</button>
          <button type="button" id="${k}-clear">Clear</button></span>
        <span class="tool"><label for="${k}-mask-file">Mask from a file <span class="hint">(white = inside)</span></label>
          <input id="${k}-mask-file" type="file" accept="image/png,image/jpeg,image/webp,image/gif,image/bmp"></span>`;
      tools.hidden = true;
      this.tools = tools;
      tools.querySelector(`#${k}-tool-${this.tool}`).checked = true;
      tools.querySelector(".tool-choice").addEventListener("change", (e) => this.setTool(e.target.value));
      this.sizeInput = $(`${k}-size`);
      this.sizeInput.addEventListener("input", () => this.setSize(Number(this.sizeInput.value)));
      const opacity = $(`${k}-opacity`);
      opacity.value = String(this.opacity * 100);
      opacity.addEventListener("input", () => {
        this.opacity = Number(opacity.value) / 100;
        this.draw();
      });
      const zoom = $(`${k}-zoom`);
      zoom.addEventListener("change", () => {
        this.zoom = zoom.value;
        this.applyZoom();
      });
      $(`${k}-undo`).addEventListener("click", () => this.undo());
      $(`${k}-clear`).addEventListener("click", () => this.clear());
      $(`${k}-mask-file`).addEventListener("change", (e) => {
        const file = e.target.files[0];
        if (file) this.loadMask(file).catch((err) => announce(`The mask could not be read: ${err.message}`));
        e.target.value = "";
      });
      this.setSize(this.size);
    }

    setTool(tool) {
      this.tool = tool;
      const radio = $(`${this.kind}-tool-${tool}`);
      if (radio) radio.checked = true;
      this.draw();
    }

    setSize(size) {
      const max = Number(this.sizeInput.max);
      this.size = Math.max(1, Math.min(max, Math.round(size)));
      this.sizeInput.value = String(this.size);
      $(`${this.kind}-size-out`).textContent = `${this.size} px`;
      this.draw();
    }

    async loadImage(file) {
      const url = URL.createObjectURL(file);
      const image = new Image();
      image.src = url;
      await image.decode();
      if (this.imageUrl) URL.revokeObjectURL(this.imageUrl);
      this.file = file;
      this.image = image;
      this.imageUrl = url;
      this.width = image.naturalWidth;
      this.height = image.naturalHeight;
      this.canvas.width = this.layer.width = this.width;
      this.canvas.height = this.layer.height = this.height;
      this.ops = [];
      this.sizeInput.max = String(Math.max(200, Math.round(Math.max(this.width, this.height) / 4)));
      this.setSize(Math.max(4, Math.round(Math.max(this.width, this.height) / 25)));
      this.tools.hidden = false;
      this.wrap.hidden = false;
      this.applyZoom();
      this.rebuild();
      this.root.dataset.loaded = "true";
    }

    // A mask image from a file: its bright pixels (above 128, as the server reads masks) become the mask.
    async loadMask(file) {
      if (!this.image) throw new Error("load the image first");
      const bitmap = await createImageBitmap(file);
      const canvas = document.createElement("canvas");
      canvas.width = this.width;
      canvas.height = this.height;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(bitmap, 0, 0, this.width, this.height); // a mask of another size is stretched to fit
      const data = ctx.getImageData(0, 0, this.width, this.height);
      const px = data.data;
      for (let i = 0; i < px.length; i += 4) {
        const inside = (px[i] + px[i + 1] + px[i + 2]) / 3 > 128 && px[i + 3] > 128;
        px[i] = px[i + 1] = px[i + 2] = 255;
        px[i + 3] = inside ? 255 : 0;
      }
      ctx.putImageData(data, 0, 0);
      this.push({ type: "image", canvas });
      announce(`${file.name} loaded as the ${this.kind} mask.`);
    }

    push(op) {
      this.ops.push(op);
      this.rebuild();
    }

    undo() {
      if (!this.ops.length) return;
      this.ops.pop();
      this.rebuild();
      announce("Undone.");
    }

    clear() {
      if (!this.ops.length) return;
      this.push({ type: "clear" });
      announce(`${this.kind === "background" ? "Targets" : "Mask"} cleared.`);
    }

    removeBox(op) {
      this.push({ type: "remove", op });
    }

    // Replay the operations into the mask layer and the box list.
    rebuild() {
      const ctx = this.layer.getContext("2d");
      ctx.clearRect(0, 0, this.layer.width, this.layer.height);
      let boxes = [];
      this.maskUsed = false;
      for (const op of this.ops) {
        if (op.type === "clear") {
          ctx.clearRect(0, 0, this.layer.width, this.layer.height);
          boxes = [];
          this.maskUsed = false;
        } else if (op.type === "box") {
          boxes.push(op);
        } else if (op.type === "remove") {
          boxes = boxes.filter((b) => b !== op.op);
        } else if (op.type === "stroke") {
          this.paint(ctx, op, 0);
          this.maskUsed = true;
        } else if (op.type === "image") {
          ctx.globalCompositeOperation = "source-over";
          ctx.drawImage(op.canvas, 0, 0);
          this.maskUsed = true;
        }
      }
      this.boxes = boxes;
      this.draw();
      this.root.dispatchEvent(new CustomEvent("targets-changed"));
    }

    // Draw a stroke (from point `from` on) into the mask layer: white, or erased for the eraser.
    paint(ctx, stroke, from) {
      ctx.save();
      ctx.globalCompositeOperation = stroke.erase ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = "#fff";
      ctx.lineWidth = stroke.size;
      ctx.lineCap = ctx.lineJoin = "round";
      const pts = stroke.points;
      if (pts.length === 1 || from === 0) {
        ctx.beginPath();
        ctx.arc(pts[0][0], pts[0][1], stroke.size / 2, 0, Math.PI * 2);
        ctx.fill();
      }
      ctx.beginPath();
      const start = Math.max(0, from - 1);
      ctx.moveTo(pts[start][0], pts[start][1]);
      for (let i = start + 1; i < pts.length; i++) ctx.lineTo(pts[i][0], pts[i][1]);
      ctx.stroke();
      ctx.restore();
    }

    applyZoom() {
      if (this.zoom === "fit") {
        this.canvas.style.width = "";
        this.canvas.classList.add("fit");
      } else {
        this.canvas.classList.remove("fit");
        this.canvas.style.width = `${Math.round(this.width * Number(this.zoom))}px`;
      }
    }

    // The view: image, tinted mask, boxes, the box being dragged, the brush outline.
    draw() {
      if (!this.image) return;
      const { ctx, width, height } = this;
      ctx.globalAlpha = 1;
      ctx.globalCompositeOperation = "source-over";
      ctx.clearRect(0, 0, width, height);
      ctx.drawImage(this.image, 0, 0, width, height);
      // Tint: a colour fill kept only where the mask is (destination-in), drawn at the chosen opacity.
      const tint = this.tint || (this.tint = document.createElement("canvas"));
      tint.width = width;
      tint.height = height;
      const t = tint.getContext("2d");
      t.fillStyle = MASK_TINT;
      t.fillRect(0, 0, width, height);
      t.globalCompositeOperation = "destination-in";
      t.drawImage(this.layer, 0, 0);
      ctx.globalAlpha = this.opacity;
      ctx.drawImage(tint, 0, 0);
      ctx.globalAlpha = 1;
      const line = Math.max(3, Math.round(Math.max(width, height) / 200));
      ctx.lineWidth = line;
      ctx.font = `${Math.max(12, line * 7)}px sans-serif`;
      this.boxes.forEach((op, i) => this.drawBox(op, String(i + 1)));
      if (this.drag && this.drag.type === "box-draft") this.drawBox(this.drag, "");
      if (this.pointer && this.tool !== "box") {
        ctx.strokeStyle = "#fff";
        ctx.setLineDash([line * 2, line * 2]);
        ctx.lineWidth = Math.max(1, line / 2);
        ctx.beginPath();
        ctx.arc(this.pointer[0], this.pointer[1], this.size / 2, 0, Math.PI * 2);
        ctx.stroke();
        ctx.setLineDash([]);
      }
    }

    drawBox(box, text) {
      const { ctx } = this;
      ctx.strokeStyle = BOX_COLOR;
      ctx.fillStyle = "rgba(0, 200, 255, 0.15)";
      ctx.fillRect(box.x, box.y, box.w, box.h);
      ctx.strokeRect(box.x, box.y, box.w, box.h);
      if (text) {
        ctx.fillStyle = BOX_COLOR;
        ctx.fillText(text, box.x + ctx.lineWidth * 2, box.y + parseInt(ctx.font, 10) + ctx.lineWidth);
      }
    }

    // Pointer position in image pixels (the canvas is scaled by CSS).
    at(event) {
      const rect = this.canvas.getBoundingClientRect();
      const x = ((event.clientX - rect.left) * this.width) / rect.width;
      const y = ((event.clientY - rect.top) * this.height) / rect.height;
      return [Math.max(0, Math.min(this.width, x)), Math.max(0, Math.min(this.height, y))];
    }

    bindCanvas() {
      const c = this.canvas;
      c.addEventListener("pointerdown", (event) => {
        if (!this.image || event.button !== 0) return;
        event.preventDefault();
        c.focus();
        c.setPointerCapture(event.pointerId);
        activeEditor = this;
        const p = this.at(event);
        if (this.tool === "box") {
          this.drag = { type: "box-draft", x0: p[0], y0: p[1], x: p[0], y: p[1], w: 0, h: 0 };
        } else {
          this.drag = { type: "stroke", erase: this.tool === "erase", size: this.size, points: [p] };
          this.ops.push(this.drag); // drawn incrementally while it grows; rebuilt on release
          this.paint(this.layer.getContext("2d"), this.drag, 0);
          this.maskUsed = true;
        }
        this.draw();
      });
      c.addEventListener("pointermove", (event) => {
        if (!this.image) return;
        const p = this.at(event);
        this.pointer = p;
        const d = this.drag;
        if (d && d.type === "box-draft") {
          d.x = Math.min(d.x0, p[0]);
          d.y = Math.min(d.y0, p[1]);
          d.w = Math.abs(p[0] - d.x0);
          d.h = Math.abs(p[1] - d.y0);
        } else if (d && d.type === "stroke") {
          d.points.push(p);
          this.paint(this.layer.getContext("2d"), d, d.points.length - 1);
        }
        this.draw();
      });
      const finish = () => {
        const d = this.drag;
        this.drag = null;
        if (d && d.type === "box-draft") {
          const x = Math.round(d.x), y = Math.round(d.y);
          const w = Math.round(d.x + d.w) - x, h = Math.round(d.y + d.h) - y;
          if (w >= 2 && h >= 2) {
            this.push({ type: "box", x, y, w, h });
            announce(`Box ${this.boxes.length} added: ${x},${y},${w},${h}.`);
          } else {
            this.draw();
          }
        } else if (d) {
          this.rebuild();
        }
      };
      c.addEventListener("pointerup", finish);
      c.addEventListener("pointercancel", finish);
      c.addEventListener("pointerleave", () => {
        this.pointer = null;
        this.draw();
      });
      c.addEventListener("focus", () => { activeEditor = this; });
    }

    // The mask as a white-on-black PNG of the image's size; `boxes` are painted in as filled rectangles.
    maskBlob(boxes = []) {
      const out = document.createElement("canvas");
      out.width = this.width;
      out.height = this.height;
      const ctx = out.getContext("2d");
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, out.width, out.height);
      ctx.drawImage(this.layer, 0, 0);
      ctx.fillStyle = "#fff";
      for (const b of boxes) ctx.fillRect(b.x, b.y, b.w, b.h);
      return new Promise((resolve) => out.toBlob(resolve, "image/png"));
    }
  }

  const reference = new Editor($("reference-editor"), { boxes: false });
  const background = new Editor($("background-editor"), { boxes: true });
  let activeEditor = background;

  // Does the image have transparent pixels? (Then the server uses its alpha as the object's mask.)
  function hasAlpha(image) {
    const canvas = document.createElement("canvas");
    const scale = Math.min(1, 512 / Math.max(image.naturalWidth, image.naturalHeight));
    canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
    canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
    const ctx = canvas.getContext("2d");
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] < 250) return true;
    return false;
  }

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
    if (background.maskUsed) {
      note.textContent = n
        ? `The brushed mask is sent, with the ${n} box${n > 1 ? "es" : ""} painted into it.`
        : "The brushed mask is sent as background_mask.";
    } else {
      note.textContent = n ? `${n} box${n > 1 ? "es" : ""} marked.` : "Mark at least one target.";
    }
  }

  // The list of boxes under the background, each with a Remove button (the keyboard way to edit them).
  function renderTargets() {
    const list = $("targets");
    list.replaceChildren();
    background.boxes.forEach((op, i) => {
      const li = document.createElement("li");
      li.textContent = `Box ${i + 1}: ${op.x},${op.y},${op.w},${op.h} `;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove box ${i + 1}`);
      remove.addEventListener("click", () => {
        background.removeBox(op);
        announce(`Box ${i + 1} removed.`);
        $("box-text").focus();
      });
      li.append(remove);
      list.append(li);
    });
    if (background.maskUsed) {
      const li = document.createElement("li");
      li.textContent = "A brushed mask (each separate region is a target)";
      list.append(li);
    }
    backgroundNote();
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
    if (event.key === "[" || event.key === "]") {
      const e = activeEditor;
      const factor = event.key === "]" ? 1.25 : 0.8;
      e.setSize(event.key === "]" ? Math.max(e.size + 1, e.size * factor) : Math.min(e.size - 1, e.size * factor));
      announce(`Brush size ${e.size} px.`);
      event.preventDefault();
    } else if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      activeEditor.undo();
      event.preventDefault();
    }
  });

  // --- running a prediction --------------------------------------------------------------------------------------

  let running = null; // the AbortController of the request in flight
  let resultUrl = "";

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
    for (const name of paramNames) {
      const control = $(`param-${name}`);
      if (control.type === "checkbox") {
        form.append(name, control.checked ? "true" : "false");
      } else if (control.dataset.repeat) {
        for (const value of control.value.split(";")) if (value.trim()) form.append(name, value.trim());
      } else if (control.value.trim() !== "") {
        form.append(name, control.value.trim());
      }
    }
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
  function controlOfField(field) {
    if (!field) return null;
    const direct = {
      reference: "reference-file", background: "background-file", reference_mask: "reference-canvas",
      background_mask: "background-canvas", box: "background-canvas", Authorization: "api-key",
    }[field];
    return $(direct || `param-${field}`);
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
    const control = controlOfField(field);
    if (control) control.setAttribute("aria-invalid", "true");
    announce(`Failed${field ? ` (${field})` : ""}: ${body.message}`);
  }

  // Read Server-Sent Events from a fetch() response: yields {event, data} per frame (the SSE line format:
  // "field: value" lines, a blank line ends an event, lines starting with ":" are comments).
  async function* readEvents(response) {
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

  // The JSON of a result, with its seed kept exact: seeds go up to 2^63-1, past what JSON.parse keeps.
  function parseResult(text) {
    const body = JSON.parse(text);
    const seed = /"seed"\s*:\s*(\d+)/.exec(text);
    if (seed) body.seed = seed[1];
    return body;
  }

  function base64Blob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  function showResult(body, pngBlob) {
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(pngBlob);
    $("before-image").src = background.imageUrl || resultUrl;
    $("result-image").src = resultUrl;
    const seed = String(body.seed ?? "");
    $("seed").textContent = seed || "unknown";
    $("seed").dataset.seed = seed;
    $("result-size").textContent = body.width ? `${body.width} × ${body.height}` : "";
    $("result-regions").textContent = body.regions != null
      ? `${body.regions}${body.demo ? " (demo model: a tiny random model, not AnyDoor)" : ""}` : "";
    $("result-request").textContent = body.request_id || "";
    const rows = $("timings");
    rows.replaceChildren();
    for (const [name, ms] of Object.entries(body.timings_ms || {})) {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = name;
      const td = document.createElement("td");
      td.textContent = Number(ms).toFixed(1);
      tr.append(th, td);
      rows.append(tr);
    }
    const link = $("download");
    link.href = resultUrl;
    link.download = `anydoor-${seed || "result"}.png`;
    $("result").hidden = false;
    const total = body.timings_ms && body.timings_ms.total;
    announce(`Done${total ? ` in ${(total / 1000).toFixed(1)} s` : ""}. Seed ${seed}.`);
  }

  // Timings from a Server-Timing header ("queue;dur=0.4, sample;dur=12.0"), for a plain PNG answer.
  function serverTimings(header) {
    const out = {};
    for (const item of (header || "").split(",")) {
      const [name, ...rest] = item.trim().split(";");
      const dur = rest.find((p) => p.trim().startsWith("dur="));
      if (name && dur) out[name] = Number(dur.trim().slice(4));
    }
    return out;
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
      if (type === "image/png") { // a server without the event stream: the plain PNG answer
        const blob = await response.blob();
        showResult({ seed: response.headers.get("X-Seed"), request_id: response.headers.get("X-Request-ID"),
          timings_ms: serverTimings(response.headers.get("Server-Timing")) }, blob);
        setProgress(1, 1);
        return;
      }
      if (type === "application/json") {
        const body = parseResult(await response.text());
        showResult(body, base64Blob(body.image, body.media_type || "image/png"));
        setProgress(1, 1);
        return;
      }
      let ended = false;
      for await (const { event, data } of readEvents(response)) {
        if (event === "result") {
          const body = parseResult(data);
          setProgress(1, 1);
          $("progress-text").textContent = "Done";
          showResult(body, base64Blob(body.image, body.media_type || "image/png"));
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

  checkHealth();
  loadSpec();
})();
