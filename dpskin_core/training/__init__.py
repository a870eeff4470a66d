"""The training layer: run configuration, privacy math, backbones, front ends, the proposed
technique's levers, the one entry point ``run(config) -> RunResult``, run records and the
named recipes built from a profile's parameters.

Imports the data layer only; never the attacks or the book.
"""
from __future__ import annotations

from .config import RunConfig
from .trainer import RunResult, run

__all__ = ["RunConfig", "RunResult", "run"]
