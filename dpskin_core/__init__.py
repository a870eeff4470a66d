"""dpskin_core: differentially private skin-lesion classification on ISIC 2018 Task 3.

Public entry points::

    from dpskin_core import RunConfig, run
    result = run(RunConfig(dp=True, target_epsilon=8.0, epochs=3))

Subpackages, lowest layer first (a layer imports only the layers before it; a test checks it):
``data`` (files, splits, decoding, synthetic data, downloads) -> ``training`` (config, privacy
math, backbones, front ends, technique, ``run``, run records, recipes) -> ``attacks``
(membership inference, extraction, reconstruction, audit, privacy cards) -> ``mple`` (morphed
learning, reproduced and attacked) and ``federated`` (Flower federations across the sites),
side by side -> ``book`` (the experiment registry, sweeps, tables, figures, the notebook
runner) -> ``cli``.
"""
from __future__ import annotations

import warnings

__version__ = "0.1.0"

# In Jupyter without ipywidgets, tqdm.auto falls back to text progress bars and says so with a
# TqdmWarning on import; the fallback is what we want (executed notebooks keep plain text), so
# that one message is silenced.
warnings.filterwarnings("ignore", message="IProgress not found")

from .constants import CLASSES, NUM_CLASSES  # noqa: E402
from .errors import ConfigError, DataError, DownloadError, DpskinError, UnknownNameError  # noqa: E402
from .training import RunConfig, RunResult, run  # noqa: E402


__all__ = ["RunConfig", "RunResult", "run", "CLASSES", "NUM_CLASSES", "ConfigError", "DataError",
           "DownloadError", "DpskinError", "UnknownNameError", "__version__"]
