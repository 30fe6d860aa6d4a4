"""User-facing errors: the CLI prints these as one line, without a traceback."""


class DistalignError(Exception):
    """Base class for errors caused by user input (configs, data, flags)."""


class ConfigError(DistalignError):
    """A configuration value or CLI flag is invalid."""


class DataError(DistalignError):
    """A dataset file, row or field is invalid."""


class TrainingError(DistalignError):
    """Training cannot continue (for example a non-finite loss); state was saved first."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an Exception
    """SIGINT or SIGTERM ended a command. A BaseException, so that libraries' ``except
    Exception`` cannot swallow it; the CLI prints ``message`` and exits 128 + ``signum``."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum, self.message = signum, message
