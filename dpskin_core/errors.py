"""Exceptions raised by dpskin_core.

Every error that comes from user input (files, CSVs, configs) is raised *before* any
training starts and names the offending file or field, so that nothing already
computed is lost.
"""
from __future__ import annotations

from typing import Optional


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


def check_number(value: object, what: str, *, integer: bool = False, positive: bool = False,
                 nonnegative: bool = False, optional: bool = False,
                 below: Optional[float] = None) -> None:
    """Raise :class:`ConfigError` naming ``what`` unless ``value`` is a finite number (an int
    when ``integer``; a bool is neither), > 0 when ``positive``, >= 0 when ``nonnegative``,
    < ``below`` when given; None passes when ``optional``. The one number check of configs,
    profiles and registries."""
    import math

    if value is None and optional:
        return
    sign = "positive " if positive else "non-negative " if nonnegative else ""
    kind = f"{sign}integer" if integer else f"finite {sign}number"
    if below is not None:
        kind += f" below {below:g}"
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value)
            or (positive and not value > 0) or (nonnegative and not value >= 0)
            or (below is not None and not value < below)):
        raise ConfigError(f"{what} must be a {kind}{' or None' if optional else ''}, got {value!r}")


def check_flag(value: object, what: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` unless ``value`` is a bool (not 0 / 1, not a
    string): the flag check of configs and profiles, beside :func:`check_number`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
