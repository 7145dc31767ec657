"""Post-processing: the reference outputs reproduced from the reference decodes, and background preservation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_preprocess import GEOMETRIES, case_inputs, make_reference, make_target, prepare_case

from model.imaging.postprocess import PASTE_MARGIN, decoded_to_pixels, paste_back
from model.imaging.preprocess import PreparedInputs, prepare_inputs


def outside_box(prepared: PreparedInputs, shape: tuple[int, ...]) -> np.ndarray:
    outside = np.ones(shape[:2], bool)
    y1, y2, x1, x2 = (int(v) for v in prepared.tar_box_yyxx)
    outside[y1:y2, x1:x2] = False
    return outside


@pytest.mark.parity
def test_paste_back_reproduces_the_reference_output(case) -> None:
    prepared = prepare_case(case)
    background = case_inputs(case)[2]
    untouched = background.copy()
    output = paste_back(case.expected["decoded"][0].transpose(1, 2, 0), background, prepared)

    expected = case.expected["output"]
    assert output.shape == expected.shape and output.dtype == np.uint8
    # The README allows 2 levels; the same float32 ops and truncation give the identical image.
    assert np.abs(output.astype(int) - expected).max() == 0
    np.testing.assert_array_equal(expected, np.asarray(Image.open(case.dir / "expected_output.png").convert("RGB")))
    outside = outside_box(prepared, background.shape)
    np.testing.assert_array_equal(output[outside], background[outside])
    np.testing.assert_array_equal(background, untouched)  # a new image; the input is not written to


def test_paste_back_changes_only_the_box_interior(case) -> None:
    prepared = prepare_case(case)
    background = case_inputs(case)[2]
    output = paste_back(np.full((512, 512, 3), 5.0, np.float32), background, prepared)  # clips to white
    changed = (output != background).any(axis=-1)
    assert changed.any()
    assert not changed[outside_box(prepared, background.shape)].any()


def test_decoded_to_pixels_clips_and_scales() -> None:
    values = np.array([-3.0, -1.0, 0.0, 1.0, 2.5], np.float32)
    np.testing.assert_array_equal(decoded_to_pixels(values), np.array([0, 0, 127.5, 255, 255], np.float32))


def constant_decode_case(value: float, crop_expand_ratio: float = 1.5) -> tuple[np.ndarray, np.ndarray, PreparedInputs]:
    """A region in the middle of a background, and a constant decode."""
    reference, reference_mask = make_reference(50, 50, seed=0)
    background, target = make_target(200, 200, (60, 140, 60, 140), seed=0)
    prepared = prepare_inputs(reference, reference_mask, background, target, crop_expand_ratio=crop_expand_ratio)
    decoded = np.full((512, 512, 3), value, np.float32)
    return background, paste_back(decoded, background, prepared), prepared


def test_paste_back_truncates_like_upstream() -> None:
    # (x + 1) * 127.5 = 100.9: truncation gives 100 (rounding would give 101).
    background, output, prepared = constant_decode_case(100.9 / 127.5 - 1.0)
    y1, y2, x1, x2 = (int(v) for v in prepared.tar_box_yyxx)
    cy1, cy2, cx1, cx2 = (int(v) for v in prepared.tar_box_yyxx_crop)
    m = PASTE_MARGIN
    inner = output[max(y1, cy1 + m) : min(y2, cy2 - m), max(x1, cx1 + m) : min(x2, cx2 - m)]
    assert inner.size and (inner == 100).all()


def test_paste_back_keeps_the_margin() -> None:
    background, output, prepared = constant_decode_case(1.0, crop_expand_ratio=1.0)  # the crop hugs the box
    cy1, cy2, cx1, cx2 = (int(v) for v in prepared.tar_box_yyxx_crop)
    y1, y2, x1, x2 = (int(v) for v in prepared.tar_box_yyxx)
    # The crop's outer 3 pixels are never pasted, even where the box reaches them.
    margin = np.zeros(background.shape[:2], bool)
    margin[cy1:cy2, cx1:cx2] = True
    margin[cy1 + PASTE_MARGIN : cy2 - PASTE_MARGIN, cx1 + PASTE_MARGIN : cx2 - PASTE_MARGIN] = False
    np.testing.assert_array_equal(output[margin], background[margin])
    assert margin[y1:y2, x1:x2].any()  # the box does reach into the margin here
    assert (output[y1:y2, x1:x2] == 255).any()


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_paste_back_other_geometries(geometry: str) -> None:
    height, width, box = GEOMETRIES[geometry]
    reference, reference_mask = make_reference(70, 120, seed=8)
    background, target = make_target(height, width, box, seed=9)
    prepared = prepare_inputs(reference, reference_mask, background, target)
    decoded = np.random.default_rng(10).uniform(-1.2, 1.2, (512, 512, 3)).astype(np.float32)
    output = paste_back(decoded, background, prepared)
    assert output.shape == background.shape and output.dtype == np.uint8
    outside = outside_box(prepared, background.shape)
    np.testing.assert_array_equal(output[outside], background[outside])
    assert (output != background).any()


def test_paste_back_random_geometries() -> None:
    rng = np.random.default_rng(99)
    decoded = rng.uniform(-1, 1, (512, 512, 3)).astype(np.float32)
    for seed in range(30):
        height, width = (int(v) for v in rng.integers(24, 300, size=2))
        y1, x1 = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        y2, x2 = int(rng.integers(y1 + 8, height + 1)), int(rng.integers(x1 + 8, width + 1))
        reference, reference_mask = make_reference(40, 40, seed)
        background, target = make_target(height, width, (y1, y2, x1, x2), seed)
        prepared = prepare_inputs(
            reference, reference_mask, background, target, crop_expand_ratio=float(rng.uniform(1.0, 3.0))
        )
        output = paste_back(decoded, background, prepared)
        outside = outside_box(prepared, background.shape)
        assert output.shape == background.shape
        np.testing.assert_array_equal(output[outside], background[outside])


def test_paste_back_rejects_a_wrong_decode_shape(case) -> None:
    prepared = prepare_case(case)
    background = case_inputs(case)[2]
    with pytest.raises(ValueError, match="HWC"):
        paste_back(case.expected["decoded"][0], background, prepared)  # CHW, not HWC


def test_paste_back_rejects_a_foreign_background(case) -> None:
    prepared = prepare_case(case)
    with pytest.raises(ValueError, match="do not belong"):
        paste_back(np.zeros((512, 512, 3), np.float32), np.zeros((64, 64, 3), np.uint8), prepared)
