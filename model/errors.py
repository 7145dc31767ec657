"""Errors raised for bad user input.

Every user-facing rejection is an :class:`InputError` that names the offending field, carries a stable machine
code (``error``) and the HTTP status the service answers with. Internal invariants use ``assert``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a user: names the field, has a stable code and an HTTP status."""

    def __init__(self, field: str, message: str, *, code: str = "invalid_input", status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code
        self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "field": self.field, "message": self.message}


class CheckpointError(ValueError):
    """A weights file that cannot be used: missing, unexpected or mis-shaped keys, or a damaged file."""


class Cancelled(RuntimeError):
    """Raised inside a generation when its cancellation check fires (client gone, shutdown)."""
