"""Exceptions raised by dpskin_core.

Every error that comes from user input (files, CSVs, configs) is raised *before* any
training starts and names the offending file or field, so that nothing already
computed is lost.
"""
from __future__ import annotations


class DpskinError(Exception):
    """Base class of every error dpskin raises on purpose."""


class DataError(DpskinError, ValueError):
    """A dataset folder, CSV or image is missing, malformed or inconsistent."""


class ConfigError(DpskinError, ValueError):
    """A configuration value is invalid (unknown key, eps <= 0, delta >= 1/N, ...)."""


class UnknownNameError(DpskinError, KeyError):
    """A registry was asked for a name it does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DownloadError(DpskinError, RuntimeError):
    """A download failed (offline, bad checksum, ...); the message says what to do."""


class RunLockedError(DpskinError, RuntimeError):
    """Another process is training the same run folder."""
