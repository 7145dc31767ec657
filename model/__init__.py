"""AnyDoor model core: networks, weights, sampler, pre/post-processing and pipeline."""

from .anydoor import AnyDoorModel
from .config import AnyDoorConfig, load_config, released_config, tiny_config
from .errors import Cancelled, CheckpointError, InputError
from .pipeline import AnyDoorPipeline, GenerationResult
from .sampler import ddim_sample, ddim_timesteps

__all__ = [
    "AnyDoorConfig",
    "AnyDoorModel",
    "AnyDoorPipeline",
    "Cancelled",
    "CheckpointError",
    "GenerationResult",
    "InputError",
    "ddim_sample",
    "ddim_timesteps",
    "load_config",
    "released_config",
    "tiny_config",
]
