"""Private hyperparameter search: random search with a random number of trials, counted.

Choosing hyperparameters on the results of DP runs is itself a use of the training data.
:func:`private_search` makes that choice a DP mechanism (Papernot & Steinke 2022): it draws
the number of trials K from the truncated negative binomial distribution D(eta, gamma)
(:mod:`dpskin_core.training.selection`), trains K candidates whose hyperparameters are drawn
uniformly from a :class:`SearchSpace`, each a full DP run of the base recipe, scores each on
the validation split, and releases **only the best candidate** (its model, hyperparameters
and score). Its cost, "eps including the search", bounds a trial by the largest RDP curve of
the whole space (each candidate's noise is calibrated to the base recipe's target alone) and
adds the selection's overhead; the winner's own eps is "eps of the final run alone".

What stays secret, because the analysis assumes it: K, the trials' hyperparameters and seeds
(drawn from OS entropy kept in the search's ``private/`` folder, so a resumed search draws the
same ones) and every losing trial (its run folder lives under ``private/trials``, which the
book never reads; :func:`dpskin_core.training.records.load_runs` does not descend into it).
Nothing printed or recorded counts the trials. Not protected: the wall time of the search
(which grows with K), and the validation split (scored as every evaluation is).

Layout: ``<runs_root>/search/<search id>/`` with ``search.json`` (the public record: base
config, space, distribution, the winner and both eps) and ``private/`` (``secret.json``,
``trials/``). The id hashes the base config, the space and the code version, as a run id does.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ..errors import ConfigError, DpskinError
from ..files import read_json, write_json
from ..training import RunConfig
from ..training import selection
from ..training.checkpoint import dp_seed
from ..training.records import code_version, is_complete, load_run, run_dir_for
from ..training.trainer import planned_history
from .sweeps import benign_warnings_silenced, run_in

PathLike = Union[str, Path]

#: the hyperparameters a search may draw, and their RunConfig fields
SEARCHABLE = ("lr", "batch_size", "epochs", "max_grad_norm")


@dataclass(frozen=True)
class SearchSpace:
    """A random search: E[K] trials on average (K ~ D(eta, gamma), gamma derived from E[K]),
    each drawing every hyperparameter uniformly and independently from its list.

    Build from a mapping (``experiments.yml``) with :meth:`from_mapping`, which rejects
    unknown keys, empty lists and non-finite or non-positive values, naming the field.
    """

    expected_trials: float                 # E[K] (> 1)
    eta: float                             # D(eta, gamma)'s shape: 1 geometric, 0 logarithmic
    lr: Tuple[float, ...]
    batch_size: Tuple[int, ...]            # expected (Poisson) batch sizes
    epochs: Tuple[int, ...]
    max_grad_norm: Tuple[float, ...]       # clipping bounds C

    def __post_init__(self) -> None:
        for name in SEARCHABLE:
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ConfigError(f"search space: {name} is empty")
            for v in values:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
                if not ok or (name in ("batch_size", "epochs") and int(v) != v):
                    raise ConfigError(f"search space: {name} has an invalid value {v!r} "
                                      "(positive finite numbers; integers for batch_size, epochs)")
        if not (isinstance(self.expected_trials, (int, float)) and np.isfinite(self.expected_trials)
                and self.expected_trials > 1):
            raise ConfigError(f"search space: expected_trials must be a finite number > 1, "
                              f"got {self.expected_trials!r}")
        selection.gamma_for(float(self.expected_trials), float(self.eta))  # checks eta

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str = "search") -> "SearchSpace":
        """Build from a mapping; unknown or missing keys raise :class:`ConfigError`."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(names)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        return cls(**dict(d))

    @property
    def gamma(self) -> float:
        return selection.gamma_for(float(self.expected_trials), float(self.eta))

    def candidates(self) -> List[Dict[str, Any]]:
        """Every point of the space (the product of the lists), in a fixed order."""
        return [dict(zip(SEARCHABLE, combo)) for combo in
                itertools.product(*(getattr(self, n) for n in SEARCHABLE))]


#: the recipe that draws from chapter ``07_tuning``'s ``technique_search`` space (its head has
#: its own rates and schedules); every recipe of ``search_recipes`` draws from ``search``
TECHNIQUE_RECIPE = "proposed"


def chapter_spaces(parameters: Mapping[str, Any]) -> Dict[str, SearchSpace]:
    """Recipe name -> its search space, from chapter ``07_tuning``'s parameters.

    ``parameters`` holds ``search`` (the end-to-end recipes' space), ``search_recipes`` (the
    recipes searched over it) and ``technique_search`` (the proposed technique's space), as in
    ``experiments.yml``; the chapter and ``benchmarks/bench_proposed.py --search`` read their
    spaces here, so a recipe is searched over the same space in both. A missing key raises
    :class:`ConfigError` naming it.
    """
    missing = [k for k in ("search", "search_recipes", "technique_search") if k not in parameters]
    if missing:
        raise ConfigError(f"07_tuning: missing parameter(s) {', '.join(missing)}")
    recipes = list(parameters["search_recipes"] or [])
    if TECHNIQUE_RECIPE in recipes:
        raise ConfigError(f"07_tuning: search_recipes lists {TECHNIQUE_RECIPE!r}, whose space is "
                          "technique_search")
    end_to_end = SearchSpace.from_mapping(parameters["search"], "search")
    return {**{r: end_to_end for r in recipes},
            TECHNIQUE_RECIPE: SearchSpace.from_mapping(parameters["technique_search"],
                                                       "technique_search")}


