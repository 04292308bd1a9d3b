"""Exceptions a user can cause; entry points print them in one line and exit non-zero."""


class GigasegError(Exception):
    """Base class for errors caused by user input (files, configs, plans)."""


class SlideError(GigasegError):
    """A slide is missing, not a slide, or its pixels cannot be read."""


class RegionError(GigasegError):
    """A region is empty, outside its slide, or does not fit the model."""


class MaskError(GigasegError):
    """A mask or annotation is malformed or does not match its region."""


class ConfigError(GigasegError):
    """A configuration value is invalid; the message names the option."""


class MemoryPlanError(GigasegError):
    """A run would not fit in the memory available; the message says what would."""


class WriteError(GigasegError, OSError):
    """An output cannot be written: a read-only folder, a full disk, a file size limit.

    Also an ``OSError`` (with the original ``errno``), so code that handles OS errors keeps working.
    """

    def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0])


class ModelLayoutError(GigasegError, ValueError):
    """A model has a layer (or a layout) that an exact tiled step cannot reproduce; the message names it."""
