"""User-facing errors.

A `UserError` is bad input (a config value, a path, a corpus): the command line prints its
message alone -- no traceback -- and exits with code 2. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input. The message says what is wrong, where, and how to fix it."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what if where is None else f"{where}: {what}"]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("\n  ".join(parts))
