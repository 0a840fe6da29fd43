"""The one error type of the data layer, and how it lists many bad files in one message."""
from __future__ import annotations

from bench.errors import UserError


class DataError(UserError, ValueError):
    """A dataset folder, index file or image that is missing or not in the expected form.

    The message names the file or folder at fault and what was expected there.
    """


def list_some(items, limit: int = 5) -> str:
    """'a, b, c and 12 more': enough to find the problem without flooding the terminal."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
