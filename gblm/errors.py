"""Errors that reach the user as a message, not a traceback.

Every :class:`UserError` is an expected failure of the user's input or setup (a config value, a
data file, a model folder, the device, non-finite weights): the command line prints its message
as one paragraph, marks the run dir failed and exits with status 2. :func:`choice` and
:func:`positive_int` are the standard refusals of a value.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """An expected error of the input or setup; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed; the message names the key and the allowed values."""


class NonFiniteError(UserError, ArithmeticError):
    """A weight, loss or perplexity is NaN or infinite; the message names which."""


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else the standard refusal naming ``key``."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}.")
    return value


def positive_int(key: str, value: Any, minimum: int = 1, auto: bool = False) -> Any:
    """An integer >= ``minimum`` (or ``auto`` where allowed), else the refusal naming ``key``."""
    if auto and value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f"{'auto or ' if auto else ''}an integer >= {minimum}"
        raise ConfigError(f"{key}={value!r}: allowed values are {allowed}.")
    return value
