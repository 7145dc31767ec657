"""Placement: where to put N objects inside an allowed area (a road, a table top), reproducibly from a seed.

A :class:`Placement` says how many boxes, how large and how far apart; :func:`place_boxes` finds that many
non-overlapping ``(x, y, w, h)`` boxes lying wholly inside an ``(H, W)`` bool mask of the allowed area. Each
candidate box is tested in O(1) with a summed-area table (integral image) of the mask: a box is allowed when the
sum over it equals its pixel count. Boxes are drawn at random (a numpy ``Generator`` seeded with the seed, so the
same mask, placement and seed give the same boxes), a bounded number of tries per box; when the random tries miss
(a crowded or narrow area) an exhaustive map of every position where a box of the minimum size fits, built once
and updated as boxes are placed, gives the answer or proves there is none. The cost is bounded either way: no loop
runs until luck strikes.

With ``perspective`` the area is read as a ground plane seen from above the horizon: a box's size (its longer
side) grows linearly with its bottom row, from ``min_size`` for a box standing on the highest row a box of that
size can stand on, to ``max_size`` on the area's lowest row.
"""

from __future__ import annotations

import cv2
import numpy as np

from model.errors import ErrorCode, InputError
from model.imaging.regions import Box
from model.spec.placement import FIELD, Placement

RANDOM_TRIES = 200
"""Random candidate positions drawn per box before the exhaustive map is consulted."""


def _impossible(message: str) -> InputError:
    return InputError(FIELD, ErrorCode.PLACEMENT_IMPOSSIBLE, message)


# --- the algorithm --------------------------------------------------------------------------------------------


def place_boxes(area: np.ndarray, placement: Placement, seed: int, *,
                max_regions: int | None = None) -> list[Box]:
    """``placement.count`` boxes ``(x, y, w, h)`` inside ``area``, ordered top to bottom, then left to right.

    ``area`` is the (H, W) mask of allowed pixels (bool, or non-zero is allowed); every pixel of every box is
    allowed, any two boxes are at least ``min_gap`` pixels apart, and each box's longer side is within
    ``[min_size, max_size]`` (exactly the perspective size with ``perspective``). The same inputs and ``seed``
    give the same boxes. Raises :class:`InputError` on field ``placement`` with ``placement_impossible`` when the
    count is over ``max_regions``, the area is too small for the count, no box of the minimum size fits, or the
    boxes cannot all be fitted with their gap.
    """
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a Placement, got {type(placement).__name__}")
    if not isinstance(area, np.ndarray) or area.ndim != 2:
        raise InputError("placement_area", ErrorCode.INVALID_MASK, "expected an (H, W) mask of the allowed area")
    count = placement.count
    if max_regions is not None and count > max_regions:
        raise _impossible(f"count {count} is over the limit of {max_regions} regions per request")
    mask = area if area.dtype == bool else area != 0
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise _impossible("the allowed area is empty")
    cols = np.flatnonzero(mask.any(axis=0))
    # Everything works on the area's bounding box: less memory and time for an area that covers part of the image.
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0:int(rows[-1]) + 1, x0:int(cols[-1]) + 1]
    height, width = crop.shape
    w_min, h_min = placement.box_shape(placement.min_size)
    if w_min > width or h_min > height:
        raise _impossible(f"no {w_min}x{h_min} box (the minimum size) fits: the allowed area spans only "
                          f"{width}x{height} pixels")
    allowed = int(np.count_nonzero(crop))
    need = count * w_min * h_min
    if allowed < need:
        raise _impossible(f"the allowed area has {allowed} pixels, fewer than the {need} that {count} boxes of at "
                          f"least {w_min}x{h_min} cover")
    placed = _Placer(crop, placement, np.random.default_rng(seed)).place()
    return sorted(((x + x0, y + y0, w, h) for x, y, w, h in placed), key=lambda b: (b[1], b[0], b[2], b[3]))


