"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""

from mixtral.errors import ModelError


class UserError(Exception):
    """Bad input from the user (a request, an option); the message says how to fix it."""


# What the CLI reports as one line: the user's mistakes, here and in the model package.
USER_ERRORS = (UserError, ModelError)
