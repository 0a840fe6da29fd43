"""Errors a user can act on.

Anything raised as a ``UserError`` is printed by the CLI as one line naming the file, field or
value at fault, with a non-zero exit and no traceback (``--debug`` shows it). Anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a path, a name, a file's contents, a configuration value."""

    exit_code = 2
