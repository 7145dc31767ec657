"""The request contract and the structure that carries it: one spec, one error vocabulary, imports one way.

Each surface (the /predict OpenAPI schema, the ``anydoor generate`` flags, the README tables) is read off the
real thing and compared with the spec; the Cog inputs are checked in ``test_cog.py`` against the same spec.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from model.errors import CLIENT_SIDE, ErrorCode, InputError
from model.pipeline import INPUT_FIELDS, GenerationParams, param_specs
from model.pipeline.params import params_table
from service.errors import HTTP_STATUS, error_table
from service.settings import Settings, limits_table, settings_table

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FIELD_NAMES = {*(f.name for f in INPUT_FIELDS), *(s.name for s in param_specs())}


# --- the spec ----------------------------------------------------------------------------------------------------


def test_params_validate_in_one_place() -> None:
    assert GenerationParams().steps == 50 and GenerationParams(guidance_scale=2).guidance_scale == 2.0
    for kwargs, code in [({"steps": 0}, "out_of_range"), ({"steps": 2.5}, "invalid_parameter"),
                         ({"steps": True}, "invalid_parameter"), ({"sampler": "euler"}, "invalid_parameter"),
                         ({"guidance_scale": float("nan")}, "out_of_range"), ({"seed": 2**63}, "out_of_range"),
                         ({"crop_expand_ratio": 4.5}, "out_of_range"), ({"shape_control": 1}, "invalid_parameter")]:
        with pytest.raises(InputError) as info:
            GenerationParams(**kwargs)
        (name,) = kwargs
        assert (info.value.field, info.value.code) == (name, code)
        assert str(info.value).startswith(f"{name}: ")
    with pytest.raises(AttributeError):
        GenerationParams().steps = 3  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(("text", "ok"), [("20", 20), (" 20 ", 20), ("+7", 7), ("", None), ("1_0", None),
                                          ("10.0", None), ("0x10", None), ("9" * 65, None), ("２０", None)])
def test_text_parsing_is_strict(text: str, ok: int | None) -> None:
    spec = next(s for s in param_specs() if s.name == "steps")
    if ok is None:
        with pytest.raises(InputError) as info:
            spec.parse(text)
        assert info.value.field == "steps"
    else:
        assert spec.parse(text) == ok


def test_float_and_bool_text() -> None:
    specs = {s.name: s for s in param_specs()}
    assert specs["guidance_scale"].parse("4.5") == 4.5 and specs["guidance_scale"].parse("1e0") == 1.0
    for bad in ("inf", "nan", "1e999", "4,5"):
        with pytest.raises(InputError):
            specs["guidance_scale"].parse(bad)
    assert specs["shape_control"].parse("true") is True and specs["shape_control"].parse("0") is False
    with pytest.raises(InputError):
        specs["shape_control"].parse("maybe")


# --- the surfaces ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    from service.app import create_app

    return create_app(Settings(demo=True)).openapi()


def test_openapi_form_is_the_spec(openapi: dict[str, Any]) -> None:
    body = openapi["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["properties"]) == FIELD_NAMES
    assert body["required"] == [f.name for f in INPUT_FIELDS if f.required]
    for f in INPUT_FIELDS:
        assert body["properties"][f.name]["description"] == f.help
    for spec in param_specs():
        prop = body["properties"][spec.name]
        assert prop["description"] == spec.help, spec.name
        assert prop.get("default") == spec.default, spec.name
        if spec.choices:
            assert prop["enum"] == list(spec.choices)
        else:
            assert prop["type"] == {"int": "integer", "float": "number", "bool": "boolean"}[spec.kind]
        if spec.ge is not None:
            # OpenAPI's schema model stores bounds as JSON numbers (floats)
            assert (float(prop["minimum"]), float(prop["maximum"])) == (float(spec.ge), float(spec.le)), spec.name


def test_openapi_error_descriptions_come_from_the_codes(openapi: dict[str, Any]) -> None:
    responses = openapi["paths"]["/predict"]["post"]["responses"]
    for code, (status, _) in HTTP_STATUS.items():
        if str(status) in responses:
            assert f"`{code.value}`" in responses[str(status)]["description"], code
    assert set(openapi["components"]["schemas"]["ErrorBody"]["properties"]["error"]["$ref"].split("/")[-1:]) == {
        "ErrorCode"}
    assert openapi["components"]["schemas"]["ErrorCode"]["enum"] == [c.value for c in ErrorCode]


def _generate_parser() -> argparse.ArgumentParser:
    from service.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["generate"]


def test_cli_flags_are_the_spec() -> None:
    actions = {a.dest: a for a in _generate_parser()._actions}
    assert FIELD_NAMES <= set(actions)
    for spec in param_specs():
        action = actions[spec.name]
        assert action.option_strings[0] == "--" + spec.name.replace("_", "-")
        # The one exception: without --output-format, generate takes the format from -o's extension.
        assert action.default == (None if spec.name == "output_format" else spec.default), spec.name
        assert spec.help.replace("%", "%%") in (action.help or ""), spec.name
        if spec.choices:
            assert tuple(action.choices or ()) == spec.choices
    args = _generate_parser().parse_args(["--demo", "--reference", "r.png", "--background", "b.png", "--box",
                                          "1,2,30,40", "-o", "o.png", "--steps", "7", "--shape-control"])
    assert (args.steps, args.shape_control, args.box, args.reference) == (7, True, ["1,2,30,40"], ["r.png"])
    from model.cli.generate import spec_items
    from model.spec.codecs import Wire, collect
    from model.spec.limits import Limits

    raw = collect(spec_items(args), Wire.CLI, Limits())  # the flags go through the spec's codecs
    assert raw.boxes == ((1, 2, 30, 40),) and raw.files("reference") == ("r.png",)
    with pytest.raises(SystemExit):
        _generate_parser().parse_args(["--demo", "--reference", "r", "--background", "b", "-o", "o", "--steps", "0"])


def test_readme_tables_are_the_generated_ones() -> None:
    for name, table in (("parameters", params_table()), ("errors", error_table()), ("settings", settings_table()),
                        ("limits", limits_table())):
        assert table in README, f"README's {name} table is stale: paste `python -m ...` output ({name})"


# --- the error vocabulary ----------------------------------------------------------------------------------------


def _python_files(*roots: str) -> list[Path]:
    files = [p for root in roots for p in (REPO / root).rglob("*.py")]
    return files + [REPO / "predict.py"]


def test_every_code_has_a_status_and_is_raised_somewhere() -> None:
    assert set(HTTP_STATUS) | CLIENT_SIDE == set(ErrorCode) and not set(HTTP_STATUS) & CLIENT_SIDE
    used: set[str] = set()
    for path in _python_files("model", "service", "client", "anydoor_batch"):
        if path in (REPO / "model" / "errors.py", REPO / "service" / "errors.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode":
                used.add(node.attr)
    errors_py = (REPO / "service" / "errors.py").read_text()
    used |= set(re.findall(r"ServiceError\(C\.(\w+)", errors_py))
    unused = sorted({c.name for c in ErrorCode} - used)
    assert not unused, f"documented but never raised: {unused}"


def test_input_error_requires_a_code() -> None:
    with pytest.raises(TypeError):
        InputError("steps", "out_of_range", "x")  # type: ignore[arg-type]


# --- imports go one way ------------------------------------------------------------------------------------------

WEB = ("service", "fastapi", "starlette", "uvicorn", "httpx", "prometheus_client")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            names += [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return names


@pytest.mark.parametrize("path", sorted((REPO / "model").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_model_never_imports_the_web_stack(path: Path) -> None:
    bad = [name for name in _imports(path) if name.split(".")[0] in WEB]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


NETWORK = ("http.client", "urllib.request", "socket", "http.server", "ssl")
NETWORK_ALLOWED = {Path("model/weights/download.py")}  # fetching weights by URL is the one network use below the top


@pytest.mark.parametrize("path", sorted((REPO / "model").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_model_never_opens_a_network_connection(path: Path) -> None:
    """HTTP clients live in the top layer (client/, anydoor_batch/); the model only downloads weights."""
    if path.relative_to(REPO) in NETWORK_ALLOWED:
        return
    bad = [name for name in _imports(path) if any(name == n or name.startswith(n + ".") for n in NETWORK)]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: network code belongs in client/ or anydoor_batch/"


def test_the_top_layers_stay_apart() -> None:
    """client/ needs only the standard library and the request spec; anydoor_batch/ never imports the service, and
    nothing below them imports them."""
    for path in (REPO / "client").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "client" or name in (
                "model.errors", "model.spec.codecs", "model.spec.files", "model.spec.inputs", "model.spec.placement",
                "PIL"), f"{path.relative_to(REPO)} imports {name}"
    for path in (REPO / "anydoor_batch").rglob("*.py"):
        bad = [name for name in _imports(path) if name.split(".")[0] in (*WEB, "predict", "tests", "benchmarks")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    for path in [*(REPO / "model").rglob("*.py"), *(REPO / "client").rglob("*.py")]:
        bad = [name for name in _imports(path) if name.split(".")[0] == "anydoor_batch"]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    for path in (REPO / "model").rglob("*.py"):
        bad = [name for name in _imports(path) if name.split(".")[0] == "client"]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_service_imports_only_downwards() -> None:
    for path in (REPO / "service").rglob("*.py"):
        bad = [name for name in _imports(path) if name.split(".")[0] in ("predict", "tests", "benchmarks")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=REPO, timeout=120, check=True)
    return set(out.stdout.split())


def test_import_predict_loads_no_web_framework() -> None:
    loaded = _modules_after("import predict")
    assert "predict" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("fastapi", "starlette", "uvicorn")}


def test_importtime_of_predict_shows_no_web_framework() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import predict"], capture_output=True,
                         text=True, cwd=REPO, timeout=120, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "predict" in imported and not any(m.split(".")[0] in ("fastapi", "starlette") for m in imported)


def test_downloader_and_bare_model_import_without_torch() -> None:
    assert "torch" not in _modules_after("import model.weights.download")
    assert "torch" not in _modules_after("import model")
    assert "torch" in _modules_after("import model\nmodel.AnyDoorModel")  # the lazy export still works
