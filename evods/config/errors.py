"""The one error type of the config package."""


class ConfigError(ValueError):
    """A training config that cannot run: the message says what is wrong, where (file, line, key) and what to do."""
