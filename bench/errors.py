"""Errors a user can act on.

Anything raised as a ``UserError`` is printed by the CLI as one line naming the file, field or
value at fault, with a non-zero exit and no traceback (``--debug`` shows it). Anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a path, a name, a file's contents, a configuration value."""

    exit_code = 2


class CellFailure(Exception):
    """A cell that cannot finish for a reason of its own (a non-finite loss, no evaluated epoch):
    the cell is marked failed with this message, and ``history`` keeps the finished epochs."""

    def __init__(self, reason: str, history: list[dict] | None = None):
        super().__init__(reason)
        self.history = history or []
