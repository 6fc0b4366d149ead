"""The errors plmq raises for bad input: each message names what to change."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


class DataError(ValueError):
    """Bad or missing task data; the message names task, file and line."""
