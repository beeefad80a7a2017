"""The error answers of the management API, and checks shared by its request bodies."""

from __future__ import annotations

import os
from typing import Any, Final

__all__ = ["PATH_MAX", "HttpError", "absolute_path"]

#: PATH_MAX: a longer path cannot be opened anyway.
PATH_MAX: Final = 4096


class HttpError(Exception):
    """An error response: ``{"error": message, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, message: str, detail: Any = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers


def absolute_path(value: Any, key: str) -> str:
    """``value`` if it is an absolute path that can be opened at all, else a 400."""
    if not isinstance(value, str):
        raise HttpError(400, f"{key} must be a string (an absolute path), got "
                        f"{type(value).__name__}", {"key": key})
    if not value.startswith("/"):
        raise HttpError(400, f"{key} must be an absolute path, got {value[:200]!r}",
                        {"key": key})
    if "\0" in value:
        raise HttpError(400, f"{key} contains a NUL character", {"key": key})
    try:
        size = len(os.fsencode(value))
    except UnicodeEncodeError:
        raise HttpError(400, f"{key} is not a valid file name (lone surrogates)",
                        {"key": key}) from None
    if size >= PATH_MAX:
        raise HttpError(400, f"{key} is {size} bytes long; a path has fewer than "
                        f"{PATH_MAX}", {"key": key})
    return value
