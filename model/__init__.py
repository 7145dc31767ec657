"""AnyDoor model core: networks, diffusion, weights, imaging and the pipeline.

The exports are lazy (PEP 562), so ``import model`` costs nothing until a name is used: the downloader and the
request spec can be imported without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnyDoorConfig": "model.config",
    "load_config": "model.config",
    "released_config": "model.config",
    "tiny_config": "model.config",
    "Cancelled": "model.errors",
    "CheckpointError": "model.errors",
    "ErrorCode": "model.errors",
    "InputError": "model.errors",
    "AnyDoorModel": "model.nn.anydoor",
    "MaskRefiner": "model.nn.mask_refine",
    "AnyDoorPipeline": "model.pipeline",
    "GenerationParams": "model.pipeline",
    "GenerationResult": "model.pipeline",
    "ddim_sample": "model.diffusion.samplers",
    "ddim_timesteps": "model.diffusion.schedule",
}

__all__ = [
    "AnyDoorConfig",
    "AnyDoorModel",
    "AnyDoorPipeline",
    "Cancelled",
    "CheckpointError",
    "ErrorCode",
    "GenerationParams",
    "GenerationResult",
    "InputError",
    "MaskRefiner",
    "ddim_sample",
    "ddim_timesteps",
    "load_config",
    "released_config",
    "tiny_config",
]

if TYPE_CHECKING:
    from model.config import AnyDoorConfig, load_config, released_config, tiny_config
    from model.diffusion.samplers import ddim_sample
    from model.diffusion.schedule import ddim_timesteps
    from model.errors import Cancelled, CheckpointError, ErrorCode, InputError
    from model.nn.anydoor import AnyDoorModel
    from model.nn.mask_refine import MaskRefiner
    from model.pipeline import AnyDoorPipeline, GenerationParams, GenerationResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
