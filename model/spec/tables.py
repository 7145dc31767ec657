"""The README's request table, generated from the spec (``python -m model.spec.tables`` prints it)."""

from __future__ import annotations

from model.spec.inputs import INPUT_FIELDS
from model.spec.params import param_specs
from model.spec.placement import placement_specs


def params_table() -> str:
    """The Markdown table of the request fields (images, targets and parameters), as the README shows it."""
    rows = ["| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for f in INPUT_FIELDS:
        kind = {"image": "file", "boxes": "`x,y,w,h`", "placement": "JSON object"}[f.kind]
        kind += ", repeatable" if f.many else ""
        kind += ", required" if f.required else ""
        rows.append(f"| `{f.name}` | {kind} | | {f.help} |")
    for spec in param_specs():
        rows.append(_row(spec.name, spec))
    return "\n".join(rows) + "\n"


def placement_table() -> str:
    """The Markdown table of the placement object's keys."""
    rows = ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for spec in placement_specs():
        rows.append(_row(spec.name, spec))
    return "\n".join(rows) + "\n"


def _row(name: str, spec: object) -> str:
    from model.spec.fields import FieldSpec

    assert isinstance(spec, FieldSpec)
    kind = {"int": "int", "float": "float", "bool": "bool", "choice": "one of"}[spec.kind]
    bounds = spec.bounds_text()
    type_text = f"{kind} {bounds}".strip() if spec.kind != "choice" else bounds
    shown = str(spec.default).lower() if spec.kind == "bool" else spec.default
    if spec.required:
        default = "required"
    elif spec.default is None:
        default = "random" if name == "seed" and spec.owner is None else "from the request"
    else:
        default = f"`{shown}`"
    return f"| `{name}` | {type_text} | {default} | {spec.help} |"


if __name__ == "__main__":
    print(params_table(), end="")
