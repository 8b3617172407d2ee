"""Errors that carry a config key, so bad input fails with one clear line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range.

    The message always starts with the dotted config key, e.g.
    ``client_quantizer.bits=0: must be an integer >= 2``.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class DataFileError(FileNotFoundError):
    """A data file the run needs is absent; the message says where to put it."""
