"""Cleaner insertions: the reference-mask refiner in the pipeline, keep_background, feather and harmonize.

All off by default (the reference parity cases and the pinned bytes in test_pipeline.py hold with the defaults).
The tiny random VAE reconstructs poorly and mixes the whole latent through its attention layer, so "the
background comes back" is measured against the VAE's own round-trip error on the same pixels, as asked.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model.diffusion.samplers import SAMPLERS
from model.errors import InputError
from model.imaging.postprocess import feather_alpha, paste_back
from model.nn.mask_refine import MaskRefiner
from model.pipeline import AnyDoorPipeline, GenerationParams
from tests.conftest import REFERENCE
from tests.support.spec import request

CASE_A = REFERENCE / "case_a"
REFINER = REFERENCE / "mask_refine_a" / "mask_refine.safetensors"


@pytest.fixture(scope="module")
def pipe() -> AnyDoorPipeline:
    return AnyDoorPipeline.from_pretrained(CASE_A / "model.safetensors", CASE_A / "model.yaml", device="cpu")


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """The case's background and an ellipse target, whose box (expanded 2x) holds plenty of background."""
    background = np.asarray(Image.open(CASE_A / "background.png").convert("RGB"))
    yy, xx = np.mgrid[0:background.shape[0], 0:background.shape[1]]
    mask = ((((yy - 240) / 90) ** 2 + ((xx - 320) / 70) ** 2) < 1).astype(np.uint8) * 255
    return background, mask


def _kw(mask: np.ndarray, **params: object) -> dict[str, object]:
    base: dict[str, object] = dict(background_mask=Image.fromarray(mask), steps=3, seed=3, shape_control=True,
                                   target_box_expand_ratio=2.0)
    return {**base, **params}


def _outside_region(pipe: AnyDoorPipeline, background: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, object]:
    """Pixels in the target box but away from the (dilated) region: where keep_background keeps the scene."""
    job = pipe.prepare(*request(CASE_A / "reference.png", background, **_kw(mask)))
    prepared = job.regions[0]
    ty1, ty2, tx1, tx2 = (int(v) for v in prepared.tar_box_yyxx)
    grown = cv2.dilate(mask, np.ones((49, 49), np.uint8)) > 0  # the latent dilation (8 px cells, 1 cell) and more
    select = np.zeros(mask.shape, bool)
    select[ty1:ty2, tx1:tx2] = True
    return select & ~grown, prepared


@pytest.mark.slow
def test_keep_background_brings_the_scene_back_up_to_the_vae_round_trip(
        pipe: AnyDoorPipeline, scene: tuple[np.ndarray, np.ndarray]) -> None:
    background, mask = scene
    select, prepared = _outside_region(pipe, background, mask)
    assert select.sum() > 10_000
    # The VAE's own round trip of the crop, pasted the same way: the best any latent-space method can do.
    z = pipe.model.encode_image(torch.from_numpy(prepared.jpg).permute(2, 0, 1)[None])  # type: ignore[attr-defined]
    round_trip = paste_back(pipe.model.decode_latent(z).permute(0, 2, 3, 1).numpy()[0], background, prepared)  # type: ignore[arg-type]
    vae_error = np.abs(round_trip.astype(int) - background)[select].mean()

    plain = np.asarray(pipe(CASE_A / "reference.png", background, **_kw(mask)).image).astype(int)
    kept = np.asarray(pipe(CASE_A / "reference.png", background, **_kw(mask, keep_background=True,
                                                                        blend_start=0.0)).image).astype(int)
    kept_error = np.abs(kept - background)[select].mean()
    plain_error = np.abs(plain - background)[select].mean()
    print(f"outside the region: VAE round trip {vae_error:.1f}, kept {kept_error:.1f}, plain {plain_error:.1f} levels")
    assert kept_error <= 1.1 * vae_error and kept_error < plain_error
    inside = mask > 0
    assert np.abs(kept - background)[inside].mean() > 5  # inside the region the object is generated


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_the_last_step_lands_on_the_background_latent_outside_the_region(
        pipe: AnyDoorPipeline, scene: tuple[np.ndarray, np.ndarray], sampler: str) -> None:
    """In latent space the re-imposition is exact: after the last step, outside the region, the crop's latent."""
    background, mask = scene
    job = pipe.prepare(*request(CASE_A / "reference.png", background, **_kw(mask, keep_background=True)))
    steps = 4
    hook = pipe._keep_background([(job, 0)], [True], steps, 0, False)
    z_bg = pipe.model.encode_image(torch.from_numpy(job.regions[0].jpg).permute(2, 0, 1)[None])
    inside = torch.from_numpy(job.regions[0].mask_i8 == 1)[None, None].float()
    region = torch.nn.functional.max_pool2d(torch.nn.functional.max_pool2d(inside, 8), 3, stride=1, padding=1)
    out = SAMPLERS[sampler].sample(lambda x, t: 0.1 * x, torch.randn(1, 4, 64, 64), pipe.model.alphas_cumprod,
                                   steps, after_step=hook)
    outside = region == 0
    assert outside.sum() > 100 and torch.equal(out[outside.expand_as(out)], z_bg[outside.expand_as(z_bg)])


