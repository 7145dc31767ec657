"""The Cog predictor, served by the real Cog server (``cog`` + ``coglet`` from PyPI) on the tiny reference model.

The server is started as a Cog image starts it: ``python -m cog.server.http`` in the project root, with
``COG_PREDICT_TYPE_STUB`` taken from ``cog.yaml``. Its worker subprocess runs ``python``, so this environment's
interpreter goes first on ``PATH``. One server is shared by the module (start-up loads the weights once).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from model.pipeline import INPUT_FIELDS, param_specs
from tests.support.server import free_port

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "tests" / "fixtures" / "reference" / "case_a"
COG_YAML = yaml.safe_load((ROOT / "cog.yaml").read_text())
# The request spec's fields: the predictor must take exactly these.
PREDICT_FIELDS = (*(f.name for f in INPUT_FIELDS), *(s.name for s in param_specs()))

cog = pytest.importorskip("cog", reason="the Cog SDK is a test dependency: pip install cog==0.23.1")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


class CogServer:
    def __init__(self, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def predict(self, **inputs: Any) -> dict[str, Any]:
        # Cog hands its one prediction slot back just after answering: a request sent at once can find it busy
        # ("At capacity"), which is Cog's behaviour, not the predictor's, so wait for READY first.
        self.wait_ready()
        request = urllib.request.Request(
            self.url + "/predictions",
            data=json.dumps({"input": inputs}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # a rejected request still has a JSON body
            return json.loads(exc.read())

    def wait_ready(self, timeout: float = 30.0) -> str:
        # The slot is handed back shortly after the response, so BUSY may show for a moment.
        deadline = time.monotonic() + timeout
        while (status := self.get("/health-check")["status"]) != "READY" and time.monotonic() < deadline:
            time.sleep(0.1)
        return str(status)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("cog")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ANYDOOR_")},  # hermetic: only what is set here
        "COG_PREDICT_TYPE_STUB": COG_YAML["predict"],
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANYDOOR_WEIGHTS": str(CASE / "model.safetensors"),
        "ANYDOOR_CONFIG": str(CASE / "model.yaml"),
        "ANYDOOR_DEVICE": "cpu",
        "ANYDOOR_CACHE_DIR": str(tmp / "cache"),
        "ANYDOOR_WARMUP_STEPS": "1",
    }
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = CogServer(port, log)
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the Cog server exited with {proc.returncode}:\n{srv.logs()}")
            try:
                status = srv.get("/health-check")
                if status.get("status") in ("READY", "SETUP_FAILED", "DEFUNCT"):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        assert status is not None and status["status"] == "READY", f"{status}\n{srv.logs()}"
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
