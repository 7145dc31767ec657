"""A :class:`Job`: one validated, preprocessed request, immutable, ready to share a batch with others."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.imaging.preprocess import PreparedInputs
from model.imaging.regions import Box
from model.pipeline.params import GenerationParams

BatchKey = tuple[int, str]


@dataclass(frozen=True, eq=False)  # identity semantics: a job is hashed by object, never compared by value
class Job:
    """``len(regions)`` items of a batch. Built by :meth:`AnyDoorPipeline.prepare`; crosses threads read-only."""

    params: GenerationParams  # its seed is always set
    background: np.ndarray  # (H, W, 3) uint8, read-only
    regions: tuple[PreparedInputs, ...]
    boxes: tuple[Box, ...]  # each region's target box (x, y, w, h) in background pixels
    noise: torch.Tensor  # (R, 4, h, w) float32, on the CPU
    preprocess_s: float
    targets: np.ndarray | None = None  # the union of the target regions, packed 1 bit a pixel (scores.pack_targets)

    @property
    def seed(self) -> int:
        assert self.params.seed is not None
        return self.params.seed

    @property
    def batch_key(self) -> BatchKey:
        """Jobs run in one batch only with the same denoising schedule: the step count and the sampler."""
        return batch_key(self.params)


def batch_key(params: GenerationParams) -> BatchKey:
    return (params.steps, params.sampler)


def freeze(array: np.ndarray) -> np.ndarray:
    """``array`` made read-only (in place), for data that crosses threads."""
    array.setflags(write=False)
    return array
