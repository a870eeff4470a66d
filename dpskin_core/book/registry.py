"""The experiment registry (``experiments.yml``): every notebook the book executes and its
parameters per *profile* (``smoke``, ``cpu``, ``gpu``, ...).

It loads into frozen dataclasses; an unknown key anywhere is a :class:`ConfigError` naming the
key and the file, so a typo never silently changes nothing. The runner is generic (any
notebook, any parameters); the notebooks of this project build their recipes from
:meth:`ExperimentRegistry.params`, which checks a profile's parameters against
:class:`dpskin_core.training.recipes.Params` (a test checks every profile of the real file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..training.recipes import Params

PathLike = Union[str, Path]

#: The registry at the top of the repository.
DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "experiments.yml"


def to_json(obj: Any) -> str:
    """Canonical JSON (sorted keys) used for hashing parameters."""
    return json.dumps(thaw(obj), sort_keys=True, default=str)


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

    def params(self, profile: str) -> Params:
        """The typed parameters of ``profile`` (what the recipes are built from)."""
        return Params.from_mapping(thaw(self.profile(profile).parameters),
                                   f"{self.path}: profile {profile!r}")

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


def profile_params(profile: str, overrides: Optional[Mapping[str, Any]] = None,
                   registry: Optional[PathLike] = None) -> Params:
    """The typed parameters of ``profile`` (from the registry), with ``overrides`` applied:
    what a notebook builds its recipes from. Unknown override keys raise, naming them."""
    reg = load_registry(registry)
    base = thaw(reg.profile(profile).parameters)
    return Params.from_mapping({**base, **thaw(dict(overrides or {}))},
                               f"profile {profile!r} (with overrides {dict(overrides or {})})")
