"""Clients of a federation: which images each holds, every lesion at exactly one client.

The data bundle's lesion-grouped split (train / validation / test, :mod:`dpskin_core.data`)
is kept; each client holds its images of each split, so every client has its own
lesion-grouped validation and test part. Partitions (:data:`PARTITIONS`):

- ``site``: the HAM10000 acquisition site of each image (``HAM10000_sites.csv``), one client
  per site; a lesion photographed at two sites (9 lesions at the two vidir sites) goes with
  the site of most of its images (ties: the first in name order). The embedded synthetic data
  has no sites: it gets four synthetic ones, each lesion's site drawn from a per-class
  Dirichlet(0.5) mixture (non-IID, as the real sites are). With ``groups_per_site`` > 1
  each site's lesions are dealt at random (public seed) into that many *virtual clients*
  ``<site>.<g>`` (groups of lesions: the data has lesion ids, not patient ids), the many
  clients client-level DP needs; they are scored at their site (:func:`site_of`);
- ``iid``: lesions dealt at random to ``num_clients`` clients (equal shares);
- ``dirichlet``: label skew, for each class the lesions dealt by proportions drawn from
  Dirichlet(``alpha``) over the clients (Hsu et al. 2019).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import pandas as pd

from ..constants import CLASSES
from ..data.datasets import DataBundle
from ..data.layout import read_sites
from ..errors import ConfigError, DataError
from ..registry import Registry

#: the four synthetic sites of the embedded data (smoke profile)
SYNTHETIC_SITES = ("synth_a", "synth_b", "synth_c", "synth_d")


@dataclass(frozen=True)
class Partition:
    """How images are dealt to clients (``scheme`` in :data:`PARTITIONS`)."""

    scheme: str = "site"
    num_clients: int = 4        # iid / dirichlet (site: one client per site)
    alpha: float = 0.5          # dirichlet concentration (small: strong label skew)
    seed: int = 0               # public: the partition is part of the experiment's design
    groups_per_site: int = 1    # site: virtual clients per site (groups of its lesions)

    def __post_init__(self) -> None:
        PARTITIONS.get(self.scheme)
        if not isinstance(self.num_clients, (int, np.integer)) or self.num_clients < 1:
            raise ConfigError(f"partition num_clients must be a positive integer, got {self.num_clients!r}")
        if not (isinstance(self.alpha, (int, float)) and np.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"partition alpha must be a finite number > 0, got {self.alpha!r}")
        g = self.groups_per_site
        if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g < 1:
            raise ConfigError(f"partition groups_per_site must be a positive integer, got {g!r}")
        if g > 1 and self.scheme != "site":
            raise ConfigError(f"partition groups_per_site={g} splits sites: it needs scheme 'site', "
                              f"not {self.scheme!r}")

    @property
    def by_site(self) -> "Partition":
        """The partition with one client per site (where virtual clients are scored)."""
        return Partition(self.scheme, self.num_clients, self.alpha, self.seed, 1)


@dataclass
class Client:
    """One client's data: a bundle of its images of each split, and its name."""

    name: str
    data: DataBundle

    @property
    def n_train(self) -> int:
        return len(self.data.y_train)


#: scheme -> f(meta, lesion label, partition, info) -> client name of every lesion (dict)
PARTITIONS: Registry[Callable[..., Dict[str, str]]] = Registry("partition")


def _lesions(meta: pd.DataFrame) -> pd.DataFrame:
    """One row per lesion: its label (majority of its images) and its images' rows."""
    g = meta.groupby("lesion_id", sort=True)
    return pd.DataFrame({"label": g["label"].agg(lambda s: int(np.bincount(s).argmax()))})


def site_of(client: str) -> str:
    """The site of a client of the ``site`` scheme (a virtual client ``<site>.<g>``: its site)."""
    return client.split(".", 1)[0]


@PARTITIONS.register("site")
def _site_groups(meta: pd.DataFrame, p: Partition, info: Dict[str, object]) -> Dict[str, str]:
    site = _by_site(meta, p, info)
    if p.groups_per_site == 1:
        return site
    rng = np.random.default_rng(p.seed)
    out: Dict[str, str] = {}
    for s in sorted(set(site.values())):
        lesions = sorted(les for les, v in site.items() if v == s)
        for i, j in enumerate(rng.permutation(len(lesions))):
            out[lesions[j]] = f"{s}.{i % p.groups_per_site:03d}"
    return out


