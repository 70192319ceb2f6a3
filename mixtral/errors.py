"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user; the message says how to fix it."""


class CheckpointError(UserError):
    """The checkpoint is missing, corrupt or not a Mixtral checkpoint."""
