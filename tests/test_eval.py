"""``anydoor eval``: scores of a dataset written by ``anydoor batch``, or of a JSON Lines file of insertions."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.pipeline.scores import ssim
from service.cli import main
from tests.support.server import CASE_A


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    for name in ("reference", "background", "background_mask"):
        shutil.copy(CASE_A / f"{name}.png", folder / f"{name}.png")
    lines = [
        {"id": "one", "reference": "reference.png", "background": "background.png", "box": "40,50,160,120"},
        {"id": "two", "reference": ["reference.png", "reference.png"], "background": "background.png",
         "box": ["40,50,160,120", "330,200,120,150"]},
        {"id": "mask", "reference": "reference.png", "background": "background.png",
         "background_mask": "background_mask.png"},
    ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**line, "steps": 1, "guidance_scale": 1, "seed": 3}) + "\n"
                                for line in lines))
    assert main(["batch", str(manifest), "-o", str(folder / "out"), "--demo", "--quiet", "--device", "cpu"]) == 0
    return folder


def test_eval_of_a_batch_directory_writes_every_output(dataset: Path) -> None:
    out = dataset / "out"
    assert main(["eval", str(out), "--demo", "--quiet", "--device", "cpu"]) == 0
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert [line["id"] for line in report["lines"]] == ["one", "two", "mask"] and report["demo"] is True
    assert report["mean"]["lines"] == 3
    for line in report["lines"]:
        assert -1 <= line["identity"] <= 1 and line["background_psnr"] > 0 and line["ssim"] is None
    assert len(report["lines"][1]["region_identity"]) == 2
    mean = sum(line["identity"] for line in report["lines"]) / 3
    assert report["mean"]["identity"] == pytest.approx(mean, abs=1e-5)
    batch_records = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    table = (out / "eval" / "eval.md").read_text()
    assert "| one |" in table and "mean" in table and "meaningless" in table
    sheet = Image.open(out / "eval" / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.size == (640, 3 * 160)
    # The scores the batch recorded (measured in the generation batch) are the offline measurement's.
    for line in report["lines"]:
        recorded = batch_records[line["id"]]["scores"]
        assert line["region_identity"] == pytest.approx(recorded["region_identity"], abs=1e-3)
        assert line["background_psnr"] == pytest.approx(recorded["background_psnr"], abs=0.01)


def test_eval_resumes_and_takes_a_jsonl_with_ground_truth(dataset: Path) -> None:
    out = dataset / "out"
    result = out / "images" / "one.png"
    spec = dataset / "finished.jsonl"
    spec.write_text(json.dumps({"id": "gt", "reference": "reference.png", "background": "background.png",
                                "box": "40,50,160,120", "result": str(result), "ground_truth": str(result)}) + "\n")
    target = dataset / "gt-eval"
    assert main(["eval", str(spec), "-o", str(target), "--demo", "--quiet", "--device", "cpu"]) == 0
    report = json.loads((target / "eval.json").read_text())
    assert report["lines"][0]["ssim"] == pytest.approx(1.0)  # the result against itself
    before = (target / "eval.jsonl").read_text()
    assert main(["eval", str(spec), "-o", str(target), "--demo", "--quiet", "--device", "cpu"]) == 0
    assert (target / "eval.jsonl").read_text() == before  # nothing scored twice


def test_psnr_in_the_report_is_the_independent_one(dataset: Path) -> None:
    out = dataset / "out"
    if not (out / "eval" / "eval.json").exists():
        assert main(["eval", str(out), "--demo", "--quiet", "--device", "cpu"]) == 0
    line = next(r for r in json.loads((out / "eval" / "eval.json").read_text())["lines"] if r["id"] == "one")
    result = np.asarray(Image.open(out / "images" / "one.png").convert("RGB"), dtype=np.float64)
    background = np.asarray(Image.open(dataset / "background.png").convert("RGB"), dtype=np.float64)
    outside = np.ones(background.shape[:2], dtype=bool)
    outside[50:170, 40:200] = False
    mse = ((result - background)[outside] ** 2).mean()
    assert line["background_psnr"] == pytest.approx(10 * math.log10(255**2 / mse), abs=0.01)


def test_ssim_is_one_for_equal_images_and_lower_for_noise() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    noisy = np.clip(smooth.astype(int) + rng.integers(-60, 60, smooth.shape), 0, 255).astype(np.uint8)
    assert ssim(smooth, noisy) < 0.5
    # Two flat images: no variance, so only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 100.0, 140.0, (0.01 * 255) ** 2
    flat = np.full((32, 32, 3), a, dtype=np.uint8), np.full((32, 32, 3), b, dtype=np.uint8)
    assert ssim(*flat) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)
