"""The warm-up request: one small synthetic generation that every network runs once before serving.

The service runs it before ``/health/ready`` turns 200 and the Cog predictor in ``setup()``, so the first real
request does not pay for lazy initialisation (CUDA context, cuDNN algorithm search, allocator growth, compilation).
"""

from __future__ import annotations

import numpy as np

from model.pipeline.params import GenerationInputs, GenerationParams


def warmup_request(steps: int) -> tuple[GenerationInputs, GenerationParams]:
    """An RGBA cut-out (alpha is the mask), a background with a gradient, one box; seed 0."""
    reference = np.full((96, 96, 4), 255, dtype=np.uint8)
    reference[..., 3] = 0
    reference[16:80, 24:72] = (200, 60, 40, 255)
    ramp = np.linspace(40, 200, 320, dtype=np.float32)
    background = np.repeat(np.repeat(ramp[None, :, None], 256, axis=0), 3, axis=2).astype(np.uint8)
    return GenerationInputs(reference, background, boxes=((96, 64, 128, 128),)), GenerationParams(steps=steps, seed=0)
