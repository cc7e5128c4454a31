"""User-facing errors. The CLI prints them as one line (no traceback unless --debug) and exits non-zero."""


class OnestepError(Exception):
    """A problem with the user's input (data, config, run folder) that the user can fix."""


class ConfigError(OnestepError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(OnestepError):
    """A data file is missing, empty, binary, not UTF-8, too short, or holds unknown characters."""


class RunError(OnestepError):
    """A run folder or checkpoint is missing, damaged, or does not match what was asked for."""


class TrainingError(OnestepError):
    """Training cannot continue (for example, too many non-finite losses in a row)."""
