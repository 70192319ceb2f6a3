"""Where an API key comes from: the option, else the environment (MOE_API_KEY, or the variable named)."""

from __future__ import annotations

import os

from cluster.errors import UserError

API_KEY_ENV = "MOE_API_KEY"  # read when neither the key nor a variable is named
MIN_KEY_LENGTH = 8


def resolve_api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    """The key given, else the one in `api_key_env` (which must then be set), else MOE_API_KEY's, else None.

    Keys live in the environment so they stay out of command lines (`ps`) and config files."""
    if api_key is not None:
        return api_key
    name = api_key_env or API_KEY_ENV
    value = os.environ.get(name, "")
    if api_key_env is not None and len(value) < MIN_KEY_LENGTH:
        raise UserError(f"--api-key-env: set {api_key_env} to the API key (at least {MIN_KEY_LENGTH} characters)")
    if value and len(value) < MIN_KEY_LENGTH:
        raise UserError(f"{name} holds a key of {len(value)} characters; an API key has at least {MIN_KEY_LENGTH}")
    return value or None
