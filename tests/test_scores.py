"""The result scores: identity per region (DINOv2 cosine) and the background PSNR outside the target regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.pipeline.params import GenerationInputs, GenerationParams
from model.pipeline.result import Scores
from model.pipeline.run import AnyDoorPipeline
from model.pipeline.scores import background_psnr, identity_scores, pack_targets, region_view, unpack_targets
from tests.support.server import CASE_A

BOXES = ((40, 50, 160, 120), (330, 200, 120, 150))


@pytest.fixture(scope="module")
def pipe() -> AnyDoorPipeline:
    return AnyDoorPipeline.from_pretrained(CASE_A / "model.safetensors", CASE_A / "model.yaml", device="cpu")


def independent_psnr(result: np.ndarray, background: np.ndarray, inside: np.ndarray) -> float:
    diff = result.astype(np.float64) - background.astype(np.float64)
    mse = float((diff[~inside] ** 2).mean())
    return 10 * math.log10(255**2 / mse)


def test_psnr_is_over_the_pixels_outside_the_regions_only() -> None:
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    inside = np.zeros((40, 60), dtype=bool)
    inside[5:20, 10:30] = True
    result = background.copy()
    result[inside] = 0  # whatever happens inside a region does not count
    assert background_psnr(result, background, inside) is None  # the outside is unchanged: infinite
    result[30, 50] = (result[30, 50].astype(int) + 40) % 256
    expected = independent_psnr(result, background, inside)
    assert background_psnr(result, background, inside) == pytest.approx(expected, abs=1e-9)
    assert background_psnr(result, background, np.ones((40, 60), dtype=bool)) is None  # nothing outside


def test_target_bits_round_trip() -> None:
    mask = np.random.default_rng(1).random((37, 53)) > 0.5
    bits = pack_targets(mask)
    assert bits.nbytes == math.ceil(37 * 53 / 8) and not bits.flags.writeable
    assert np.array_equal(unpack_targets(bits, (37, 53)), mask)


def test_identity_is_a_cosine_and_one_for_the_same_view() -> None:
    def embed(images: torch.Tensor) -> torch.Tensor:  # a fixed linear feature map
        return images.flatten(1) @ torch.linspace(-1, 1, images[0].numel()).reshape(-1, 1).repeat(1, 3)

    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2))
    same, other = identity_scores(embed, [a, a], [a.copy(), b])
    assert same == pytest.approx(1.0, abs=1e-6) and -1 <= other <= 1
    assert identity_scores(embed, [], []) == []


def test_region_view_pads_with_white_to_a_square() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    view = region_view(image, (10, 10, 40, 20), 16)
    assert view.shape == (16, 16, 3)
    assert (view[0] == 255).all() and (view[-1] == 255).all() and (view[8] == 0).all()


def test_every_result_carries_its_scores(pipe: AnyDoorPipeline) -> None:
    inputs = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png", boxes=BOXES)
    result = pipe.generate(inputs, GenerationParams(steps=2, seed=3))
    scores = result.scores
    assert isinstance(scores, Scores) and len(scores.identity) == 2
    assert all(-1 <= v <= 1 for v in scores.identity)
    assert scores.mean_identity == pytest.approx(sum(scores.identity) / 2)
    assert "score" in result.timings and result.timings["score"] > 0
    background = np.asarray(Image.open(CASE_A / "background.png").convert("RGB"))
    inside = np.zeros(background.shape[:2], dtype=bool)
    for x, y, w, h in result.boxes:
        inside[y:y + h, x:x + w] = True
    assert scores.background_psnr == pytest.approx(independent_psnr(np.asarray(result.image), background, inside),
                                                   abs=0.01)
    body = scores.to_dict()
    assert set(body) == {"identity", "region_identity", "background_psnr"}


def test_mask_targets_are_the_masks_regions(pipe: AnyDoorPipeline) -> None:
    inputs = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png",
                              background_mask=CASE_A / "background_mask.png")
    result = pipe.generate(inputs, GenerationParams(steps=2, seed=3))
    background = np.asarray(Image.open(CASE_A / "background.png").convert("RGB"))
    inside = np.asarray(Image.open(CASE_A / "background_mask.png").convert("L")) > 128
    assert result.scores is not None
    assert result.scores.background_psnr == pytest.approx(
        independent_psnr(np.asarray(result.image), background, inside), abs=0.01)


@pytest.mark.slow  # three generations
def test_scores_do_not_depend_on_the_batch(pipe: AnyDoorPipeline) -> None:
    """A job scored alone or next to another job gets the same numbers, up to float32 batch arithmetic."""
    params = GenerationParams(steps=2, seed=5)
    one = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png", boxes=BOXES[:1])
    two = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png", boxes=BOXES)
    alone = pipe.run([pipe.prepare(one, params)])[0]
    together = pipe.run([pipe.prepare(two, params), pipe.prepare(one, params)])[1]
    assert alone.scores is not None and together.scores is not None
    assert together.scores.identity == pytest.approx(alone.scores.identity, abs=1e-3)
    assert together.scores.background_psnr == pytest.approx(alone.scores.background_psnr, abs=0.05)


@pytest.mark.slow  # six images generated
def test_candidate_k_is_the_single_request_with_seed_plus_k(pipe: AnyDoorPipeline) -> None:
    inputs = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png", boxes=BOXES[:1])
    best = pipe.generate(inputs, GenerationParams(steps=2, seed=40, num_outputs=3))
    assert len(best.candidates) == 3 and best.candidates[0].seed == best.seed
    assert sorted(c.seed for c in best.candidates) == [40, 41, 42]
    identity = [c.scores.mean_identity for c in best.candidates if c.scores is not None]
    assert identity == sorted(identity, reverse=True)
    for candidate in best.candidates:
        single = pipe.generate(inputs, GenerationParams(steps=2, seed=candidate.seed))
        diff = np.abs(np.asarray(single.image, dtype=np.int16) - np.asarray(candidate.image, dtype=np.int16))
        assert diff.max() <= 1 and not single.candidates


def test_candidates_share_the_decoded_images(pipe: AnyDoorPipeline) -> None:
    inputs = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png", boxes=BOXES)
    jobs = pipe.prepare_candidates(inputs, GenerationParams(steps=2, seed=1, num_outputs=4))
    assert [job.seed for job in jobs] == [1, 2, 3, 4]
    assert all(job.background is jobs[0].background and job.regions is jobs[0].regions for job in jobs)
    assert len({job.noise.sum().item() for job in jobs}) == 4
