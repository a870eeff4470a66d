"""The privacy card of a trained model and the privacy table of the book.

A card (``privacy_card.json`` in the run folder) states the run's guarantee, read from its run
record (eps, delta, accountant, noise multiplier, sampling rate, steps, clipping norm), next to
the attacks measured on it (:mod:`.membership`, :mod:`.extraction`, :mod:`.reconstruct`,
:mod:`.audit`)::

    from dpskin_core.attacks import cards
    path = cards.write_privacy_card(exp.target.run_dir, exp.results)
    row = cards.card_summary(path, model="DP-SGD, eps = 3")   # one row of the privacy table
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..files import read_json, write_atomic, write_json
from .membership import MEMBERSHIP_ATTACKS

PathLike = Union[str, Path]
#: the privacy table of a runs root (one row per attacked model), written by the attacks chapter
SUMMARY_FILE = Path("attacks") / "summary.csv"


# --------------------------------------------------------------------------------------
# privacy card
# --------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "summary") and callable(obj.summary):
        return _jsonable(obj.summary())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict(orient="records")
    return obj


def privacy_card(run_dir: PathLike, attacks: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The privacy card of a finished run: its guarantee (from config.json and meta.json)
    and the measured ``attacks`` (name -> MIAResult / AuditResult / ExtractionResult / dict)."""
    d = Path(run_dir)
    for f in ("config.json", "meta.json"):
        if not (d / f).is_file():
            raise ConfigError(f"run_dir {d}: no {f} (not a run folder)")
    cfg, meta = read_json(d / "config.json"), read_json(d / "meta.json")
    if meta.get("status") != "complete":
        raise ConfigError(f"run_dir {d}: status is {meta.get('status')!r}, not complete")
    dp = bool(cfg.get("dp"))
    statement = meta.get("privacy") or {}  # absent from records written before it existed
    unit = statement.get("unit", "image")
    return {
        "run_id": d.name, "name": cfg.get("name"), "method": meta.get("method"), "dp": dp,
        "guarantee": (f"({meta.get('epsilon'):.3g}, {cfg.get('delta'):g})-DP for each training "
                      f"{unit} (add/remove one {unit}"
                      + (", all of its images)" if unit == "lesion" else ")")
                      + f", {meta.get('accountant')} accountant"
                      + (f", DP noise {statement['dp_noise']}" if "dp_noise" in statement else ""))
        if dp else "none (non-private)",
        "privacy": statement if dp else None,
        "epsilon": meta.get("epsilon"), "target_epsilon": cfg.get("target_epsilon"),
        "delta": cfg.get("delta") if dp else None, "accountant": meta.get("accountant"),
        "noise_multiplier": meta.get("noise_multiplier"), "sample_rate": meta.get("sample_rate"),
        "steps": meta.get("steps"), "max_grad_norm": cfg.get("max_grad_norm") if dp else None,
        "n_train": meta.get("n_train"), "privacy_history": meta.get("privacy_history"),
        "released_before_training": meta.get("released_before_training"),
        "balanced_accuracy": (meta.get("final_metrics") or {}).get("balanced_accuracy"),
        "eval_split": meta.get("eval_split"), "code_version": meta.get("code_version"),
        "notes": meta.get("notes"), "attacks": _jsonable(dict(attacks or {})),
    }


def write_privacy_card(run_dir: PathLike, attacks: Optional[Mapping[str, Any]] = None,
                       merge: bool = True) -> Path:
    """Write ``<run_dir>/privacy_card.json`` (atomically); with ``merge``, attack results of an
    earlier card are kept unless measured again under the same name. Returns the path."""
    path = Path(run_dir) / "privacy_card.json"
    card = privacy_card(run_dir, attacks)
    if merge and path.is_file():
        card["attacks"] = {**read_json(path).get("attacks", {}), **card["attacks"]}
    write_json(path, card)
    return path


# --------------------------------------------------------------------------------------
# the privacy table: one row per attacked model, read from its privacy card
# --------------------------------------------------------------------------------------
def card_summary(card: Union[Mapping[str, Any], PathLike],
                 model: Optional[str] = None) -> Dict[str, Any]:
    """One row of the privacy table from a privacy card (the dict, or its JSON file).

    The guarantee (eps, delta), the balanced accuracy, the strongest membership attack on the
    card (AUC and TPR at 0.1 % and 1 % FPR, each the maximum over the attacks measured, as
    an auditor reports the worst case; ``mia_attack`` names the one of the highest AUC) and
    the eps lower bound of the one-run audit. Missing measurements are None.
    """
    if not isinstance(card, Mapping):
        card = read_json(Path(card))
    measured = card.get("attacks") or {}
    mia = {k: v for k, v in measured.items()
           if k in MEMBERSHIP_ATTACKS and isinstance(v, Mapping)}

    def best(key: str) -> Optional[float]:
        vals = [v[key] for v in mia.values() if v.get(key) is not None]
        return max(vals) if vals else None

    audit = measured.get("one_run_audit") or {}
    return {
        "model": model or card.get("name"), "method": card.get("method"), "dp": card.get("dp"),
        "epsilon": card.get("epsilon"), "delta": card.get("delta"),
        "balanced_accuracy": card.get("balanced_accuracy"),
        "mia_auc": best("auc"),
        "mia_attack": max(mia, key=lambda k: mia[k].get("auc") or 0) if mia else None,
        "mia_tpr_at_fpr_0.001": best("tpr_at_fpr_0.001"),
        "mia_tpr_at_fpr_0.01": best("tpr_at_fpr_0.01"),
        "mia_min_measurable_fpr": min((v["min_measurable_fpr"] for v in mia.values()
                                       if v.get("min_measurable_fpr") is not None), default=None),
        "eps_lower_bound": audit.get("eps_lower_bound"), "run_id": card.get("run_id"),
    }


def write_attack_summary(table: pd.DataFrame, runs_root: PathLike) -> Path:
    """Write the privacy table (rows of :func:`card_summary`) to
    ``<runs_root>/attacks/summary.csv`` (atomically, replacing an earlier one), where
    :func:`read_attack_summary` finds it. Returns the path."""
    path = Path(runs_root) / SUMMARY_FILE
    write_atomic(path, table.to_csv(index=False))
    return path


def read_attack_summary(runs_root: PathLike) -> Optional[pd.DataFrame]:
    """The privacy table of ``runs_root`` (:func:`write_attack_summary`), or None when no
    attacks ran there."""
    path = Path(runs_root) / SUMMARY_FILE
    return pd.read_csv(path) if path.is_file() else None


__all__ = ["SUMMARY_FILE", "card_summary", "privacy_card", "read_attack_summary",
           "write_attack_summary", "write_privacy_card"]
