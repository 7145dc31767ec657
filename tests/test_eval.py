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


def test_clip_weights_add_clip_i_equal_to_hugging_faces_and_resume_adds_it(dataset: Path, tmp_path: Path) -> None:
    """--clip-weights FILE scores CLIP-I per region; its value is Hugging Face's CLIPVision cosine on the same
    views (an independent forward); lines scored before without it are scored again, the others not."""
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import save_file

    from model.imaging.decode import load_image, load_reference
    from model.imaging.preprocess import reference_view
    from model.nn.clip import CLIP_MEAN, CLIP_STD
    from model.pipeline.scores import region_view

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=224, patch_size=32,
                                           projection_dim=16, hidden_act="quick_gelu")
    clip = transformers.CLIPVisionModelWithProjection(config).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

    out = dataset / "out"
    target = tmp_path / "eval"
    if (out / "eval").exists():  # scored before without CLIP (by the tests above)
        shutil.copytree(out / "eval", target)
    else:
        assert main(["eval", str(out), "-o", str(target), "--demo", "--quiet", "--device", "cpu"]) == 0
    assert "clip_identity" not in json.loads((target / "eval.json").read_text())["mean"]
    args = ["eval", str(out), "-o", str(target), "--demo", "--quiet", "--device", "cpu"]
    assert main([*args, "--clip-weights", str(tmp_path / "clip.safetensors")]) == 0
    report = json.loads((target / "eval.json").read_text())
    line = next(r for r in report["lines"] if r["id"] == "one")

    rgb, alpha = load_reference(dataset / "reference.png", None, max_pixels=1 << 30)
    views = [reference_view(rgb, alpha, 1.3), region_view(load_image(out / "images" / "one.png", field="r",
                                                                     max_pixels=1 << 30), (40, 50, 160, 120), 224)]
    pixels = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = torch.nn.functional.normalize(clip(pixel_values=pixels).image_embeds, dim=-1)
    assert line["clip_identity"] == pytest.approx(float(a @ b), abs=1e-4)
    assert len(next(r for r in report["lines"] if r["id"] == "two")["region_clip_identity"]) == 2
    clip_values = [r["clip_identity"] for r in report["lines"]]
    assert report["mean"]["clip_identity"] == pytest.approx(sum(clip_values) / 3, abs=1e-5)
    assert "CLIP-I" in (target / "eval.md").read_text()
    before = (target / "eval.jsonl").read_text()
    assert main([*args, "--clip-weights", str(tmp_path / "clip.safetensors")]) == 0
    assert (target / "eval.jsonl").read_text() == before  # every line has it now: nothing scored again


def test_unreadable_clip_weights_exit_2_naming_the_flag(dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-clip.safetensors").write_bytes(b"not a safetensors file")
    code = main(["eval", str(dataset / "out"), "-o", str(tmp_path / "e"), "--demo", "--quiet", "--device", "cpu",
                 "--clip-weights", str(tmp_path / "not-clip.safetensors")])
    assert code == 2 and "--clip-weights" in capsys.readouterr().err
