"""The request spec: every input, parameter, placement key and limit of a request, defined once, with one codec
per input kind and wire format. Standard library only, so light clients import it without torch or numpy.

- :mod:`.fields`: field metadata (type, default, bounds, help) and strict parsing, for parameters and placement;
- :mod:`.params`: :class:`GenerationParams`;
- :mod:`.placement`: :class:`Placement` and its JSON schema;
- :mod:`.inputs`: :data:`INPUT_FIELDS`, :class:`GenerationInputs`, boxes and the counting rules;
- :mod:`.limits`: :class:`Limits`;
- :mod:`.codecs`: decoding and encoding requests on each wire (form, JSON, CLI, Cog);
- :mod:`.files`: local file paths (CLI, manifest, Cog) checked and read.
"""

from model.spec.codecs import Wire, decode_request, encode_form, encode_json
from model.spec.inputs import INPUT_FIELDS, GenerationInputs, InputField
from model.spec.limits import Limits
from model.spec.params import PARAM_NAMES, GenerationParams, param_specs
from model.spec.placement import Placement

__all__ = [
    "INPUT_FIELDS", "PARAM_NAMES", "GenerationInputs", "GenerationParams", "InputField", "Limits", "Placement",
    "Wire", "decode_request", "encode_form", "encode_json", "param_specs",
]
