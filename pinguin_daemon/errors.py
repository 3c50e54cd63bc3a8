"""Errors a user can act on: one sentence, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's settings, files or environment.

    The message is one sentence that names the setting or file and the fix. The CLI prints it
    and exits with code 2 instead of showing a traceback.
    """

    exit_code = 2
