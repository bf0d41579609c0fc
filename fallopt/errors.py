"""Errors that reach the user as one clear line (see `fallopt.run`)."""


class FalloptError(Exception):
    """An error the user can fix: bad config or data. The message names the culprit and fix."""


class ConfigError(FalloptError):
    """A config value that fallopt cannot run with."""


class DataError(FalloptError):
    """A data file or array that is missing, malformed or inconsistent."""


# Exit codes of `python -m fallopt.run` (1: an unexpected error, with Hydra's trace).
EXIT_USER_ERROR = 2  # bad config, data or tracking store: one line names the culprit and fix
EXIT_SWEEP_INCOMPLETE = 3  # a sweep ran to its end but some jobs failed or never reported