def _by_site(meta: pd.DataFrame, p: Partition, info: Dict[str, object]) -> Dict[str, str]:
    if info.get("dataset") == "synthetic":
        lesions = _lesions(meta)
        rng = np.random.default_rng(p.seed)
        mix = rng.dirichlet(np.full(len(SYNTHETIC_SITES), 0.5), size=len(CLASSES))  # class -> sites
        return {les: SYNTHETIC_SITES[rng.choice(len(SYNTHETIC_SITES), p=mix[lab])]
                for les, lab in lesions["label"].items()}
    root = info.get("root")
    if not root:
        raise DataError("partition 'site': the data bundle names no root folder with "
                        "HAM10000_sites.csv")
    sites = pd.Series(read_sites(root, meta["image"]), index=meta.index)
    per_lesion = pd.DataFrame({"lesion": meta["lesion_id"], "site": sites})
    counts = per_lesion.groupby(["lesion", "site"]).size().reset_index(name="n")
    counts = counts.sort_values(["lesion", "n", "site"], ascending=[True, False, True])
    return dict(counts.drop_duplicates("lesion")[["lesion", "site"]].itertuples(index=False))


def _names(p: Partition) -> List[str]:
    return [f"client_{i}" for i in range(p.num_clients)]


@PARTITIONS.register("iid")
def _iid(meta: pd.DataFrame, p: Partition, info: Dict[str, object]) -> Dict[str, str]:
    lesions = _lesions(meta).index.to_numpy()
    order = np.random.default_rng(p.seed).permutation(len(lesions))
    names = _names(p)
    return {lesions[j]: names[i % p.num_clients] for i, j in enumerate(order)}


@PARTITIONS.register("dirichlet")
def _dirichlet(meta: pd.DataFrame, p: Partition, info: Dict[str, object]) -> Dict[str, str]:
    lesions = _lesions(meta)
    rng = np.random.default_rng(p.seed)
    names, out = _names(p), {}
    for c in range(len(CLASSES)):
        ids = lesions.index[lesions["label"] == c].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        share = rng.dirichlet(np.full(p.num_clients, p.alpha))
        cuts = (np.cumsum(share)[:-1] * len(ids)).round().astype(int)
        for k, part in enumerate(np.split(ids, cuts)):
            out.update({les: names[k] for les in part})
    return out


def _subset(data: DataBundle, rows: Dict[str, np.ndarray]) -> DataBundle:
    meta = data.meta
    parts, metas = {}, []
    for split in ("train", "val", "test"):
        idx = rows[split]
        parts[split] = (getattr(data, f"x_{split}")[idx], getattr(data, f"y_{split}")[idx])
        metas.append(meta[meta["split"] == split].iloc[idx])
    return DataBundle(parts["train"][0], parts["train"][1], parts["val"][0], parts["val"][1],
                      parts["test"][0], parts["test"][1], pd.concat(metas, ignore_index=True),
                      data.classes, dict(data.info))


def partition(data: DataBundle, p: Partition) -> List[Client]:
    """The clients of ``p`` over ``data`` (sorted by name); DataError naming the client when
    one would hold no training image."""
    owner = PARTITIONS.get(p.scheme)(data.meta, p, data.info)
    meta = data.meta
    client_of = meta["lesion_id"].map(owner).to_numpy()
    clients = []
    for name in sorted(set(owner.values())):
        rows = {}
        for split in ("train", "val", "test"):
            in_split = meta["split"].to_numpy() == split
            rows[split] = np.flatnonzero(client_of[in_split] == name)
        if len(rows["train"]) == 0:
            raise DataError(f"partition {p.scheme!r}: client {name} holds no training image")
        clients.append(Client(name, _subset(data, rows)))
    return clients


def class_table(clients: List[Client]) -> pd.DataFrame:
    """Training images per class (columns) of each client (rows)."""
    return pd.DataFrame({c.name: np.bincount(c.data.y_train, minlength=len(CLASSES))
                         for c in clients}, index=list(CLASSES)).T


__all__ = ["Client", "PARTITIONS", "Partition", "SYNTHETIC_SITES", "class_table", "partition", "site_of"]
