"""User-facing errors: one clear message, exit code 2, no traceback soup."""

from __future__ import annotations

__all__ = ["DiffquantError"]


class DiffquantError(Exception):
    """An error caused by bad input; the CLI prints the message and exits with code 2.

    The message names what was wrong, where (file, layer) and, where possible, the fix.
    """

    exit_code = 2
