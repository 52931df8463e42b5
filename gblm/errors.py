"""Errors that reach the user as a message, not a traceback: the command line prints a
:class:`UserError` as one paragraph, marks the run dir failed and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """An expected error of the input or setup; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed; the message names the key and the allowed values."""


class NonFiniteError(UserError, ArithmeticError):
    """A weight, loss or perplexity is NaN or infinite; the message names which."""


class OutputError(UserError, OSError):
    """An output cannot be written (a full disk, a read-only folder); the message names it."""
