"""The error a user can fix: the one exception the command line turns into a one-line message.

Raise :class:`UsageError` for bad user input (a flag, a setting, a file or directory the user named, a data format)
with a message that names it and says what to do. Every other exception is a bug or an outside failure and keeps
its traceback (:func:`ds_kd.cli.main_guard` and the ``main()`` of each command)."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad user input (flag, setting, file, data format); the message names it and says what to do.

    A subclass of ValueError, so callers and tests that catch ValueError (``pytest.raises(ValueError)``) keep
    working; the command line catches only this class (not every ValueError) to print one line."""
