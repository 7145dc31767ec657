// The image editors: an image, a mask brushed over it and, on the background, target boxes and the placement
// area (one rectangle where the service may place the objects itself). Every edit is an operation; the mask,
// the boxes and the area are rebuilt from them, so undo is "drop the last".

import { $, announce } from "./api.js";

const MASK_TINT = "rgb(255, 48, 96)";
const BOX_COLOR = "rgb(0, 200, 255)";
const AREA_COLOR = "rgb(255, 200, 0)";

// The editor the keys ([, ], Ctrl+Z) act on: the one last pointed at or focused (the background at first).
export let activeEditor = null;

export class Editor {
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
    this.area = null; // the placement area {x, y, w, h}, or null
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
      ? "Background: drag boxes or a placement area, or brush where the object goes"
      : "Reference: brush over the object");
  }

  // The tool bar: tool choice, brush size, mask opacity, zoom, undo, clear, a mask from a file.
  buildTools(tools) {
    const k = this.kind;
    const toolChoices = (this.allowBoxes ? [["box", "Box"], ["area", "Placement area"]] : [])
      .concat([["brush", "Brush"], ["erase", "Eraser"]]);
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

  removeArea() {
    this.push({ type: "remove-area" });
  }

  // Replay the operations into the mask layer and the box list.
  rebuild() {
    const ctx = this.layer.getContext("2d");
    ctx.clearRect(0, 0, this.layer.width, this.layer.height);
    let boxes = [];
    let area = null;
    this.maskUsed = false;
    for (const op of this.ops) {
      if (op.type === "clear") {
        ctx.clearRect(0, 0, this.layer.width, this.layer.height);
        boxes = [];
        area = null;
        this.maskUsed = false;
      } else if (op.type === "box") {
        boxes.push(op);
      } else if (op.type === "area") {
        area = op; // one area: a new one replaces the last
      } else if (op.type === "remove-area") {
        area = null;
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
    this.area = area;
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
    if (this.area) this.drawArea(this.area);
    this.boxes.forEach((op, i) => this.drawBox(op, String(i + 1)));
    if (this.drag && this.drag.type === "box-draft") this.drawBox(this.drag, "");
    if (this.drag && this.drag.type === "area-draft") this.drawArea(this.drag);
    if (this.pointer && (this.tool === "brush" || this.tool === "erase")) {
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

  // The placement area: a dashed rectangle, lightly filled, labelled.
  drawArea(area) {
    const { ctx } = this;
    const line = ctx.lineWidth;
    ctx.save();
    ctx.strokeStyle = AREA_COLOR;
    ctx.fillStyle = "rgba(255, 200, 0, 0.12)";
    ctx.setLineDash([line * 3, line * 2]);
    ctx.fillRect(area.x, area.y, area.w, area.h);
    ctx.strokeRect(area.x, area.y, area.w, area.h);
    ctx.fillStyle = AREA_COLOR;
    ctx.fillText("placement area", area.x + line * 2, area.y + parseInt(ctx.font, 10) + line);
    ctx.restore();
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
      if (this.tool === "box" || this.tool === "area") {
        this.drag = { type: `${this.tool}-draft`, x0: p[0], y0: p[1], x: p[0], y: p[1], w: 0, h: 0 };
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
      if (d && (d.type === "box-draft" || d.type === "area-draft")) {
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
      if (d && (d.type === "box-draft" || d.type === "area-draft")) {
        const x = Math.round(d.x), y = Math.round(d.y);
        const w = Math.round(d.x + d.w) - x, h = Math.round(d.y + d.h) - y;
        if (w >= 2 && h >= 2 && d.type === "area-draft") {
          this.push({ type: "area", x, y, w, h });
          announce(`Placement area set: ${x},${y},${w},${h}.`);
        } else if (w >= 2 && h >= 2) {
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
    if (this.allowBoxes || !activeEditor) activeEditor = this;
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

  // The placement area as a mask PNG of the image's size: white inside the rectangle, black elsewhere.
  areaBlob() {
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.fillStyle = "#fff";
    const a = this.area;
    if (a) ctx.fillRect(a.x, a.y, a.w, a.h);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}

// Does the image have transparent pixels? (Then the server uses its alpha as the object's mask.)
export function hasAlpha(image) {
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
