"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class Gem3dError(Exception):
    """Base class: the message names the file (or field) and the problem."""


class ConfigError(Gem3dError):
    """A config file or override is invalid."""


class DataError(Gem3dError):
    """An input dataset, volume or slice is invalid."""


class CheckpointError(Gem3dError):
    """A checkpoint is missing, corrupt or does not match the config."""
