"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input from a user: malformed YAML, unknown key, missing dataset, unknown sweep..."""


class ConfigError(UserError):
    """A config file or override is malformed, has an unknown key, or a value out of range."""


class DatasetError(UserError):
    """A dataset folder is missing or does not have the expected layout."""
