"""Errors whose message is meant for the user: the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input, a bad path or a bad setting. The message says what is wrong and what to change."""


class ConfigError(UserError):
    """A configuration value that cannot work; raised before any work starts."""
