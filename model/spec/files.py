"""Opening the files a request names on a local surface (the CLI, a batch manifest, Cog): one rule for all.

A file must exist, be a regular file (not a directory, a device such as ``/dev/zero``, or a pipe) and be no
larger than the upload limit, as on the service; a manifest's relative paths are relative to its directory, and
with ``confine`` every path must resolve (symlinks included) inside that directory. Its bytes are read once.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from model.errors import ErrorCode, InputError
from model.spec.limits import Limits


class LocalFiles:
    """``open_file`` for :func:`model.spec.codecs.decode_request`: a path (text or ``Path``) to its bytes; bytes,
    PIL images and arrays (the Python API) pass through unchanged."""

    def __init__(self, base: Path | None = None, *, confine: bool = False, limits: Limits | None = None,
                 flag: str = "--allow-paths-outside") -> None:
        self.base = Path(base) if base is not None else None
        self.root = self.base.resolve() if self.base is not None else None
        self.confine = confine and self.root is not None
        self.limits = limits or Limits()
        self.flag = flag

    def resolve(self, field: str, value: Any) -> Path:
        """The checked path a value names (no bytes read)."""
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise InputError(field, ErrorCode.INVALID_PARAMETER, f"must be a file path (a string), got {value!r}")
        text = os.fspath(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise InputError(field, ErrorCode.INVALID_FILE_NAME, f"the path {text!r} holds a control character")
        path = Path(text).expanduser()
        if not path.is_absolute() and self.base is not None:
            path = self.base / path
        if self.confine:
            assert self.root is not None
            real = path.resolve()
            if not real.is_relative_to(self.root):
                raise InputError(field, ErrorCode.PATH_OUTSIDE_BASE,
                                 f"{text} resolves to {real}, outside the manifest's directory {self.root}; "
                                 f"{self.flag} allows it")
        try:
            info = path.stat()
        except FileNotFoundError:
            raise InputError(field, ErrorCode.UNREADABLE_FILE, f"no such file: {path}") from None
        except OSError as exc:
            raise InputError(field, ErrorCode.UNREADABLE_FILE, f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, a pipe or a socket)"
            raise InputError(field, ErrorCode.NOT_A_FILE, f"{path} is {what}")
        limit = self.limits.max_upload_bytes
        if info.st_size > limit:
            raise InputError(field, ErrorCode.PAYLOAD_TOO_LARGE,
                             f"{path} is {info.st_size} bytes; at most {limit} bytes are accepted per file")
        return path

    def __call__(self, field: str, value: Any) -> Any:
        if not isinstance(value, str | os.PathLike):
            return value  # already an image (bytes, PIL, array): the Python API
        path = self.resolve(field, value)
        limit = self.limits.max_upload_bytes
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise InputError(field, ErrorCode.UNREADABLE_FILE, f"cannot read {path}: {exc.strerror}") from None
        if len(data) > limit:
            raise InputError(field, ErrorCode.PAYLOAD_TOO_LARGE, f"{path} grew past {limit} bytes while read")
        return data
