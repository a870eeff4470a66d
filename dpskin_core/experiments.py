"""The experiment registry (``experiments.yml``) and the helpers the notebooks call.

The registry lists every notebook the book executes and its parameters per *profile*
(``smoke``, ``cpu``, ``gpu``). It loads into frozen dataclasses; an unknown key anywhere is a
:class:`ConfigError` naming the key and the file, so a typo never silently changes nothing.

Notebooks never hold training loops: they describe a grid and call :func:`sweep`, which calls
:func:`dpskin_core.run` once per configuration (a finished run is reused, not retrained) and
returns one row per run read back from the run records.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd

from .config import RunConfig
from .errors import ConfigError

PathLike = Union[str, Path]

#: The registry at the top of the repository.
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "experiments.yml"
PROFILE_NAMES = ("smoke", "cpu", "gpu")

_TOP_KEYS = {"default_profile", "profiles", "experiments"}
_PROFILE_KEYS = {"description", "parameters"}
_EXPERIMENT_KEYS = {"name", "title", "notebook", "parameters", "profiles", "reads_runs"}


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of a copy of ``d`` (lists become tuples) so nothing mutates it."""
    def freeze(v: Any) -> Any:
        if isinstance(v, Mapping):
            return _frozen(v)
        if isinstance(v, list):
            return tuple(freeze(x) for x in v)
        return v

    return MappingProxyType({k: freeze(v) for k, v in d.items()})


def thaw(v: Any) -> Any:
    """Plain JSON-able Python values (dicts and lists) from frozen ones."""
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    return v


