"""One exception type for every user-facing failure.

The CLI catches :class:`EdgetuneError` and prints ``what`` / ``where`` / ``fix`` without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgetuneError(Exception):
    """A failure the user can act on.

    ``where`` names the file (and line / field when known); ``fix`` says what to do.
    ``exit_code`` lets commands keep documented exit codes (e.g. 2 = unreadable input).
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None, exit_code: int = 1):
        self.message = message
        self.where = where
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.message]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  fix:   {self.fix}")
        return "\n".join(parts)


class UnsupportedError(EdgetuneError):
    """An architecture, method or backend this machine or this version cannot handle."""


class MissingDependencyError(EdgetuneError):
    """An optional backend (torch, mlx, bitsandbytes, …) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed.",
            fix=f"pip install 'edgetune[{extra}]'",
        )