def _integral(mask: np.ndarray) -> np.ndarray:
    """The summed-area table: ``S[y, x]`` = allowed pixels in ``mask[:y, :x]``, shape (H + 1, W + 1)."""
    height, width = mask.shape
    if height * width < 2**31:  # int32 cannot overflow; OpenCV's is ~30x faster than numpy's cumsum over bool
        return cv2.integral(mask.view(np.uint8), sdepth=cv2.CV_32S)
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    np.cumsum(mask, axis=1, dtype=np.int64, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=0, out=table[1:, 1:])
    return table


class _Placer:
    """One placement on one cropped area. Candidate *rows* describe every box a position may hold: row ``i`` has
    its top at ``top[i]`` and the size ``(bw[i], bh[i])`` (one size for all rows, the minimum, without
    perspective; the perspective size of each bottom row with it)."""

    def __init__(self, area: np.ndarray, placement: Placement, rng: np.random.Generator) -> None:
        self.height, self.width = area.shape
        self.table = _integral(area)
        self.p = placement
        self.rng = rng
        self.gap = placement.min_gap
        w_min, h_min = placement.box_shape(placement.min_size)
        if placement.perspective:
            lo, hi = h_min - 1, self.height - 1  # bottom rows: the highest a minimum box can stand on .. the lowest
            bottom = np.arange(lo, hi + 1)
            frac = (bottom - lo) / (hi - lo) if hi > lo else np.zeros(bottom.shape)
            sizes = np.rint(placement.min_size + (placement.max_size - placement.min_size) * frac).astype(np.int64)
            bw, bh = self._shapes(sizes)
            top = bottom - bh + 1
            keep = (top >= 0) & (bw <= self.width)
            self.top, self.bw, self.bh = top[keep], bw[keep], bh[keep]
        else:
            n = self.height - h_min + 1
            self.top = np.arange(n)
            self.bw, self.bh = np.full(n, w_min), np.full(n, h_min)
        self.columns = self.width - w_min + 1  # x positions of the map (narrowest box)
        # Runs of rows with the same box size, [start, stop): their tops are consecutive (one size, one row each).
        change = np.flatnonzero((np.diff(self.bw) != 0) | (np.diff(self.bh) != 0)) + 1
        self.run_start, self.run_stop = np.r_[0, change], np.r_[change, len(self.top)]
        self._pristine: np.ndarray | None = None
        self.map = np.zeros((0, 0), dtype=bool)
        self.row_counts = np.zeros(0, dtype=np.int64)

    def _shapes(self, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.p.aspect >= 1.0:
            return sizes, np.maximum(1, np.rint(sizes / self.p.aspect).astype(np.int64))
        return np.maximum(1, np.rint(sizes * self.p.aspect).astype(np.int64)), sizes

    # --- the attempts

    def place(self) -> list[Box]:
        """Random boxes (with the map as a fallback per box); if some do not fit, once more packed tightly from
        the top left at the smallest sizes, which fits as many as a greedy placement can."""
        best = 0
        for tight in (False, True):
            placed: list[Box] = []
            self._map_reset(build=tight)
            for _ in range(self.p.count):
                box = None if tight else self._random(placed)
                if box is None:
                    box = self._from_map(placed, tight)
                if box is None:
                    break
                placed.append(box)
                if self.map.size:
                    self._clear(box)
            else:
                return placed
            if not placed:
                size = "its perspective size" if self.p.perspective else "the minimum size"
                w_min, h_min = self.p.box_shape(self.p.min_size)
                raise _impossible(f"no box fits anywhere in the allowed area at {size} (at least {w_min}x{h_min})")
            best = max(best, len(placed))
        gap = f" with a gap of {self.gap} pixels" if self.gap else ""
        raise _impossible(f"only {best} of {self.p.count} boxes fit in the allowed area{gap}")

    def _random(self, placed: list[Box]) -> Box | None:
        """The first of RANDOM_TRIES random candidates that is allowed and clear of ``placed``, or None."""
        n, rng = RANDOM_TRIES, self.rng
        if self.p.perspective:
            row = rng.integers(0, len(self.top), n)
            w, h, y = self.bw[row], self.bh[row], self.top[row]
        else:
            w, h = self._shapes(rng.integers(self.p.min_size, self.p.max_size + 1, n))
            y = np.floor(rng.random(n) * np.maximum(self.height - h + 1, 0)).astype(np.int64)
        x = np.floor(rng.random(n) * np.maximum(self.width - w + 1, 0)).astype(np.int64)
        ok = (w <= self.width) & (h <= self.height)
        x1, y1 = np.minimum(x + w, self.width), np.minimum(y + h, self.height)
        s = self.table
        inside = s[y1, x1].astype(np.int64) - s[y, x1] - s[y1, x] + s[y, x]
        ok &= inside == w * h
        if placed and ok.any():
            px, py, pw, ph = (np.array(v)[:, None] for v in zip(*placed, strict=True))
            g = self.gap
            clash = (x < px + pw + g) & (px < x + w + g) & (y < py + ph + g) & (py < y + h + g)
            ok &= ~clash.any(axis=0)
        if not ok.any():
            return None
        i = int(np.argmax(ok))
        return int(x[i]), int(y[i]), int(w[i]), int(h[i])

    # --- the exhaustive map of allowed positions

    def _map_reset(self, *, build: bool) -> None:
        self.map = np.zeros((0, 0), dtype=bool)
        if build:
            self._map_build()

    def _map_build(self) -> None:
        """Every (row, x) whose box lies in the area, as a bool map, from the integral image by slices (one pass
        over the area per size, however many boxes): computed once, copied for each attempt."""
        if self._pristine is None:
            valid = np.zeros((len(self.top), self.columns), dtype=bool)
            s = self.table
            for start, stop in zip(self.run_start.tolist(), self.run_stop.tolist(), strict=True):  # a block per run
                w, h = int(self.bw[start]), int(self.bh[start])
                ya, yb = int(self.top[start]), int(self.top[stop - 1]) + 1
                xs = self.width - w + 1
                block = s[ya + h:yb + h, w:] - s[ya:yb, w:]  # in place from here: one temporary, not four
                block -= s[ya + h:yb + h, :xs]
                block += s[ya:yb, :xs]
                np.equal(block, w * h, out=valid[start:stop, :xs])
            self._pristine = valid
        self.map = self._pristine.copy()
        self.row_counts = np.count_nonzero(self.map, axis=1)

    def _clear(self, box: Box) -> None:
        """Take every position whose box would come within the gap of ``box`` off the map."""
        px, py, pw, ph = box
        g = self.gap
        # Within a run (one size w x h) the clashing positions form one rectangle: tops in
        # (py - h - g, py + ph + g) and x in (px - w - g, px + pw + g). Only the runs whose tops reach it are visited.
        h = self.bh[self.run_start]
        first = np.maximum(py - h - g + 1, self.top[self.run_start])  # clashing tops, inclusive..exclusive
        last = np.minimum(py + ph + g, self.top[self.run_stop - 1] + 1)
        for run in np.flatnonzero(first < last).tolist():
            start = int(self.run_start[run])
            r0 = start + int(first[run] - self.top[start])
            r1 = start + int(last[run] - self.top[start])
            a = max(px - int(self.bw[start]) - g + 1, 0)
            b = min(px + pw + g, self.columns)
            if a < b:
                block = self.map[r0:r1, a:b]
                self.row_counts[r0:r1] -= np.count_nonzero(block, axis=1)
                block[...] = False

    def _from_map(self, placed: list[Box], tight: bool) -> Box | None:
        """A position from the map: at random, or (``tight``) the topmost, then leftmost."""
        if not self.map.size:
            self._map_build()
            for box in placed:
                self._clear(box)
        total = int(self.row_counts.sum())
        if total == 0:
            return None
        if tight:
            candidates = np.flatnonzero(self.row_counts)
            row = int(candidates[np.argmin(self.top[candidates])])
            x = int(np.argmax(self.map[row]))
        else:
            k = int(self.rng.integers(total))
            cumulative = np.cumsum(self.row_counts)
            row = int(np.searchsorted(cumulative, k, side="right"))
            before = int(cumulative[row - 1]) if row else 0
            x = int(np.flatnonzero(self.map[row])[k - before])
        return x, int(self.top[row]), int(self.bw[row]), int(self.bh[row])