@pytest.mark.slow
def test_keep_background_in_a_batch_equals_alone(pipe: AnyDoorPipeline, scene: tuple[np.ndarray, np.ndarray]) -> None:
    background, mask = scene
    settings = [dict(keep_background=True, blend_start=0.5, seed=1), dict(keep_background=False, seed=2)]
    alone = [np.asarray(pipe(CASE_A / "reference.png", background, **{**_kw(mask), **s}).image, np.int16)
             for s in settings]
    jobs = [pipe.prepare(*request(CASE_A / "reference.png", background, **{**_kw(mask), **s})) for s in settings]
    together = [np.asarray(r.image, np.int16) for r in pipe.run(jobs)]
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_feather_keeps_outside_the_box_and_blends_monotonically(pipe: AnyDoorPipeline,
                                                                scene: tuple[np.ndarray, np.ndarray]) -> None:
    background, mask = scene
    hard = np.asarray(pipe(CASE_A / "reference.png", background, **_kw(mask, shape_control=False)).image)
    soft = np.asarray(pipe(CASE_A / "reference.png", background, **_kw(mask, shape_control=False,
                                                                       feather=12)).image)
    job = pipe.prepare(*request(CASE_A / "reference.png", background, **_kw(mask, shape_control=False)))
    ty1, ty2, tx1, tx2 = (int(v) for v in job.regions[0].tar_box_yyxx)
    outside = np.ones(mask.shape, bool)
    outside[ty1:ty2, tx1:tx2] = False
    assert np.array_equal(soft[outside], background[outside])  # byte-identical outside the box
    alpha = feather_alpha(ty2 - ty1, tx2 - tx1, 12)[..., None]
    box = slice(ty1, ty2), slice(tx1, tx2)
    expected = np.rint(alpha * hard[box] + (1 - alpha) * background[box]).astype(np.uint8)
    assert np.array_equal(soft[box], expected)
    # The weight rises monotonically from the edge over the feather width, then stays 1.
    row = feather_alpha(ty2 - ty1, tx2 - tx1, 12)[(ty2 - ty1) // 2]
    assert np.all(np.diff(row[: (tx2 - tx1) // 2]) >= 0) and row[0] < 0.1 and row[12] == 1.0


@pytest.mark.slow
def test_harmonize_is_reproducible_and_zero_is_off(pipe: AnyDoorPipeline,
                                                   scene: tuple[np.ndarray, np.ndarray]) -> None:
    background, mask = scene
    off = pipe(CASE_A / "reference.png", background, **_kw(mask)).to_png()
    assert pipe(CASE_A / "reference.png", background, **_kw(mask, harmonize=0.0)).to_png() == off
    once = pipe(CASE_A / "reference.png", background, **_kw(mask, harmonize=0.3, feather=4)).to_png()
    again = pipe(CASE_A / "reference.png", background, **_kw(mask, harmonize=0.3, feather=4)).to_png()
    assert once == again and once != off


def test_refinement_needs_the_refiner_and_changes_the_mask(pipe: AnyDoorPipeline) -> None:
    with pytest.raises(InputError) as info:
        pipe.prepare(*request(CASE_A / "reference.png", CASE_A / "background.png",
                              background_mask=CASE_A / "background_mask.png", refine_reference_mask=True))
    assert (info.value.field, info.value.code) == ("refine_reference_mask", "refiner_unavailable")

    refined = AnyDoorPipeline(pipe.model, mask_refiner=MaskRefiner.from_checkpoint(REFINER, device="cpu"))
    args = dict(background_mask=CASE_A / "background_mask.png", seed=1)
    plain = refined.prepare(*request(CASE_A / "reference.png", CASE_A / "background.png", **args))
    fixed = refined.prepare(*request(CASE_A / "reference.png", CASE_A / "background.png", refine_reference_mask=True,
                                     **args))
    # The random refiner redraws the object's mask, so the object's crop for DINOv2 differs.
    assert not np.array_equal(plain.regions[0].ref_u8, fixed.regions[0].ref_u8)
    assert GenerationParams().refine_reference_mask is False


# --- one reference per region, placement (the pipeline side; the batch tool is tests/test_batch.py) -------------


def test_each_region_gets_its_own_reference(pipe: AnyDoorPipeline) -> None:
    """Two boxes, two distinguishable references: region k is conditioned on reference k (its DINOv2 crop)."""
    red = np.zeros((64, 64, 4), np.uint8)
    red[16:48, 16:48] = (255, 0, 0, 255)
    blue = np.zeros((64, 64, 4), np.uint8)
    blue[8:56, 24:40] = (0, 0, 255, 255)
    boxes = [(40, 40, 120, 120), (400, 260, 120, 160)]
    job = pipe.prepare(*request([Image.fromarray(red), Image.fromarray(blue)], CASE_A / "background.png",
                                boxes=boxes, seed=1))
    first, second = (region.ref_u8.reshape(-1, 3).astype(int) for region in job.regions)
    object_first, object_second = first[(first != 255).any(1)], second[(second != 255).any(1)]
    assert object_first[:, 0].mean() > 200 and object_first[:, 2].mean() < 50  # red in region 1
    assert object_second[:, 2].mean() > 200 and object_second[:, 0].mean() < 50  # blue in region 2
    # One reference still serves every region; a count that matches neither is refused.
    assert len(pipe.prepare(*request(Image.fromarray(red), CASE_A / "background.png", boxes=boxes)).regions) == 2
    with pytest.raises(InputError) as info:
        pipe.prepare(*request([Image.fromarray(red)] * 3, CASE_A / "background.png", boxes=boxes))
    assert (info.value.field, info.value.code) == ("reference", "reference_count_mismatch")
    with pytest.raises(InputError) as info:
        pipe.prepare(*request([Image.fromarray(red)] * 2, CASE_A / "background.png", boxes=boxes,
                              reference_mask=[None]))
    assert (info.value.field, info.value.code) == ("reference_mask", "reference_count_mismatch")


@pytest.mark.slow
def test_placement_draws_reproducible_boxes_inside_the_area(pipe: AnyDoorPipeline) -> None:
    from model.imaging.placement import Placement

    area = np.zeros((480, 640), np.uint8)
    area[240:, :] = 255  # the lower half: "the road"
    placement = Placement(count=3, min_size=40, max_size=90, perspective=True, min_gap=8)
    args = dict(placement=placement, placement_area=Image.fromarray(area), steps=1, guidance_scale=1.0, seed=9)
    first = pipe(CASE_A / "reference.png", CASE_A / "background.png", **args)
    again = pipe(CASE_A / "reference.png", CASE_A / "background.png", **args)
    assert first.boxes == again.boxes and len(first.boxes) == 3 and first.to_png() == again.to_png()
    for _, y, w, h in first.boxes:
        assert y >= 240 and 40 <= max(w, h) <= 90
    with pytest.raises(InputError) as info:
        pipe(CASE_A / "reference.png", CASE_A / "background.png",
             **{**args, "placement": Placement(count=8, min_size=200, max_size=240)})
    assert (info.value.field, info.value.code) == ("placement", "placement_impossible")
