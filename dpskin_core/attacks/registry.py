"""The registry of attacks: every attack by name, with its kind.

Membership attacks (``loss_threshold``, ``lira_offline``, ``lira_online``) take a
:class:`.membership.MIAData` and return per-example scores; ``copycat`` is model extraction
(:mod:`.extraction`); ``model_inversion`` and ``gradient_inversion`` reconstruct images
(:mod:`.reconstruct`); ``one_run_audit`` is the one-run privacy audit (:mod:`.audit`). The
attack modules do not import this one, so it can import them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from ..registry import Registry
from .audit import canary_audit
from .extraction import extract_model
from .membership import MEMBERSHIP_ATTACKS
from .reconstruct import gradient_inversion, invert_classes

KINDS = ("membership", "extraction", "reconstruction", "audit")


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its ``kind`` (one of :data:`KINDS`) and the function that runs it.
    Membership attacks take ``(MIAData, **params)`` and return per-example scores (higher =
    member); the others document their own signatures."""

    name: str
    kind: str
    fn: Callable[..., Any]


#: name -> AttackSpec
ATTACKS: Registry[AttackSpec] = Registry("attack")
for _name in MEMBERSHIP_ATTACKS:
    ATTACKS.register(_name)(AttackSpec(_name, "membership", MEMBERSHIP_ATTACKS.get(_name)))
for _name, _kind, _fn in (("copycat", "extraction", extract_model),
                          ("model_inversion", "reconstruction", invert_classes),
                          ("gradient_inversion", "reconstruction", gradient_inversion),
                          ("one_run_audit", "audit", canary_audit)):
    ATTACKS.register(_name)(AttackSpec(_name, _kind, _fn))


def run_attack(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run the attack registered as ``name`` (see each attack for its arguments)."""
    return ATTACKS.get(name).fn(*args, **kwargs)


def attack_names(kind: Optional[str] = None) -> List[str]:
    """Registered attack names, optionally only those of one ``kind``."""
    return [n for n in ATTACKS.names() if kind is None or ATTACKS.get(n).kind == kind]


__all__ = ["ATTACKS", "AttackSpec", "KINDS", "attack_names", "run_attack"]
