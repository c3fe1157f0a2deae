"""User-facing errors: the batch job prints these as one line and exits non-zero."""


class BatchError(Exception):
    """A problem with the job's configuration or input that the user can fix (no traceback needed)."""


class ConfigError(BatchError):
    """The configuration is invalid (the message names the key and the allowed values)."""


class InputError(BatchError):
    """The input data or checkpoint is missing, unreadable or has the wrong schema (the message names the file)."""
