"""The user-facing failure types.

Each names what is wrong (the config key, the file, the field) and how to fix it.
The CLI turns them into exit code 2 and a one-line message; any other exception is a
bug and exits 1 with its traceback.
"""


class MegamodError(Exception):
    """Base of the errors a user can fix (exit code 2)."""


class ConfigError(MegamodError):
    """A config key is unknown, mistyped or inconsistent with another."""


class DataError(MegamodError):
    """An input file or data set is unreadable or too broken to use."""


class CheckpointError(MegamodError):
    """A checkpoint is missing, torn or does not match the model."""
