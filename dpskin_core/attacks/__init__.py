"""The attacks layer: privacy attacks on trained models and the privacy card of each.

Membership inference (:mod:`.membership`), model extraction (:mod:`.extraction`),
reconstruction (:mod:`.reconstruct`), the one-run privacy audit (:mod:`.audit`), all built by
name from :data:`ATTACKS` (:mod:`.registry`); trained models as targets (:mod:`.victims`) and
privacy cards (:mod:`.cards`)::

    from dpskin_core.attacks import cards, membership_experiment
    exp = membership_experiment(cfg, data, "runs/mia", n_shadows=8)
    cards.write_privacy_card(exp.target.run_dir, exp.results)

Imports the training and data layers; never the book.
"""
from __future__ import annotations

from . import audit, cards, extraction, reconstruct
from .extraction import ExtractionResult, extract_model, fidelity, synthetic_pool
from .membership import (MEMBERSHIP_ATTACKS, MembershipExperiment, MIAData, MIAResult,
                         half_masks, lira_offline, lira_online, loss_threshold,
                         membership_experiment, membership_scores, mia_metrics, roc_curve,
                         tpr_at_fpr)
from .registry import ATTACKS, AttackSpec, attack_names, run_attack
from .signals import cross_entropy, logit_confidence
from .victims import (DIHEDRAL, TrainedModel, data_digest, dihedral_view, load_trained,
                      subsample_train, train_on, with_train)

__all__ = ["ATTACKS", "AttackSpec", "DIHEDRAL", "ExtractionResult", "MEMBERSHIP_ATTACKS",
           "MIAData", "MIAResult", "MembershipExperiment", "TrainedModel", "attack_names", "audit",
           "cards", "cross_entropy", "data_digest", "dihedral_view", "extract_model",
           "extraction", "fidelity", "half_masks", "lira_offline", "lira_online", "load_trained",
           "logit_confidence", "loss_threshold", "membership_experiment", "membership_scores",
           "mia_metrics", "reconstruct", "roc_curve", "run_attack", "subsample_train",
           "synthetic_pool", "tpr_at_fpr", "train_on", "with_train"]