@dataclass(frozen=True)
class SearchResult:
    """The public outcome of a search: the winner and what the whole search cost."""

    search_id: str
    folder: Path
    winner_dir: Path                  # the released run (its record is public)
    hyperparameters: Dict[str, Any]   # the winner's drawn values
    val_score: float                  # its validation balanced accuracy (the selection score)
    epsilon_run: float                # eps of the winning run alone (its accountant)
    epsilon_search: float             # eps including the search (Papernot & Steinke, RDP)
    delta: float
    expected_trials: float
    eta: float
    gamma: float
    n_candidates: int                 # points of the space the trial's RDP is bounded over
    n_units: int                      # training images (public N; sets every candidate's q)

    def row(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update({k: str(v) for k, v in d.items() if isinstance(v, Path)})
        d.update(self.hyperparameters)
        del d["hyperparameters"]
        return d


def search_id(base: RunConfig, space: SearchSpace, version: Optional[str] = None) -> str:
    """Hash of the base config's semantic fields, the space, the code version of training and
    this module's source (a change to either gives a new search)."""
    payload = {"base": base.semantic_dict(), "space": asdict(space),
               "version": version or code_version(),
               "search": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def draw_plan(space: SearchSpace, root_secret: int) -> List[Dict[str, Any]]:
    """The trials (hyperparameters and a training seed each) the secret determines: K ~
    D(eta, gamma), then K independent uniform draws. Secret: never print or record it."""
    rng = np.random.default_rng(root_secret)
    k = selection.draw_trials(float(space.eta), space.gamma, rng)
    cands = space.candidates()
    return [dict(cands[int(rng.integers(len(cands)))], seed=int(rng.integers(2 ** 31)))
            for _ in range(k)]


def _trial_config(base: RunConfig, trial: Mapping[str, Any]) -> RunConfig:
    return base.replace(**{k: trial[k] for k in (*SEARCHABLE, "seed")},
                        name=f"{base.name} (search trial)")


def _val_bacc(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[(metrics["split"] == "val") & (metrics["metric"] == "balanced_accuracy")]


def released_val(metrics: pd.DataFrame, meta: Mapping[str, Any]) -> Optional[float]:
    """Validation balanced accuracy of the weights a run releases (its ``eval_epoch``), from its
    tidy metrics and meta record; None when that epoch has no validation score."""
    sel = _val_bacc(metrics)
    at = sel[sel["epoch"] == meta.get("eval_epoch")]
    return float(at["value"].iloc[-1]) if len(at) else None


def _val_score(run_dir: Path) -> float:
    """:func:`released_val` of the run in ``run_dir`` (its last validation score when the
    released epoch has none)."""
    m = pd.read_csv(run_dir / "metrics.csv")
    v = released_val(m, read_json(run_dir / "meta.json"))
    return v if v is not None else float(_val_bacc(m)["value"].iloc[-1])


def _histories(base: RunConfig, space: SearchSpace, n_units: int) -> List[List[Tuple[float, float, int]]]:
    return [planned_history(base.replace(**c), n_units) for c in space.candidates()]


def space_epsilon(base: RunConfig, space: SearchSpace, n_units: int) -> Tuple[float, int]:
    """(eps including the search, number of candidates): every candidate's planned history
    (its sigma calibrated to the base target), bounded by the space's largest RDP curve."""
    histories = _histories(base, space, n_units)
    eps = selection.space_selection_epsilon(histories, float(base.delta), float(space.eta),
                                            space.gamma)
    return eps, len(histories)


def cost_curve(base: RunConfig, space: SearchSpace, n_units: int,
               expected: Sequence[float] = (1.5, 2, 3, 5, 10, 20, 50)) -> pd.DataFrame:
    """eps of a search over ``space`` as a function of E[K] (random K, Papernot & Steinke),
    next to releasing the best of a fixed k = E[K] trials (k-fold RDP composition) and one
    trial alone (RDP): what the random number of trials saves. Public inputs only."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    delta, orders = float(base.delta), [o for o in selection.ORDERS if o > 1]
    rows = []
    with benign_warnings_silenced():  # the accountants' expected warnings
        hs = _histories(base, space, n_units)
        trial = np.max(np.stack([selection.rdp_of(h, orders) for h in hs]), axis=0)
        one = float(get_privacy_spent(orders=orders, rdp=trial, delta=delta)[0])
        for e in expected:
            gamma = selection.gamma_for(float(e), float(space.eta))
            fixed = float(get_privacy_spent(orders=orders, rdp=np.ceil(e) * trial, delta=delta)[0])
            rows.append({"E[K]": float(e), "random K (this search)":
                         selection.space_selection_epsilon(hs, delta, float(space.eta), gamma),
                         "best of a fixed k = E[K]": fixed, "one trial": one})
    return pd.DataFrame(rows)


def private_search(base: RunConfig, space: SearchSpace, runs_root: PathLike, *, nproc: int = 1,
                   verbose: bool = True) -> SearchResult:
    """Run (or resume, or read back) the private search of ``base`` over ``space``.

    ``base`` is a DP config (a recipe's, at its target eps and seed); each trial replaces its
    searchable fields and its seed by a secret draw and is trained as any run (resumable). The
    winner is the trial of highest validation balanced accuracy (the first on ties).
    """
    if not base.dp:
        raise ConfigError("private_search: the base config must be DP (dp=True)")
    if base.privacy_unit != "image":
        raise ConfigError("private_search: only the image-level privacy unit is supported")
    sid = search_id(base, space)
    folder = Path(runs_root) / "search" / sid
    record = folder / "search.json"
    if record.is_file():
        return _result(read_json(record), folder)
    trials_root = folder / "private" / "trials"
    # the plan's root: the private seed of dp_seed (OS entropy kept in private/secret.json and
    # read back on resume; the public seed only in the research mode dp_noise="seeded")
    plan = draw_plan(space, dp_seed(folder / "private", base.dp_noise, base.seed))
    if verbose:  # nothing here may count the trials
        print(f"private search {sid}: E[K] = {space.expected_trials:g} trials "
              f"(eta = {space.eta:g}); the number drawn is secret", flush=True)
    best: Optional[Tuple[float, Path, Dict[str, Any]]] = None
    n_units = None
    for trial in plan:
        cfg = _trial_config(base, trial)
        with benign_warnings_silenced():
            run_in(cfg, trials_root, nproc)
        d = run_dir_for(cfg, trials_root)
        if not is_complete(d):
            raise DpskinError(f"search {sid}: a trial did not complete ({d})")
        n_units = int(read_json(d / "meta.json")["privacy"]["n_units"])
        score = _val_score(d)
        if best is None or score > best[0]:
            best = (score, d, {k: trial[k] for k in SEARCHABLE})
    assert best is not None and n_units is not None  # K >= 1
    score, d, hyper = best
    winner = read_json(d / "meta.json")
    with benign_warnings_silenced():
        eps_search, n_cand = space_epsilon(base, space, n_units)
    rec = {
        "search_id": sid, "base": base.to_dict(), "space": asdict(space), "gamma": space.gamma,
        "winner_run": d.name, "hyperparameters": hyper, "val_score": score,
        "epsilon_run": float(winner["epsilon"]), "epsilon_search": eps_search,
        "delta": float(base.delta), "n_candidates": n_cand, "n_units": n_units,
        "code_version": code_version(),
        "privacy": {
            "released": "the winning trial only: its model, record, hyperparameters and "
                        "validation score",
            "epsilon_run": "the winner's own accountant (its target eps)",
            "epsilon_search": "Papernot & Steinke 2022, Theorem 2 (RDP), number of trials "
                              "K ~ D(eta, gamma) secret, one trial bounded by the largest RDP "
                              "curve of the space's candidates",
            "not_counted": ["the wall time of the search (it grows with the number of trials)",
                            "the validation split that scores the trials (not protected)",
                            "the choice of the space itself and of E[K]"],
        },
    }
    write_json(record, rec)
    return _result(rec, folder)


def _result(rec: Mapping[str, Any], folder: Path) -> SearchResult:
    space = rec["space"]
    return SearchResult(
        search_id=rec["search_id"], folder=folder,
        winner_dir=folder / "private" / "trials" / rec["winner_run"],
        hyperparameters=dict(rec["hyperparameters"]), val_score=float(rec["val_score"]),
        epsilon_run=float(rec["epsilon_run"]), epsilon_search=float(rec["epsilon_search"]),
        delta=float(rec["delta"]), expected_trials=float(space["expected_trials"]),
        eta=float(space["eta"]), gamma=float(rec["gamma"]), n_candidates=int(rec["n_candidates"]),
        n_units=int(rec["n_units"]))


def winner_runs(results: Sequence[SearchResult]) -> pd.DataFrame:
    """One row per search: the winner's record (as ``load_runs``) and the search's columns."""
    rows = []
    for r in results:
        row = load_run(r.winner_dir) if (r.winner_dir / "meta.json").is_file() else {}
        if row.get("status") != "complete":
            raise DpskinError(f"search {r.search_id}: the winner's record is missing or "
                              f"incomplete ({r.winner_dir})")
        rows.append(row | {f"search_{k}": v for k, v in r.row().items()})
    return pd.DataFrame(rows)


__all__ = ["SEARCHABLE", "SearchResult", "SearchSpace", "cost_curve", "draw_plan", "private_search",
           "search_id", "space_epsilon", "winner_runs"]