def _check_keys(d: Any, allowed: set, where: str, source: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
                          f"allowed: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class Profile:
    """A named parameter set shared by every notebook (data, grid sizes, schedules)."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class Experiment:
    """One notebook execution: its source, title and parameter overrides."""

    name: str
    title: str
    notebook: str                                   # path of the jupytext .py, repo-relative
    parameters: Mapping[str, Any]                   # overrides for every profile
    profiles: Mapping[str, Mapping[str, Any]]       # overrides per profile
    reads_runs: bool = False  # aggregates run records: their list enters the execution hash


@dataclass(frozen=True)
class ExperimentRegistry:
    """The parsed registry file."""

    path: Path
    default_profile: str
    profiles: Mapping[str, Profile]
    experiments: Tuple[Experiment, ...]

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise ConfigError(f"{self.path}: unknown profile {name!r}; known: "
                              f"{', '.join(self.profiles)}")
        return self.profiles[name]

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        raise ConfigError(f"{self.path}: unknown experiment {name!r}; known: "
                          f"{', '.join(e.name for e in self.experiments)}")

    def parameters_for(self, experiment: Union[str, Experiment], profile: str) -> Dict[str, Any]:
        """Merged parameters (profile < experiment < experiment's profile override)."""
        exp = self.experiment(experiment) if isinstance(experiment, str) else experiment
        merged = {**thaw(self.profile(profile).parameters), **thaw(exp.parameters),
                  **thaw(exp.profiles.get(profile, {}))}
        return merged


def load_registry(path: Optional[PathLike] = None) -> ExperimentRegistry:
    """Parse and validate the registry file (default: ``experiments.yml`` at the repo top)."""
    import yaml

    p = Path(path) if path is not None else DEFAULT_REGISTRY
    if not p.is_file():
        raise ConfigError(f"experiment registry not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    src = str(p)
    _check_keys(data, _TOP_KEYS, "the top level", src)
    profiles: Dict[str, Profile] = {}
    raw_profiles = data.get("profiles") or {}
    _check_keys(raw_profiles, set(raw_profiles), "profiles", src)
    for name, body in raw_profiles.items():
        _check_keys(body, _PROFILE_KEYS, f"profile {name!r}", src)
        params = body.get("parameters") or {}
        _check_keys(params, set(params), f"profile {name!r} parameters", src)
        profiles[name] = Profile(name, str(body.get("description", "")).strip(), _frozen(params))
    if not profiles:
        raise ConfigError(f"{src}: no profiles defined")
    default = data.get("default_profile", next(iter(profiles)))
    if default not in profiles:
        raise ConfigError(f"{src}: default_profile {default!r} is not a profile")
    exps: List[Experiment] = []
    raw_exps = data.get("experiments") or []
    if not isinstance(raw_exps, list):
        raise ConfigError(f"{src}: experiments must be a list")
    seen = set()
    for i, body in enumerate(raw_exps):
        where = f"experiments[{i}]" + (f" ({body.get('name')})" if isinstance(body, Mapping) else "")
        _check_keys(body, _EXPERIMENT_KEYS, where, src)
        for req in ("name", "notebook"):
            if not body.get(req):
                raise ConfigError(f"{src}: {where} needs a {req!r}")
        name = str(body["name"])
        if name in seen:
            raise ConfigError(f"{src}: experiment name {name!r} appears twice")
        seen.add(name)
        overrides = body.get("profiles") or {}
        _check_keys(overrides, set(profiles), f"{where} profiles", src)
        for pname, pover in overrides.items():
            _check_keys(pover, set(pover or {}), f"{where} profiles.{pname}", src)
        exps.append(Experiment(
            name=name, title=str(body.get("title", name)), notebook=str(body["notebook"]),
            parameters=_frozen(body.get("parameters") or {}),
            profiles=_frozen({k: (v or {}) for k, v in overrides.items()}),
            reads_runs=bool(body.get("reads_runs", False))))
    return ExperimentRegistry(p, default, _frozen(profiles), tuple(exps))



# --------------------------------------------------------------------------- sweeps
def grid(**axes: Sequence[Any]) -> List[Dict[str, Any]]:
    """The cartesian product of ``axes``: ``grid(seed=[0, 1], lr=[.1])`` -> 2 dicts."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


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


def sweep(base: Union[RunConfig, Mapping[str, Any]], points: Iterable[Mapping[str, Any]],
          runs_root: PathLike, *, verbose: bool = True) -> pd.DataFrame:
    """Run ``base`` updated by each point of ``points``; one row per run (as ``load_runs``).

    Finished runs are reused (same config + code version), so re-executing a notebook, or
    resuming an interrupted profile, only trains what is missing. A line per run reports
    progress (papermill streams it to the terminal).
    """
    from . import run
    from .results import load_runs

    base_cfg = base if isinstance(base, RunConfig) else RunConfig.from_dict(dict(base))
    points = list(points)
    ids: List[str] = []
    t0 = time.perf_counter()
    for i, point in enumerate(points, 1):
        cfg = base_cfg.replace(**dict(point))
        t = time.perf_counter()
        with benign_warnings_silenced():
            res = run(cfg, runs_root)
        ids.append(res.run_id)
        if verbose:
            what = ", ".join(f"{k}={v}" for k, v in point.items())
            bacc = res.final_metrics.get("balanced_accuracy", float("nan"))
            eps = f", eps {res.epsilon:.2f}" if res.epsilon is not None else ""
            print(f"[{i}/{len(points)}] {cfg.method} {what}: balanced accuracy {bacc:.3f}{eps} "
                  f"({'reused' if res.reused else f'trained in {time.perf_counter() - t:.0f} s'}, "
                  f"run {res.run_id})", flush=True)
    if verbose:
        print(f"{len(points)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    runs = load_runs(runs_root)
    if runs.empty:
        return runs
    out = runs.set_index("run").loc[ids].reset_index()
    return out


def mean_std(df: pd.DataFrame, by: Sequence[str], metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; NaN for one seed) and count of ``metric`` per group."""
    g = df.groupby(list(by), dropna=False)[metric]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    return out


def fmt_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``0.512 ± 0.014`` (``± n/a`` when std is undefined, i.e. a single seed)."""
    s = "n/a" if pd.isna(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {s}"


METHOD_LABELS = {"nonprivate-sgd": "non-private SGD", "nonprivate-adam": "non-private Adam",
                 "dp-sgd": "DP-SGD", "dp-adam": "DP-Adam",
                 "proposed-sgd": "proposed (colour front end + DP-SGD)",
                 "nonprivate-proposed-sgd": "proposed recipe, non-private"}


def method_label(method: str) -> str:
    """Human label of a method key such as ``dp-sgd``."""
    return METHOD_LABELS.get(method, method)


def to_json(obj: Any) -> str:
    """Canonical JSON (sorted keys) used for hashing parameters."""
    return json.dumps(thaw(obj), sort_keys=True, default=str)


# --------------------------------------------------------------------------- tables
def summary_table(runs: pd.DataFrame, by: Sequence[str],
                  metrics: Sequence[str] = ("balanced_accuracy", "accuracy", "auc_macro", "ece"),
                  digits: int = 3) -> pd.DataFrame:
    """One row per group: ``metric`` as "mean ± std" strings and the number of seeds ``n``."""
    rows = []
    for key, g in runs.groupby(list(by), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            row[m.replace("_", " ")] = fmt_mean_std(g[m].mean(), g[m].std(), digits)
        row["n"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def recall_by_class(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Long table: ``by`` columns, ``class``, ``recall`` (mean over seeds), ``std``, ``n``."""
    from .constants import CLASSES

    cols = [f"recall_{c}" for c in CLASSES]
    long = runs.melt(id_vars=list(by), value_vars=cols, var_name="class", value_name="recall")
    long["class"] = long["class"].str.removeprefix("recall_")
    out = (long.groupby([*by, "class"], dropna=False, sort=False)["recall"]
           .agg(recall="mean", std="std", n="count").reset_index())
    out["class"] = pd.Categorical(out["class"], categories=list(CLASSES), ordered=True)
    return out.sort_values([*by, "class"]).reset_index(drop=True)


def eps_over_steps(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """eps after each epoch of the DP runs, with the optimizer step count it was reached at.

    ``metrics`` is :func:`dpskin_core.results.load_metrics`, ``runs`` the rows of
    :func:`sweep`; steps = epoch x steps per epoch (ceil(N / B) Poisson batches).
    """
    dp = runs[runs["dp"].astype(bool)].set_index("run")
    spe = (dp["steps"] / dp["epochs"]).rename("steps_per_epoch")
    m = metrics[(metrics["run"].isin(dp.index)) & (metrics["split"] == "train")
                & (metrics["metric"] == "loss")][["run", "seed", "epoch", "eps", "target_epsilon",
                                                  "backbone", "method"]]
    m = m.join(spe, on="run")
    m["step"] = (m["epoch"] * m["steps_per_epoch"]).round().astype(int)
    return m.reset_index(drop=True)


def current_runs(runs_root: PathLike, **filters: Any) -> pd.DataFrame:
    """Complete runs of the current code version whose config matches ``filters``.

    A list/tuple value matches any of its elements. Runs of older code versions stay on disk
    (their ids differ) but are not mixed into the tables of the current one.
    """
    from .results import code_version, load_runs

    runs = load_runs(runs_root)
    if runs.empty:
        return runs
    runs = runs[runs["code_version"] == code_version()]
    for k, v in filters.items():
        if isinstance(v, (list, tuple)):
            runs = runs[runs[k].isin(list(v))]
        elif v is None:
            runs = runs[runs[k].isna()]
        else:
            runs = runs[runs[k] == v]
    return runs.reset_index(drop=True)


#: the privacy table the attacks chapter writes under a runs root (one row per attacked model)
ATTACK_SUMMARY = Path("attacks") / "summary.csv"


def read_attack_summary(runs_root: PathLike) -> Optional[pd.DataFrame]:
    """The privacy table of ``runs_root`` (written by
    :func:`dpskin_core.cards.write_attack_summary`), or None when no attacks ran there."""
    path = Path(runs_root) / ATTACK_SUMMARY
    return pd.read_csv(path) if path.is_file() else None


def glue(name: str, value: Any, display: bool = False) -> None:
    """``myst_nb.glue`` with plain Python values (numpy scalars become int/float), so the book's
    ``{glue:text}`` roles can format them (``np.float64(0.5)`` is not parseable text)."""
    from myst_nb import glue as _glue

    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    _glue(name, value, display=display)
