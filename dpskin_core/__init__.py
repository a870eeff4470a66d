"""dpskin_core: differentially private skin-lesion classification on ISIC 2018 Task 3.

Public entry points::

    from dpskin_core import RunConfig, run
    result = run(RunConfig(dp=True, target_epsilon=8.0, epochs=3))
"""
from __future__ import annotations

import warnings

__version__ = "0.1.0"

# In Jupyter without ipywidgets, tqdm.auto falls back to text progress bars and says so with a
# TqdmWarning on import; the fallback is what we want (executed notebooks keep plain text), so
# that one message is silenced.
warnings.filterwarnings("ignore", message="IProgress not found")

from .config import RunConfig  # noqa: E402
from .constants import CLASSES, NUM_CLASSES  # noqa: E402
from .errors import ConfigError, DataError, DownloadError, DpskinError, UnknownNameError  # noqa: E402


def run(config, runs_root=None, **kwargs):
    """Train and evaluate one configuration; see :func:`dpskin_core.train.run`."""
    from .train import run as _run

    return _run(config, runs_root, **kwargs)


__all__ = ["RunConfig", "run", "CLASSES", "NUM_CLASSES", "ConfigError", "DataError",
           "DownloadError", "DpskinError", "UnknownNameError", "__version__"]
