"""The answer's image format: ``output_format`` (png, jpeg, webp) and ``output_quality`` on every surface."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.errors import InputError
from model.pipeline.result import DEMO_LABEL, GenerationResult, read_metadata
from model.spec.params import OUTPUT_FORMATS, GenerationParams
from service.cli import main
from tests.support.server import CASE_A


@pytest.fixture(scope="module")
def result() -> GenerationResult:
    image = Image.open(CASE_A / "background.png").convert("RGB")
    return GenerationResult(image, 4242, {}, 1, True)


@pytest.mark.parametrize("fmt", list(OUTPUT_FORMATS))
def test_each_format_keeps_the_seed_and_the_demo_label(result: GenerationResult, fmt: str) -> None:
    data = result.encode(fmt, 80)
    image = Image.open(io.BytesIO(data))
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert Image.MIME[image.format] == OUTPUT_FORMATS[fmt][0]
    assert read_metadata(image) == {"anydoor:seed": "4242", "anydoor:model": DEMO_LABEL}
    assert image.size == result.image.size


def test_png_is_lossless_and_quality_trades_size(result: GenerationResult) -> None:
    decoded = np.asarray(Image.open(io.BytesIO(result.encode("png"))).convert("RGB"))
    assert np.array_equal(decoded, np.asarray(result.image))
    assert len(result.encode("jpeg", 20)) < len(result.encode("jpeg", 95))
    assert len(result.encode("webp", 20)) < len(result.encode("webp", 95))
    assert result.encode("png", 1) == result.encode("png", 100)  # quality is for the lossy formats only


def test_the_spec_bounds_the_fields() -> None:
    assert GenerationParams().output_format == "png"
    for bad in ({"output_format": "gif"}, {"output_quality": 0}, {"output_quality": 101}):
        with pytest.raises(InputError) as info:
            GenerationParams(**bad)  # type: ignore[arg-type]
        assert info.value.field == next(iter(bad))


@pytest.mark.parametrize(("name", "fmt"), [("out.webp", "WEBP"), ("out.JPG", "JPEG"), ("out.png", "PNG")])
def test_generate_picks_the_format_from_the_extension(tmp_path: Path, name: str, fmt: str) -> None:
    out = tmp_path / name
    code = main(["generate", "--demo", "--reference", str(CASE_A / "reference.png"), "--background",
                 str(CASE_A / "background.png"), "--box", "40,50,160,120", "--steps", "1", "--guidance-scale", "1",
                 "--seed", "9", "--quiet", "--device", "cpu", "-o", str(out)])
    assert code == 0
    image = Image.open(out)
    assert image.format == fmt and read_metadata(image)["anydoor:seed"] == "9"


def test_an_explicit_format_wins_over_the_extension(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    assert main(["generate", "--demo", "--reference", str(CASE_A / "reference.png"), "--background",
                 str(CASE_A / "background.png"), "--box", "40,50,160,120", "--steps", "1", "--guidance-scale", "1",
                 "--quiet", "--device", "cpu", "--output-format", "jpeg", "-o", str(out)]) == 0
    assert Image.open(out).format == "JPEG"


def test_generate_writes_every_candidate_best_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    assert main(["generate", "--demo", "--reference", str(CASE_A / "reference.png"), "--background",
                 str(CASE_A / "background.png"), "--box", "40,50,160,120", "--steps", "1", "--guidance-scale", "1",
                 "--seed", "30", "--num-outputs", "3", "--quiet", "--device", "cpu", "-o", str(out)]) == 0
    files = [out, tmp_path / "out-2.png", tmp_path / "out-3.png"]
    seeds = [int(read_metadata(Image.open(f))["anydoor:seed"]) for f in files]
    assert sorted(seeds) == [30, 31, 32]
    identity = [float(line.rsplit("identity ", 1)[1].rstrip(")")) for line in capsys.readouterr().out.splitlines()
                if line.startswith("wrote")]
    assert identity == sorted(identity, reverse=True) and len(identity) == 3
