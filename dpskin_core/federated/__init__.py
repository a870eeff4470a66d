"""Federated learning across the HAM10000 sites (dpskin_core.federated): partitions with every
lesion at one client (:mod:`.partitions`), the clients' rounds of the project's own (DP)
training (:mod:`.client`), server strategies (:mod:`.strategies`), the server's rounds and the
in-process federation (:mod:`.federation`), Flower's ServerApp / ClientApp (:mod:`.app`) and
their deployment on 127.0.0.1 (:mod:`.deploy`).

A layer above ``training`` and ``attacks``, beside ``mple``; nothing below imports it.
"""
from .federation import FLConfig, FLResult, FederationError, run_federation
from .partitions import Partition, partition
from .strategies import STRATEGIES, Strategy

__all__ = ["FLConfig", "FLResult", "FederationError", "Partition", "STRATEGIES", "Strategy",
           "partition", "run_federation"]
