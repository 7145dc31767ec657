"""The pipeline: the request spec (:mod:`.params`), the frozen :class:`Job` (:mod:`.job`), the run
(:mod:`.run`), its result (:mod:`.result`), the warm-up request and the loader."""

from model.pipeline.job import Job
from model.pipeline.params import (
    INPUT_FIELDS,
    PARAM_NAMES,
    GenerationInputs,
    GenerationParams,
    param_specs,
)
from model.pipeline.result import STAGES, TIMING_NAMES, GenerationResult
from model.pipeline.run import AnyDoorPipeline

__all__ = [
    "INPUT_FIELDS",
    "PARAM_NAMES",
    "STAGES",
    "TIMING_NAMES",
    "AnyDoorPipeline",
    "GenerationInputs",
    "GenerationParams",
    "GenerationResult",
    "Job",
    "param_specs",
]
