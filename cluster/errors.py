"""Errors a user can cause and fix; the CLI prints them as one line, without a traceback."""

from mixtral.errors import ModelError


class UserError(Exception):
    """Bad input from the user (a request, an option); the message says how to fix it."""


class FieldError(UserError):
    """One field of a request out of its range: `field` names it (an API error's param), `code` is the
    OpenAI error code where one fits."""

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


# What the CLI reports as one line: the user's mistakes, here and in the model package.
USER_ERRORS = (UserError, ModelError)
