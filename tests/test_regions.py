"""Multi-region targets: splitting masks into regions, ROI boxes to masks, box parsing."""

from __future__ import annotations

import numpy as np
import pytest

from model.errors import InputError
from model.imaging.regions import (
    DEFAULT_MIN_REGION_AREA,
    MIN_BOX_SIDE,
    boxes_to_masks,
    parse_box,
    parse_boxes,
    split_mask,
)


def blobs(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A bool mask with the given (y1, y2, x1, x2) rectangles set."""
    mask = np.zeros(shape, bool)
    for y1, y2, x1, x2 in boxes:
        mask[y1:y2, x1:x2] = True
    return mask


def test_two_separate_blobs_give_two_masks() -> None:
    mask = blobs((100, 120), (10, 40, 60, 100), (50, 90, 5, 30))
    regions = split_mask(mask)
    assert len(regions) == 2
    np.testing.assert_array_equal(regions[0], blobs((100, 120), (10, 40, 60, 100)))  # the upper one first
    np.testing.assert_array_equal(regions[1], blobs((100, 120), (50, 90, 5, 30)))
    assert all(region.dtype == bool and region.shape == mask.shape for region in regions)
    np.testing.assert_array_equal(np.logical_or(*regions), mask)


def test_regions_are_ordered_top_to_bottom_then_left_to_right() -> None:
    mask = blobs((60, 90), (5, 20, 60, 80), (5, 20, 5, 25), (30, 50, 30, 50))
    tops_lefts = []
    for region in split_mask(mask):
        ys, xs = np.nonzero(region)
        tops_lefts.append((int(ys.min()), int(xs.min())))
    assert tops_lefts == [(5, 5), (5, 60), (30, 30)]


def test_diagonal_pixels_are_connected() -> None:
    mask = np.eye(40, dtype=bool) | np.eye(40, k=1, dtype=bool)  # a staircase: 8-connected
    assert len(split_mask(mask, min_area=10)) == 1


def test_blobs_below_min_area_are_dropped() -> None:
    mask = blobs((80, 80), (10, 30, 10, 30), (60, 63, 60, 63))  # 400 px and a 9 px speck
    regions = split_mask(mask)
    assert len(regions) == 1
    np.testing.assert_array_equal(regions[0], blobs((80, 80), (10, 30, 10, 30)))
    assert len(split_mask(mask, min_area=5)) == 2


def test_default_min_area_is_the_documented_value() -> None:
    assert DEFAULT_MIN_REGION_AREA == 64
    assert len(split_mask(blobs((40, 40), (0, 8, 0, 8)))) == 1  # exactly 64 px is kept


def test_split_accepts_uint8_masks() -> None:
    mask = blobs((50, 50), (5, 20, 5, 20), (30, 45, 30, 45)).astype(np.uint8) * 255
    assert len(split_mask(mask)) == 2


def test_region_touching_the_border_is_kept() -> None:
    mask = blobs((50, 70), (0, 50, 60, 70))
    regions = split_mask(mask)
    assert len(regions) == 1 and regions[0].sum() == 500


def test_empty_mask_is_rejected() -> None:
    with pytest.raises(InputError) as excinfo:
        split_mask(np.zeros((30, 30), bool))
    assert (excinfo.value.field, excinfo.value.code) == ("background_mask", "empty_mask")


def test_only_specks_are_rejected() -> None:
    with pytest.raises(InputError) as excinfo:
        split_mask(blobs((30, 30), (1, 4, 1, 4), (20, 22, 20, 22)), field="mask")
    assert (excinfo.value.field, excinfo.value.code) == ("mask", "mask_too_small")
    assert "9" in excinfo.value.message  # the largest region's size is reported


def test_boxes_to_masks() -> None:
    masks = boxes_to_masks([(10, 20, 30, 40), (0, 0, 5, 5)], (100, 80))
    assert len(masks) == 2
    np.testing.assert_array_equal(masks[0], blobs((100, 80), (20, 60, 10, 40)))
    np.testing.assert_array_equal(masks[1], blobs((100, 80), (0, 5, 0, 5)))
    assert all(mask.dtype == bool for mask in masks)


def test_box_covering_the_whole_image_is_accepted() -> None:
    (mask,) = boxes_to_masks([(0, 0, 80, 100)], (100, 80))
    assert mask.all()


@pytest.mark.parametrize(
    "box, code",
    [
        ((-1, 0, 10, 10), "box_out_of_image"),
        ((0, -5, 10, 10), "box_out_of_image"),
        ((75, 0, 10, 10), "box_out_of_image"),  # x + w = 85 > 80
        ((0, 95, 10, 10), "box_out_of_image"),
        ((500, 500, 10, 10), "box_out_of_image"),
        ((0, 0, 0, 10), "invalid_box"),
        ((0, 0, 10, -3), "invalid_box"),
        ((0, 0, MIN_BOX_SIDE - 1, 10), "invalid_box"),
        ((0, 0, 10), "invalid_box"),
        ((0, 0, 10, 10, 1), "invalid_box"),
        ((0, 0, 10.5, 10), "invalid_box"),
        ((0, True, 10, 10), "invalid_box"),
        ("0,0,10,10", "invalid_box"),
        (None, "invalid_box"),
    ],
)
def test_bad_boxes_are_rejected(box: object, code: str) -> None:
    with pytest.raises(InputError) as excinfo:
        boxes_to_masks([(1, 1, 10, 10), box], (100, 80))  # type: ignore[list-item]
    assert (excinfo.value.field, excinfo.value.code) == ("box", code)
    assert "box 1" in excinfo.value.message


def test_no_boxes_is_rejected() -> None:
    with pytest.raises(InputError) as excinfo:
        boxes_to_masks([], (10, 10))
    assert excinfo.value.field == "box"


def test_numpy_integer_boxes_are_accepted() -> None:
    (mask,) = boxes_to_masks([tuple(np.array([1, 2, 5, 6]))], (20, 20))
    assert mask.sum() == 30


@pytest.mark.parametrize(
    "text, box",
    [("10,20,30,40", (10, 20, 30, 40)), (" 0 , 0 , 5 , 6 ", (0, 0, 5, 6)), ("+1,2,3,4", (1, 2, 3, 4))],
)
def test_parse_box(text: str, box: tuple[int, int, int, int]) -> None:
    assert parse_box(text) == box


@pytest.mark.parametrize(
    "text",
    ["", "1,2,3", "1,2,3,4,5", "a,b,c,d", "1.5,2,3,4", "1,2,0,4", "1,2,3,-4", "-1,2,3,4", "1;2;3;4", "1,,3,4"],
)
def test_parse_box_rejects(text: str) -> None:
    with pytest.raises(InputError) as excinfo:
        parse_box(text)
    assert (excinfo.value.field, excinfo.value.code) == ("box", "invalid_box")


def test_parse_boxes() -> None:
    assert parse_boxes("1,2,3,4; 5,6,7,8;") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    with pytest.raises(InputError):
        parse_boxes(" ; ")
