"""The request contract, as the pipeline has always named it: re-exported from :mod:`model.spec`, where every
input, parameter, placement key and limit of a request is defined once (standard library only)."""

from __future__ import annotations

from collections.abc import Sequence

from model.spec.fields import FieldSpec
from model.spec.inputs import (
    FILE_FIELDS,
    INPUT_FIELDS,
    REPEATABLE_FILES,
    GenerationInputs,
    InputField,
    parse_boxes,
)
from model.spec.params import PARAM_NAMES, SEED_MAX, GenerationParams, ParamSpec, param_specs
from model.spec.tables import params_table


def boxes_of(values: Sequence[str]) -> tuple[tuple[int, int, int, int], ...]:
    """Every box of some text values, each ``x,y,w,h`` or several joined with ``;``."""
    return tuple(box for value in values for box in parse_boxes(value))


__all__ = [
    "FILE_FIELDS", "INPUT_FIELDS", "PARAM_NAMES", "REPEATABLE_FILES", "SEED_MAX", "FieldSpec", "GenerationInputs",
    "GenerationParams", "InputField", "ParamSpec", "boxes_of", "param_specs", "params_table",
]

if __name__ == "__main__":
    print(params_table(), end="")
