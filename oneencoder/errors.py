"""Errors a user can cause. The CLI prints these as one line and exits non-zero."""

from __future__ import annotations


class OneEncoderError(Exception):
    """Base class for every error caused by user input, files or configuration."""


class ConfigError(OneEncoderError):
    """A stage file or option is invalid."""


class SampleError(OneEncoderError):
    """One sample cannot be loaded or preprocessed; batch jobs reject it and go on."""


class MissingDependencyError(OneEncoderError):
    """A package or weights file is not installed."""


class CacheMismatchError(OneEncoderError):
    """A feature cache was built with a different backbone or preprocessing."""


class ChecksumError(OneEncoderError):
    """A model directory file does not match the checksum recorded for it."""


class StorageError(OneEncoderError):
    """A file or folder cannot be written: read-only, no permission, or no space left."""
