// The parameter controls, generated from the /predict form schema in openapi.json (nothing is listed here):
//
//   - each parameter with `x-group: basic` goes into the basic group, every other one into the advanced group
//     (a <details>), in the schema's order;
//   - an object field (`placement`, an `allOf` of a `$ref` to a component schema) becomes a fieldset of one
//     control per property of that component, placed where the page has a `[data-object-field]` slot for it;
//     its values are assembled into the field's JSON text;
//   - the files and the boxes are not controls: the editors make them.

import { $, apiFetch, errorOf } from "./api.js";

let paramNames = []; // the generated parameter controls, in schema order
let objectFields = {}; // object field name -> [{key, control, schema}], its generated sub-controls

// Markdown `code` in descriptions as <code>, everything else as text (never as HTML).
export function describe(el, text) {
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

// A schema with its `allOf: [{$ref}]` resolved against the document's components (the description of the
// property itself wins over the component's).
function resolve(spec, schema) {
  let out = { ...schema };
  for (const part of Array.isArray(schema.allOf) ? schema.allOf : []) {
    let target = part;
    if (typeof part.$ref === "string" && part.$ref.startsWith("#/")) {
      target = part.$ref.slice(2).split("/").reduce((node, key) => (node ? node[key] : undefined), spec) || {};
    }
    out = { ...target, ...out };
  }
  delete out.allOf;
  if (Array.isArray(out.anyOf)) out = { ...out, ...(out.anyOf.find((s) => s.type !== "null") || {}) };
  return out;
}

function isFile(schema) {
  return schema.format === "binary" || (schema.items || {}).format === "binary";
}

// One schema property as a labelled control with its description. `id` is the control's id, `name` its label
// and form name; `required` marks a property the server needs (shown in the label, no default to fill in).
function controlFor(id, name, schema, { required = false } = {}) {
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
  if (required) {
    control.setAttribute("aria-required", "true");
    const mark = document.createElement("span");
    mark.className = "hint";
    mark.textContent = " (required)";
    label.append(mark);
  } else if (!hasDefault && control.type !== "checkbox") {
    control.placeholder = "empty: left out";
  }

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

// An object field as a fieldset: one control per property of its (resolved) schema, ids `<name>-<key>`.
function objectControls(name, schema, slot) {
  const box = document.createElement("fieldset");
  box.className = "object-field";
  box.id = `${name}-fields`;
  const legend = document.createElement("legend");
  legend.textContent = name;
  const help = document.createElement("p");
  help.className = "hint";
  describe(help, schema.description);
  box.append(legend, help);
  const required = new Set(Array.isArray(schema.required) ? schema.required : []);
  const made = [];
  for (const [key, property] of Object.entries(schema.properties || {})) {
    const { field, control } = controlFor(`${name}-${key}`, key, property, { required: required.has(key) });
    control.dataset.object = name;
    box.append(field);
    made.push({ key, control, schema: property });
  }
  slot.replaceChildren(box);
  objectFields[name] = made;
}

function reset(control) {
  if (control.type === "checkbox") control.checked = control.dataset.default === "true";
  else control.value = control.dataset.default;
}

export function resetParams() {
  for (const name of paramNames) reset($(`param-${name}`));
  for (const made of Object.values(objectFields)) for (const { control } of made) reset(control);
}

export async function loadSpec() {
  const box = $("params");
  try {
    const response = await apiFetch("openapi.json", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error((await errorOf(response)).message);
    const spec = await response.json();
    const schema = spec.paths["/predict"].post.requestBody.content["multipart/form-data"].schema;
    const basic = document.createElement("div");
    basic.id = "params-basic";
    basic.className = "param-group";
    const basicTitle = document.createElement("h3");
    basicTitle.textContent = "Basic";
    basic.append(basicTitle);
    const advanced = document.createElement("details");
    advanced.id = "params-advanced";
    advanced.className = "param-group";
    const summary = document.createElement("summary");
    summary.textContent = "Advanced parameters";
    advanced.append(summary);
    paramNames = [];
    objectFields = {};
    for (const [name, raw] of Object.entries(schema.properties || {})) {
      const property = resolve(spec, raw);
      if (isFile(property) || name === "box") continue; // the images and targets: the editors make these
      const slot = document.querySelector(`[data-object-field="${name}"]`);
      if (property.type === "object" && property.properties && slot) {
        objectControls(name, property, slot);
        continue;
      }
      const { field, control } = controlFor(`param-${name}`, name, property);
      control.dataset.group = property["x-group"] === "basic" ? "basic" : "advanced";
      (control.dataset.group === "basic" ? basic : advanced).append(field);
      paramNames.push(name);
    }
    box.replaceChildren(basic, advanced);
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

// The parameters into the multipart form: a checkbox as true/false, a list once per `;`-separated value, an
// empty control left out (the server's default).
export function appendParams(form) {
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
}

const JSON_NUMBER = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$/;

// An object field's JSON text from its controls. Numbers go in as written (a 64-bit seed stays exact); text that
// is not a number goes in as a string, so the server names the key at fault; empty controls are left out.
export function objectJson(name) {
  const parts = [];
  for (const { key, control, schema } of objectFields[name] || []) {
    let literal;
    if (control.type === "checkbox") {
      literal = control.checked ? "true" : "false";
    } else {
      const text = control.value.trim();
      if (text === "") continue;
      literal = (schema.type === "integer" || schema.type === "number") && JSON_NUMBER.test(text)
        ? text : JSON.stringify(text);
    }
    parts.push(`${JSON.stringify(key)}:${literal}`);
  }
  return `{${parts.join(",")}}`;
}

// The control to point at for an error's field: a parameter, or the key of an object field that the message
// names first ("placement: count ...").
export function paramControl(field, message) {
  if (objectFields[field]) {
    const m = /^\s*(?:\w+:\s*)?([A-Za-z_][A-Za-z0-9_]*)/.exec(String(message || "").replace(`${field}:`, ""));
    const hit = m && objectFields[field].find(({ key }) => key === m[1]);
    return hit ? hit.control : $(`${field}-fields`);
  }
  return $(`param-${field}`);
}
