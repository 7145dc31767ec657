"""The pipeline: the request spec (:mod:`model.spec`, re-exported by :mod:`.params`), the frozen :class:`Job`
(:mod:`.job`), the run (:mod:`.run`), its result (:mod:`.result`), the warm-up request and the loader.

The exports are lazy (PEP 562): ``import model.pipeline.params`` (the spec) loads no torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "INPUT_FIELDS": "model.spec.inputs",
    "PARAM_NAMES": "model.spec.params",
    "GenerationInputs": "model.spec.inputs",
    "GenerationParams": "model.spec.params",
    "param_specs": "model.spec.params",
    "Job": "model.pipeline.job",
    "STAGES": "model.pipeline.result",
    "TIMING_NAMES": "model.pipeline.result",
    "GenerationResult": "model.pipeline.result",
    "AnyDoorPipeline": "model.pipeline.run",
}

__all__ = ["INPUT_FIELDS", "PARAM_NAMES", "STAGES", "TIMING_NAMES", "AnyDoorPipeline", "GenerationInputs",
           "GenerationParams", "GenerationResult", "Job", "param_specs"]

if TYPE_CHECKING:
    from model.pipeline.job import Job
    from model.pipeline.result import STAGES, TIMING_NAMES, GenerationResult
    from model.pipeline.run import AnyDoorPipeline
    from model.spec.inputs import INPUT_FIELDS, GenerationInputs
    from model.spec.params import PARAM_NAMES, GenerationParams, param_specs


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
