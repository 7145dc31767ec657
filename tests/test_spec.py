"""The request spec (model/spec): one description of the inputs, placement and limits, one codec per wire, and
the surfaces that use them (the CLI, the manifest, the form, the loader). Fast: no server, the demo model only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from model.errors import InputError
from model.spec.codecs import (
    FilePart,
    Wire,
    collect,
    decode_request,
    encode_form,
    encode_json,
    items_of_json,
    parse_json_object,
)
from model.spec.fields import suggest
from model.spec.files import LocalFiles
from model.spec.inputs import GenerationInputs
from model.spec.limits import Limits
from model.spec.params import GenerationParams
from model.spec.placement import MAX_COUNT, Placement, placement_schema
from service.cli import main
from tests.support.server import CASE_A, REPO

REFINER = REPO / "tests" / "fixtures" / "reference" / "mask_refine_a" / "mask_refine.safetensors"
PNG = (CASE_A / "reference.png").read_bytes()


def code_of(call: Any) -> tuple[str, str | None]:
    with pytest.raises(InputError) as info:
        call()
    return info.value.code.value, info.value.field


# --- codecs ------------------------------------------------------------------------------------------------------


def test_form_codec_round_trips_what_a_client_encodes() -> None:
    values = {"reference": [PNG, ("b.png", PNG)], "background": PNG, "box": [(1, 2, 30, 40), "50,60,30,40"],
              "steps": 7, "guidance_scale": 2.5, "shape_control": True, "seed": 2**63 - 1, "sampler": "dpmpp_2m"}
    items = encode_form(values)
    assert ("box", "1,2,30,40") in items and ("seed", str(2**63 - 1)) in items and ("shape_control", "true") in items
    form = [(n, FilePart(v[1], v[0]) if isinstance(v, tuple) else v) for n, v in items]
    inputs, params = decode_request(form, Wire.FORM)
    assert inputs.boxes == ((1, 2, 30, 40), (50, 60, 30, 40)) and inputs.references == (PNG, PNG)
    assert params == GenerationParams(steps=7, guidance_scale=2.5, shape_control=True, seed=2**63 - 1,
                                      sampler="dpmpp_2m")


def test_json_codec_takes_lists_strings_and_the_placement_object() -> None:
    body = {"reference": "r.png", "background": "b.png", "placement": {"count": 2, "min_size": 30, "max_size": 40},
            "placement_area": "a.png", "steps": 3, "seed": 5}
    inputs, params = decode_request(items_of_json(body), Wire.JSON)
    assert inputs.placement == Placement(count=2, min_size=30, max_size=40) and params.steps == 3
    for box in ([1, 2, 30, 40], [[1, 2, 30, 40]], "1,2,30,40", ["1,2,30,40"]):
        raw = collect(items_of_json({"reference": "r", "background": "b", "box": box}), Wire.JSON, Limits())
        assert raw.boxes == ((1, 2, 30, 40),), box
    again = encode_json({"reference": b"x", "background": b"y", "box": [(1, 2, 3, 4)], "steps": 3},
                        lambda field, data: f"{field}.png")
    assert again == {"reference": "reference.png", "background": "background.png", "box": ["1,2,3,4"], "steps": 3}
    # typed values in JSON: a string is not a number there
    assert code_of(lambda: decode_request(items_of_json({**body, "steps": "3"}), Wire.JSON))[0] == "invalid_parameter"


@pytest.mark.parametrize("items, expected", [
    ([("reference", "r"), ("background", "b"), ("box", "1,2,30,40"), ("stepz", "3")], ("unknown_field", "stepz")),
    ([("reference", "r"), ("background", "b")], ("missing_target", "background_mask")),
    ([("background", "b"), ("box", "1,2,30,40")], ("missing_field", "reference")),
    ([("reference", "r"), ("background", "b"), ("box", "1,2,30,40"), ("background_mask", "m")],
     ("conflicting_target", "background_mask")),
    ([("reference", "r"), ("reference", "s"), ("background", "b"), ("box", "1,2,30,40")],
     ("reference_count_mismatch", "reference")),
    ([("reference", "r"), ("reference_mask", "m"), ("reference_mask", "n"), ("background", "b"),
      ("box", "1,2,30,40")], ("reference_count_mismatch", "reference_mask")),
    ([("reference", "r"), ("background", "b"), ("box", ";".join(["1,2,30,40"] * 9))], ("too_many_regions", "box")),
    ([("reference", "r"), ("background", "b"), ("background", "c"), ("box", "1,2,30,40")],
     ("invalid_parameter", "background")),
    ([("reference", "r"), ("background", "b"), ("placement", '{"count": 1, "min_size": 8, "max_size": 9}')],
     ("missing_field", "placement_area")),
    ([("reference", "r"), ("background", "b"), ("box", "1,2,30,40"), ("steps", "9" * 5000)],
     ("field_too_long", "steps")),
])
def test_counts_and_names_are_checked_before_any_file_is_opened(items: list[tuple[str, Any]],
                                                                expected: tuple[str, str]) -> None:
    opened: list[str] = []

    def open_file(field: str, value: Any) -> Any:
        opened.append(field)
        return value

    assert code_of(lambda: decode_request(items, Wire.CLI, open_file=open_file)) == expected
    assert opened == []


def test_strict_json_refuses_duplicates_and_bad_bytes() -> None:
    assert code_of(lambda: parse_json_object('{"a": 1, "a": 2}')) == ("duplicate_key", "a")
    assert code_of(lambda: parse_json_object(b'{"a": "\xff"}'))[0] == "invalid_json"
    assert code_of(lambda: parse_json_object("[1]"))[0] == "invalid_json"
    assert code_of(lambda: Placement.from_json('{"count": 1, "count": 2, "min_size": 8, "max_size": 9}')) == (
        "duplicate_key", "placement")


def test_suggestions_ignore_case_and_match_tokens() -> None:
    known = ("reference", "reference_mask", "steps", "refine_reference_mask", "guidance_scale")
    assert suggest("STEPS", known) == "steps"
    assert suggest("refine_mask", known) == "refine_reference_mask"
    assert suggest("Guidance-Scale", known) == "guidance_scale"


# --- placement and limits in the spec -------------------------------------------------------------------------


def test_placement_is_validated_by_its_field_metadata() -> None:
    schema = placement_schema()
    assert set(schema["required"]) == {"count", "min_size", "max_size"}
    count = schema["properties"]["count"]
    assert (count["type"], count["minimum"], count["maximum"]) == ("integer", 1, MAX_COUNT)
    assert schema["properties"]["seed"]["format"] == "int64"
    assert code_of(lambda: Placement.from_dict({"count": 0, "min_size": 8, "max_size": 9})) == (
        "out_of_range", "placement")
    assert code_of(lambda: Placement.from_dict({"count": 1.0, "min_size": 8, "max_size": 9}))[0] == "invalid_parameter"


def test_limits_come_from_flags_over_the_environment() -> None:
    assert Limits() == Limits.from_env({})
    assert Limits.from_env({"ANYDOOR_MAX_REGIONS": "3"}).max_regions == 3
    assert Limits.from_env({"ANYDOOR_MAX_REGIONS": "3"}, max_regions=5).max_regions == 5
    with pytest.raises(ValueError, match="ANYDOOR_MAX_REGIONS"):
        Limits.from_env({"ANYDOOR_MAX_REGIONS": "0"})


def test_local_files_refuse_what_is_not_a_regular_file_under_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 5000)
    files = LocalFiles(tmp_path, confine=True, limits=Limits(max_upload_mb=0.001))
    assert code_of(lambda: files("reference", "big.png")) == ("payload_too_large", "reference")
    assert code_of(lambda: files("reference", str(tmp_path))) == ("not_a_file", "reference")
    assert code_of(lambda: files("reference", "../x.png")) == ("path_outside_base", "reference")
    assert code_of(lambda: files("reference", "nope.png")) == ("unreadable_file", "reference")
    assert LocalFiles()("background", big) == big.read_bytes()


# --- the surfaces ------------------------------------------------------------------------------------------------


def generate(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out.png"
    code = main(["generate", "--demo", "--reference", str(CASE_A / "reference.png"), "--background",
                 str(CASE_A / "background.png"), "--steps", "2", "--guidance-scale", "1", "--seed", "1", "--quiet",
                 "--device", "cpu", "-o", str(out), *extra])
    return code, out


def test_generate_with_the_refiner_flag_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = generate(tmp_path, "--box", "40,50,160,120", "--refine-reference-mask")
    assert code == 2 and not out.exists()
    assert "--mask-refine-weights" in capsys.readouterr().err
    code, out = generate(tmp_path, "--box", "40,50,160,120", "--refine-reference-mask", "--mask-refine-weights",
                         str(REFINER))
    assert code == 0 and Image.open(out).size == (640, 480)


NINE_BOXES = [arg for _ in range(9) for arg in ("--box", "10,10,40,40")]


def test_generate_refuses_what_the_service_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate(tmp_path, *NINE_BOXES)[0] == 2
    assert "[too_many_regions]" in capsys.readouterr().err
    assert generate(tmp_path, "--box", "1,1,30,30", "--background", "/dev/zero")[0] == 2  # the last flag wins
    assert "[not_a_file]" in capsys.readouterr().err


@pytest.mark.slow  # nine regions generated
def test_generate_takes_the_services_limit_flags(tmp_path: Path) -> None:
    code, out = generate(tmp_path, *NINE_BOXES, "--max-regions", "9")
    assert code == 0 and Image.open(out).size == (640, 480)


def test_python_api_has_the_service_limits() -> None:
    from model.pipeline.run import AnyDoorPipeline

    pipe = AnyDoorPipeline.demo(device="cpu")
    inputs = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png", boxes=((10, 10, 40, 40),) * 9)
    assert code_of(lambda: pipe.prepare(inputs, GenerationParams(steps=2)))[0] == "too_many_regions"
    assert code_of(lambda: pipe.prepare(inputs, GenerationParams(steps=2, refine_reference_mask=True),
                                        limits=Limits(max_regions=9)))[0] == "refiner_unavailable"


def test_tracked_counts_every_upload() -> None:
    from service.inference import uploaded_bytes

    inputs = GenerationInputs((b"a" * 10, b"b" * 20), b"c" * 5, (b"m" * 10, b"n" * 20), boxes=((1, 1, 9, 9),) * 2)
    assert uploaded_bytes(inputs) == 65


def test_guided_denoiser_with_mixed_scales_is_per_row_guidance() -> None:
    from model.diffusion.guidance import guided_denoiser

    torch.manual_seed(0)
    weights = torch.randn(4, 8)

    def predict(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, copies: int) -> torch.Tensor:
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) * 0.01

    cond, uncond = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([10.0, 10.0, 10.0])
    scale = torch.tensor([1.0, 3.0, 7.5])
    mixed = guided_denoiser(predict, cond, uncond, scale)(x, t)
    for row in range(3):
        one = guided_denoiser(predict, cond[row:row + 1], uncond[row:row + 1], scale[row:row + 1])(
            x[row:row + 1], t[row:row + 1])
        assert torch.allclose(mixed[row:row + 1], one, atol=1e-6), row
    del weights


def test_the_spec_imports_without_torch_or_numpy() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; sys.modules['PIL'] = None\n"
            "import model.pipeline.params, model.spec, model.spec.codecs, model.spec.files\n"
            "print(model.pipeline.params.GenerationParams(steps=3).steps)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr


@pytest.mark.parametrize("path", sorted((REPO / "model" / "spec").glob("*.py")), ids=lambda p: p.name)
def test_the_spec_uses_the_standard_library_only(path: Path) -> None:
    for node in ast.parse(path.read_text()).body:  # module level: a function may import lazily (numpy for seeds)
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name in ("model.errors",) or name.startswith(
                    "model.spec"), f"{path.name} imports {name}"


def test_openapi_publishes_the_placement_schema() -> None:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(demo=True, device="cpu"))
    schema = app.openapi()
    assert schema["components"]["schemas"]["Placement"] == placement_schema()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["placement"]["allOf"] == [{"$ref": "#/components/schemas/Placement"}]
    assert body["encoding"]["placement"] == {"contentType": "application/json"}
    json.dumps(schema)  # serialisable
