"""The one exception type for user mistakes: its message says what is wrong and how to fix it.

The CLI turns it into a one-line error (no traceback); anything else that escapes is a bug and
keeps its traceback. Two subclasses also keep the built-in types callers caught before.
"""


class SteerBatchError(ValueError):
    """A user mistake. `param` names the argument (CLI option) at fault, where there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class MissingFile(SteerBatchError, FileNotFoundError):
    """A file the user named does not exist."""


class SteeringNotInstalled(SteerBatchError, RuntimeError):
    """Steering was asked for, but an engine process runs without it (the plugin left out of
    VLLM_PLUGINS, or failed to load)."""
