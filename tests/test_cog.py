"""The Cog predictor, served by the real Cog server (``cog`` + ``coglet`` from PyPI) on the tiny reference model.

The server is started as a Cog image starts it (:mod:`tests.support.cog`: ``python -m cog.server.http`` in the
project root, with ``COG_PREDICT_TYPE_STUB`` taken from ``cog.yaml``). One server is shared by the module
(start-up loads the weights once).
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from model.pipeline import INPUT_FIELDS, param_specs
from tests.support.cog import COG_YAML, CogServer, cog_server

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "tests" / "fixtures" / "reference" / "case_a"
# The request spec's fields: the predictor must take exactly these.
PREDICT_FIELDS = (*(f.name for f in INPUT_FIELDS), *(s.name for s in param_specs()))

cog = pytest.importorskip("cog", reason="the Cog SDK is a test dependency: pip install cog==0.23.1")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    with cog_server(tmp_path_factory.mktemp("cog")) as srv:
        yield srv


def inputs(**overrides: Any) -> dict[str, Any]:
    base = {
        "reference": data_uri(CASE / "reference.png"),
        "background": data_uri(CASE / "background.png"),
        "background_mask": data_uri(CASE / "background_mask.png"),
        "steps": 2,
    }
    return {**base, **overrides}


def decode_png(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:80]
    png = base64.b64decode(uri[len(prefix) :])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return png


@pytest.mark.slow
def test_health_check_reports_setup_succeeded(server: CogServer) -> None:
    status = server.get("/health-check")
    assert status["status"] == "READY"
    assert status["setup"]["status"] == "succeeded"
    # setup() prints this as its last act; Cog routes it to the setup logs or, racing the READY switch, to the
    # server's own log, so look in both.
    deadline = time.monotonic() + 10
    while "AnyDoor ready: model.safetensors on cpu" not in status["setup"]["logs"] + server.log.read_text():
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.2)


@pytest.mark.slow
def test_prediction_succeeds_with_a_png_and_the_seed_reproduces_it(server: CogServer) -> None:
    first = server.predict(**inputs(seed=7))
    assert first["status"] == "succeeded", f"{first.get('error')}\n{server.logs()}"
    assert isinstance(first["output"], list) and len(first["output"]) == 1  # a list of files, as multi-output models
    png = decode_png(first["output"][0])
    image = Image.open(io.BytesIO(png))
    background = Image.open(CASE / "background.png")
    assert image.size == background.size and image.mode == "RGB"
    metrics = first["metrics"]
    assert metrics["seed"] == 7 and metrics["regions"] == 1
    assert set(metrics["timing"]) >= {"preprocess", "encode", "sample", "decode", "postprocess", "total"}
    assert "seed=7" in first["logs"]

    again = server.predict(**inputs(seed=7))
    assert again["status"] == "succeeded"
    assert decode_png(again["output"][0]) == png

    boxes = server.predict(**inputs(seed=7, background_mask=None, box="20,30,120,100"))
    assert boxes["status"] == "succeeded", boxes.get("error")
    assert decode_png(boxes["output"][0]) != png


@pytest.mark.slow
def test_candidates_come_back_as_a_list_best_first(server: CogServer) -> None:
    result = server.predict(**inputs(seed=20, num_outputs=2))
    assert result["status"] == "succeeded", result.get("error")
    assert len(result["output"]) == 2 and sorted(result["metrics"]["seeds"]) == [20, 21]
    identity = [s["identity"] for s in result["metrics"]["scores"]]
    assert identity == sorted(identity, reverse=True)
    single = server.predict(**inputs(seed=result["metrics"]["seeds"][0]))
    best = np.asarray(Image.open(io.BytesIO(decode_png(result["output"][0]))), dtype=np.int16)
    alone = np.asarray(Image.open(io.BytesIO(decode_png(single["output"][0]))), dtype=np.int16)
    assert np.abs(best - alone).max() <= 1


@pytest.mark.slow
def test_without_a_seed_a_random_one_is_recorded(server: CogServer) -> None:
    result = server.predict(**inputs(steps=1))
    assert result["status"] == "succeeded", result.get("error")
    assert isinstance(result["metrics"]["seed"], int)
    assert f"seed={result['metrics']['seed']}" in result["logs"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps: must be between 1 and 1000"),
        ({"reference": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "reference:"),
        ({"background_mask": None}, "background_mask: give exactly one target"),
        ({"box": "1,2,3"}, "box: expected 'x,y,w,h'"),
    ],
)
def test_invalid_input_fails_with_a_message(server: CogServer, overrides: dict[str, Any], message: str) -> None:
    result = server.predict(**{k: v for k, v in inputs(**overrides).items() if v is not None})
    assert result["status"] == "failed", result
    assert message in result["error"]
    # The worker survives a bad request.
    assert server.wait_ready() == "READY"


# --- the predictor's declared interface (what `cog build` turns into the OpenAPI schema) ---------------------


@pytest.fixture(scope="module")
def predictor_info() -> Any:
    from cog import _inspector

    module, name = COG_YAML["predict"].split(":")
    sys.path.insert(0, str(ROOT))
    try:
        return _inspector.create_predictor(Path(module).stem, name)
    finally:
        sys.path.remove(str(ROOT))


def test_inputs_are_the_spec_fields_with_its_types_bounds_defaults_and_choices(predictor_info: Any) -> None:
    fields = predictor_info.inputs
    assert sorted(fields) == sorted(PREDICT_FIELDS)
    for f in INPUT_FIELDS:
        assert fields[f.name].description == f.help
        if not f.required:
            assert fields[f.name].default is None, f.name
    for spec in param_specs():
        field = fields[spec.name]
        assert field.description == spec.help, spec.name
        assert field.default == spec.default, spec.name
        if spec.ge is not None:
            # Cog stores bounds as floats (the JSON schema's minimum/maximum).
            assert (float(field.ge), float(field.le)) == (float(spec.ge), float(spec.le)), spec.name
        if spec.choices:
            assert list(field.choices) == list(spec.choices)
    # The annotations Cog reads are the spec's types.
    import typing

    hints = typing.get_type_hints(_load_predict_module().Predictor.run)
    for spec in param_specs():
        assert spec.python_type in (hints[spec.name], *typing.get_args(hints[spec.name])), spec.name


def test_a_built_image_enforces_the_bounds(predictor_info: Any) -> None:
    from cog import _inspector

    good = {"reference": "r.png", "background": "b.png", "steps": 50}
    assert _inspector.check_input(predictor_info.inputs, good)["steps"] == 50
    with pytest.raises(ValueError, match="steps"):
        _inspector.check_input(predictor_info.inputs, {**good, "steps": 1001})


def test_cog_yaml_pins_python_and_gpu_build() -> None:
    build = COG_YAML["build"]
    assert build["gpu"] is True
    assert re.fullmatch(r"3\.\d+(\.\d+)?", build["python_version"])
    assert build["sdk_version"] == cog.__version__
    assert (ROOT / COG_YAML["predict"].split(":")[0]).is_file()


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~ \[;]", line, maxsplit=1)[0].lower().replace("_", "-")


def test_cog_requirements_match_the_project_dependencies() -> None:
    import tomllib  # Python 3.11+, as the venv, the images and Cog use

    lines = [
        line.strip()
        for line in (ROOT / COG_YAML["build"]["python_requirements"]).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {_requirement_name(x) for x in lines} == {_requirement_name(x) for x in project}
    # Same constraints as the project, except torch, pinned to the version CI tests.
    wanted = {_requirement_name(x): x.replace(" ", "") for x in project}
    for line in lines:
        if _requirement_name(line) != "torch":
            assert line.replace(" ", "") == wanted[_requirement_name(line)]
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in lines


def _load_predict_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("anydoor_cog_predict", ROOT / COG_YAML["predict"].split(":")[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_without_weights_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import SettingsError

    for name in list(os.environ):
        if name.startswith("ANYDOOR_"):
            monkeypatch.delenv(name)
    predictor = _load_predict_module().Predictor()
    with pytest.raises(SettingsError, match="set ANYDOOR_WEIGHTS"):
        predictor.setup()


def test_setup_falls_back_to_the_weights_cog_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ANYDOOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ANYDOOR_CONFIG", str(CASE / "model.yaml"))
    monkeypatch.setenv("ANYDOOR_DEVICE", "cpu")
    monkeypatch.setenv("ANYDOOR_WARMUP_STEPS", "1")
    predictor = _load_predict_module().Predictor()
    predictor.setup(weights=str(CASE / "model.safetensors"))
    assert predictor.pipe.weights_name == "model.safetensors" and not predictor.pipe.is_demo
