"""MpLe / MoLe (morphed learning): the data provider's secret key and morphing
(:mod:`.keys`, :mod:`.morph`), the service provider's augmented first layer and network
(:mod:`.layer`), and attacks on the morphing (:mod:`.attacks`).

A layer above ``training`` and ``attacks``; nothing below imports it.
"""
from .keys import KEY_KINDS, KeySpec, MorphKey, make_key
from .layer import AugmentedConv, MpLeModel, build_mple, parity_model, split_first_conv
from .morph import morph, read_morphed, write_morphed

__all__ = ["AugmentedConv", "KEY_KINDS", "KeySpec", "MorphKey", "MpLeModel", "build_mple",
           "make_key", "morph", "parity_model", "read_morphed", "split_first_conv", "write_morphed"]
