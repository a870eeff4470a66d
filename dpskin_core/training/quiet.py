"""The libraries' warnings that every DP run triggers and that say nothing about it, silenced
by name (only those), so that a notebook's output shows the warnings that matter."""
from __future__ import annotations

import contextlib
import warnings

#: warnings of the libraries that are expected in every DP run and say nothing about it:
#: Opacus' backward hook on a first layer whose input needs no gradient; the RDP accountant
#: at its largest order and the PRV accountant's log(0) at sampling rate 1 (the proposed
#: technique's one-off histogram release is a step with q = 1).
BENIGN_WARNINGS = ("Full backward hook is firing", "Optimal order is the largest alpha",
                   "divide by zero encountered in log")


def silence_benign_warnings() -> None:
    """Silence :data:`BENIGN_WARNINGS` (only those) from now on, so a notebook's output shows
    the warnings that matter; :func:`benign_warnings_silenced` does it for one block."""
    for msg in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)


@contextlib.contextmanager
def benign_warnings_silenced():
    """Silence :data:`BENIGN_WARNINGS` (only those) inside the block."""
    with warnings.catch_warnings():
        silence_benign_warnings()
        yield


__all__ = ["BENIGN_WARNINGS", "benign_warnings_silenced", "silence_benign_warnings"]
