"""Errors that reach the user as one clear line (see `fallopt.run`)."""


class FalloptError(Exception):
    """An error the user can fix: bad config or data. The message names the culprit and fix."""


class ConfigError(FalloptError):
    """A config value that fallopt cannot run with."""


class DataError(FalloptError):
    """A data file or array that is missing, malformed or inconsistent."""
