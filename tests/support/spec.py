"""Build ``(GenerationInputs, GenerationParams)`` from the pipeline's keyword style, for tests that prepare jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.pipeline import GenerationInputs, GenerationParams


def request(reference: Any, background: Any, *, reference_mask: Any = None, background_mask: Any = None,
            boxes: Sequence[tuple[int, int, int, int]] | None = None,
            **params: Any) -> tuple[GenerationInputs, GenerationParams]:
    inputs = GenerationInputs(reference, background, reference_mask, background_mask,
                              tuple(boxes) if boxes is not None else None)
    return inputs, GenerationParams(**params)
