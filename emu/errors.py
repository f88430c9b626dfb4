"""Errors that reach users: each names the config key or file at fault and how to fix it."""


class ConfigError(ValueError):
    """A bad configuration value, reported before any work starts.

    ``key`` is the dotted config key (``data.source.shards``); ``problem`` says what is wrong and, where
    possible, what would fix it.
    """

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem
