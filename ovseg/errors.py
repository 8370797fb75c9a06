"""Errors a user can act on.

Every error raised for bad input, missing weights or a broken plugin derives from `OvsegError`, so
the CLI can print its message as one sentence instead of a traceback.
"""


class OvsegError(Exception):
    """Base class of errors whose message is meant for the user."""


class ConfigError(OvsegError, ValueError):
    """A configuration value, option or vocabulary is invalid."""


class PluginError(OvsegError, LookupError):
    """A plugin name is unknown, fails to import, or does not implement its stage."""


class DatasetError(OvsegError):
    """A dataset folder, image or label file is missing or malformed."""


class WeightsError(OvsegError):
    """Pretrained weights could not be found, downloaded or loaded."""
