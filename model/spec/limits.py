"""The limits of one request, defined once: the Python API, ``anydoor generate``, ``anydoor batch``, the Cog
predictor and ``anydoor serve`` share these defaults and names, so a request refused by the service is refused
locally with the same code (and a manifest that runs locally runs remotely).

Each limit has an environment variable and a flag (``ANYDOOR_MAX_REGIONS``, ``--max-regions``); the service's
settings take their defaults and help from here (``service/settings.py``), and the CLI commands generate their
flags from the same metadata (:func:`limit_fields`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from model.errors import ErrorCode

MIB = 1024 * 1024


def _limit(default: float, env: str, flag: str, code: ErrorCode, help: str, *, minimum: float,
           metavar: str = "N") -> Any:
    return field(default=default, metadata={"env": env, "flag": flag, "code": code, "help": help,
                                            "minimum": minimum, "type": type(default), "metavar": metavar})


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make a process hold or do. Frozen; invalid values raise ValueError."""

    max_pixels: int = _limit(
        16_777_216, "ANYDOOR_MAX_PIXELS", "--max-pixels", ErrorCode.TOO_MANY_PIXELS,
        "Largest accepted image, width x height, checked from the header before decoding (decompression bombs). "
        "Queued requests hold their decoded background: budget about 4 bytes per pixel per queued request.",
        minimum=64 * 64)
    max_regions: int = _limit(
        8, "ANYDOOR_MAX_REGIONS", "--max-regions", ErrorCode.TOO_MANY_REGIONS,
        "Most target regions in one request (boxes, a placement's count, separate regions of a mask, or "
        "references), counted before anything is built for them: each costs a full generation.", minimum=1)
    max_upload_mb: float = _limit(
        20.0, "ANYDOOR_MAX_UPLOAD_MB", "--max-upload-mb", ErrorCode.PAYLOAD_TOO_LARGE,
        "Largest accepted file per image field, in MiB (413 above). The whole request body may be at most 4 times "
        "this plus 1 MiB.", minimum=0.001, metavar="MIB")
    max_field_chars: int = _limit(
        4096, "ANYDOOR_MAX_FIELD_CHARS", "--max-field-chars", ErrorCode.FIELD_TOO_LONG,
        "Longest text field (a parameter, the boxes, the placement) in characters.", minimum=64)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.metadata["type"]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if isinstance(value, bool) or not isinstance(value, kind) or not value >= f.metadata["minimum"] \
                    or value == float("inf"):
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{f.metadata['env']}: expected {what} of at least {f.metadata['minimum']:g}, "
                                 f"got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: float | None) -> Limits:
        """Defaults, then the ``ANYDOOR_MAX_*`` environment variables, then ``overrides`` that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"], "").strip()
            if raw:
                try:
                    values[f.name] = f.metadata["type"](raw.replace("_", ""))
                except ValueError:
                    raise ValueError(f"{f.metadata['env']}: expected a number, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Limits:
        return replace(self, **changes)


def limit_fields() -> tuple[Any, ...]:
    """The dataclass fields of :class:`Limits`, with their metadata (env, flag, code, help)."""
    return fields(Limits)


def add_limit_arguments(parser: Any) -> None:
    """One ``--max-*`` flag per limit (argparse), defaulting to the environment variable, then the default."""
    for f in fields(Limits):
        parser.add_argument(f.metadata["flag"], dest=f.name, type=f.metadata["type"], default=None,
                            metavar=f.metadata["metavar"],
                            help=f"{f.metadata['help']} [env {f.metadata['env']}; default: {f.default}]")


def limits_of(args: Any, environ: Mapping[str, str] | None = None) -> Limits:
    """The limits a command was given: its ``--max-*`` flags over the environment over the defaults."""
    return Limits.from_env(environ, **{f.name: getattr(args, f.name, None) for f in fields(Limits)})
