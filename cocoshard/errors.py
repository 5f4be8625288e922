"""Errors whose message is meant for the user: the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input, a bad path or a bad setting. The message says what is wrong and what to change."""


class ConfigError(UserError):
    """A configuration value that cannot work; raised before any work starts."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what schedulers and `timeout` send) or SIGHUP (a closed terminal), raised like Ctrl-C so
    that all end a run the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
