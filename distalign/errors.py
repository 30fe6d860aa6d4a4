"""User-facing errors: the CLI prints these as one line, without a traceback."""


class DistalignError(Exception):
    """Base class for errors caused by user input (configs, data, flags)."""


class ConfigError(DistalignError):
    """A configuration value or CLI flag is invalid."""


class DataError(DistalignError):
    """A dataset file, row or field is invalid."""


class TrainingError(DistalignError):
    """Training cannot continue (for example a non-finite loss); state was saved first."""
