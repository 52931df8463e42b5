"""Errors that reach the user as a message, not a traceback."""


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the key and the allowed values."""
