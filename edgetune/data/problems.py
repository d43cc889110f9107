"""The record-level problem every data reader raises: a machine-readable ``code``, the ``field`` and a
message. Its own module so the readers (formats, tools, load) share it without importing each other.
"""

from __future__ import annotations


class Problem(Exception):
    """One record-level problem: ``code`` (machine-readable reason), ``field`` and a message."""

    def __init__(self, code: str, message: str, field: str | None = None):
        self.code = code
        self.message = message
        self.field = field
        super().__init__(message)
