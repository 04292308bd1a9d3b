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
