// The result: the image beside the scene (a before/after slider), its seed, scores, timings and a download link.
// With `num_outputs` > 1 the answer's candidates (best first) show as a gallery: a radio group of buttons, one
// per candidate with its scores and seed; clicking one (or Enter / Space; the arrow keys move between them)
// chooses it, and the chosen one is what the result shows and what the link downloads.

import { $, announce, base64Blob } from "./api.js";

const FORMATS = {
  "image/png": { ext: "png", name: "PNG" },
  "image/jpeg": { ext: "jpg", name: "JPEG" },
  "image/webp": { ext: "webp", name: "WebP" },
};

let shown = []; // the answer's images: [{seed, scores, blob, url}], best first
let chosen = 0;

// Scores as short text: identity (the ranking score) and the background PSNR (null: the background is unchanged).
export function scoresText(scores) {
  if (!scores) return "";
  const parts = [];
  if (typeof scores.identity === "number") parts.push(`identity ${scores.identity.toFixed(3)}`);
  if (typeof scores.background_psnr === "number") parts.push(`background PSNR ${scores.background_psnr.toFixed(1)} dB`);
  else if (scores.background_psnr === null) parts.push("background unchanged");
  return parts.join(", ");
}

// Show an answer: `body` is the JSON answer, `blob` its image; `before` the background's URL for the slider.
export function showResult(body, blob, before) {
  for (const item of shown) URL.revokeObjectURL(item.url);
  const type = blob.type || body.media_type || "image/png";
  const candidates = Array.isArray(body.candidates) && body.candidates.length > 1 ? body.candidates : null;
  shown = candidates
    ? candidates.map((c) => ({ seed: String(c.seed), scores: c.scores, blob: base64Blob(c.image, type) }))
    : [{ seed: String(body.seed ?? ""), scores: body.scores, blob }];
  for (const item of shown) item.url = URL.createObjectURL(item.blob);
  $("before-image").src = before || shown[0].url;
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
  renderGallery();
  choose(0, { quiet: true });
  $("result").hidden = false;
  const total = body.timings_ms && body.timings_ms.total;
  const many = shown.length > 1 ? ` ${shown.length} candidates, best first; the best is shown.` : "";
  announce(`Done${total ? ` in ${(total / 1000).toFixed(1)} s` : ""}.${many} Seed ${shown[0].seed}.`);
}

function renderGallery() {
  const gallery = $("gallery");
  gallery.replaceChildren();
  $("gallery-wrap").hidden = shown.length < 2;
  if (shown.length < 2) return;
  shown.forEach((item, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "candidate";
    button.id = `candidate-${i}`;
    button.setAttribute("role", "radio");
    button.dataset.index = String(i);
    button.dataset.seed = item.seed;
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = `Candidate ${i + 1}${i === 0 ? " (best)" : ""}`;
    const facts = document.createElement("span");
    facts.className = "candidate-facts";
    const rank = document.createElement("strong");
    rank.textContent = `#${i + 1}`;
    const score = document.createElement("span");
    score.className = "candidate-scores";
    score.textContent = scoresText(item.scores) || "no scores";
    const seed = document.createElement("span");
    seed.className = "candidate-seed";
    seed.textContent = `seed ${item.seed}`;
    facts.append(rank, score, seed);
    button.append(img, facts);
    button.addEventListener("click", () => choose(i));
    gallery.append(button);
  });
}

// Choose the candidate `i`: the result, its seed, its scores and the download link become its.
export function choose(i, { quiet = false, focus = false } = {}) {
  if (!shown[i]) return;
  chosen = i;
  const item = shown[i];
  const type = item.blob.type || "image/png";
  const format = FORMATS[type] || FORMATS["image/png"];
  $("result-image").src = item.url;
  $("seed").textContent = item.seed || "unknown";
  $("seed").dataset.seed = item.seed;
  $("result-scores").textContent = scoresText(item.scores) || "—";
  $("result-candidate").textContent = shown.length > 1 ? `${i + 1} of ${shown.length}` : "";
  $("result-candidate-term").hidden = $("result-candidate").hidden = shown.length < 2;
  const link = $("download");
  link.href = item.url;
  link.type = type;
  link.download = `anydoor-${item.seed || "result"}.${format.ext}`;
  link.textContent = shown.length > 1 ? `Download candidate ${i + 1} (${format.name})` : `Download the ${format.name}`;
  document.querySelectorAll("#gallery .candidate").forEach((button, j) => {
    button.setAttribute("aria-checked", j === i ? "true" : "false");
    button.tabIndex = j === i ? 0 : -1; // one tab stop for the group; the arrow keys move inside it
    if (j === i && focus) button.focus();
  });
  if (!quiet) {
    const scores = scoresText(item.scores);
    announce(`Candidate ${i + 1} of ${shown.length} chosen: seed ${item.seed}${scores ? `, ${scores}` : ""}.`);
  }
}

// The arrow keys (and Home / End) move the choice inside the gallery, as in any radio group.
export function bindGallery() {
  $("gallery").addEventListener("keydown", (event) => {
    if (shown.length < 2) return;
    const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
    let next = null;
    if (event.key in moves) next = (chosen + moves[event.key] + shown.length) % shown.length;
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = shown.length - 1;
    if (next === null) return;
    event.preventDefault();
    choose(next, { focus: true });
  });
}
