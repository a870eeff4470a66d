"""The one entry point: ``run(config) -> RunResult``, composed of named steps.

Non-private SGD/Adam, and DP-SGD/DP-Adam through Opacus' ``PrivacyEngine`` with Poisson
sampling and per-sample clipping. The noise multiplier is derived from the target
(eps, delta) before training (:func:`.privacy.noise_multiplier_for`) and recorded.

The steps, in the spirit of Opacus' ``make_private`` / ``pre_step``::

    session = start(cfg, data, run_dir)    # checks, model, loss, optimizer, make_private, record
    resume(session)                        # from checkpoints/last.pt, if any
    for epoch in ...:
        train_one_epoch(session, epoch)
        validate(session, epoch)
        checkpoint(session, epoch)
    finish(session)                        # evaluate the released model, write the record

Reproducibility and resume: every random stream (batch sampling, DP noise, augmentation,
dropout) is re-seeded at the start of each epoch from ``(seed, epoch)``, and a
:class:`.checkpoint.Checkpoint` is written atomically after each epoch. A run interrupted
after epoch k therefore resumes at epoch k+1 and ends with the same weights and the same eps
as an uninterrupted run.

Under ``torchrun`` (``dpskin train --nproc N``) every process runs these steps on its share of
each batch (:mod:`.distributed`); rank 0 alone validates, checkpoints and writes the record.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler
from tqdm.auto import tqdm

from ..constants import CLASSES
from ..data import DataBundle, DataSpec, load_data
from ..errors import ConfigError
from ..files import read_json, write_atomic, write_json
from . import privacy, records
from .augment import mix_batch
from .backbones import build_backbone, has_batchnorm
from .checkpoint import Checkpoint, StateDict, dp_seed, released_weights, save_best
from .config import RunConfig, grad_sample_settings
from .distributed import World, current, unwrap, wrap_plain, wrap_private
from .frontends import FRONT_ENDS, Inputs
from .metrics import evaluate
from .optim import build_optimizer
from .persample import resolve_mode


@dataclass
class RunResult:
    """What a run produced; everything here is also on disk in ``run_dir``."""

    run_id: str
    run_dir: Path
    config: RunConfig
    final_metrics: Dict[str, float]
    epsilon: Optional[float]
    noise_multiplier: Optional[float]
    metrics: pd.DataFrame
    meta: Dict[str, Any] = field(default_factory=dict)
    reused: bool = False


def pick_device(name: str = "auto", world: World = World()) -> torch.device:
    """CUDA when present (for "auto"), else CPU; under torchrun each rank's own CUDA device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available")
    if name == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def _seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def init_seed(seed: int) -> int:
    """The torch seed of a run's model initialisation (public: from the run's ``seed``)."""
    return _seed(seed, "init")


def data_spec(cfg: RunConfig) -> DataSpec:
    """The data fields of ``cfg``."""
    return DataSpec(dataset=cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size,
                    split=cfg.split, val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                    split_seed=cfg.split_seed, cache_dir=cfg.cache_dir, synth_n=cfg.synth_n)


#: builds the network to train in place of ``cfg.backbone``'s (a higher layer's, e.g. MpLe's
#: augmented network); every call returns a fresh network with the same initial weights
ModelFactory = Callable[[], nn.Module]


def build_network(cfg: RunConfig, pretrained: bool = False) -> nn.Module:
    """The run's network: ``cfg.backbone`` with ``cfg.norm``'s normalisation layers (and
    ``cfg.pretrained_path``'s weights when ``pretrained``). Raises :class:`ConfigError` for
    ``norm='batch'`` on a network with no BatchNorm to keep (the small CNNs are GroupNorm
    either way), rather than train a GroupNorm network under the name of a BatchNorm one."""
    model = build_backbone(cfg.backbone, num_classes=len(CLASSES), dp_compatible=cfg.norm == "group",
                           pretrained_path=cfg.pretrained_path if pretrained else None)
    if cfg.norm == "batch" and not has_batchnorm(model):
        raise ConfigError(f"norm='batch': backbone {cfg.backbone!r} has no BatchNorm to keep; "
                          "use norm='group'")
    return model


def check_against_data(cfg: RunConfig, data: DataBundle,
                       model_factory: Optional[ModelFactory] = None) -> None:
    """Checks that need N: batch size, delta < 1/N, non-empty evaluation split."""
    n = len(data.y_train)
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training set (N = {n})")
    if cfg.dp:
        privacy.check_epsilon_delta(cfg.target_epsilon, cfg.delta, n)
    for split in {"val", cfg.eval_split}:
        if len(getattr(data, f"y_{split}")) == 0:
            raise ConfigError(f"the {split} split is empty; change val_frac/test_frac")
    if (cfg.features == "given") != (model_factory is not None):
        raise ConfigError("features='given' (rows encoded by the caller) and a model_factory go "
                          "together: the factory's network takes those rows "
                          f"(features={cfg.features!r}, model_factory "
                          f"{'given' if model_factory else 'missing'})")
    if model_factory is None:  # a shape-only model: the network exists (norm='batch' too)
        with torch.device("meta"):
            shape_only = build_network(cfg)
    if cfg.dp:  # the per-sample gradient engine must serve every layer
        if model_factory is not None:
            shape_only = model_factory()
        resolve_mode(cfg.grad_sample_mode, shape_only, **grad_sample_settings(cfg))


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, inputs: Inputs, batch: int = 512,
                  logit_shift: Optional[torch.Tensor] = None) -> np.ndarray:
    """Softmax probabilities (N, C) of stored rows ``x`` (images or features), of the logits
    plus ``logit_shift`` (C,) when given (:func:`.technique.kept_prior_shift`)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        z = model(inputs.eval(x[i:i + batch])).float()
        if logit_shift is not None:
            z = z + logit_shift.to(z.device)
        out.append(torch.softmax(z, dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)))


def _unwrapped(model: nn.Module) -> nn.Module:
    return unwrap(model)  # Opacus' GradSampleModule, DPDDP / DDP wrap the model


def _state_dict(model: nn.Module) -> StateDict:
    return {k: v.detach().cpu().clone() for k, v in _unwrapped(model).state_dict().items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


# --------------------------------------------------------------------------- setup steps
@dataclass
class TrainingSetup:
    """Model, optimizer, loader (and privacy engine) wired for one run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader            # yields (index tensor,) batches into the training arrays
    scheduler: Any
    criterion: nn.Module
    engine: Any                   # opacus.PrivacyEngine or None
    noise_multiplier: Optional[float]
    sample_rate: Optional[float]
    steps_per_epoch: int
    g_sample: torch.Generator     # batch sampling (Poisson under DP, shuffling otherwise)
    g_noise: torch.Generator      # DP noise
    g_aug: torch.Generator        # augmentations
    eval_model: nn.Module         # plain copy of the architecture, loaded with the weights to evaluate
    ema: Any = None               # technique.EMA or None
    prefix_history: tuple = ()    # releases before training, composed in the accountant
    released: Dict[str, Any] = field(default_factory=dict)  # what was released, for the record
    dp_seed: Optional[int] = None  # root of the DP randomness (checkpoint.dp_seed); None: no DP
    units: Optional[torch.Tensor] = None  # (N,) privacy unit of each image (lesion-level DP)
    n_units: int = 0              # privacy units of the training split (images or lesions)
    grad_sample_mode: Optional[str] = None  # the per-sample gradient engine used (DP only)
    logit_shift: Optional[torch.Tensor] = None  # added to the logits at prediction (la_tau_kept)


def build_criterion(cfg: RunConfig, data: DataBundle, device: torch.device,
                    dp_seed: Optional[int] = None, unit_labels: Optional[np.ndarray] = None,
                    prior_counts: Optional[np.ndarray] = None,
                    ) -> Tuple[nn.Module, tuple, Dict[str, Any]]:
    """(loss, releases before training, their record).

    The logit-adjusted loss needs the class prior: under DP a histogram of the privacy units'
    classes (``unit_labels``: images, or lesions) released once with the Gaussian mechanism
    (L2 sensitivity 1 under add/remove of one unit; composed into eps as the step
    (sigma_h, q=1, 1)); non-private runs read the exact counts, as do the balanced class
    weights (which the config refuses under DP).

    ``prior_counts``: class counts released elsewhere to use as the prior instead (a
    federation's sum of its clients' noisy histograms, :mod:`dpskin_core.federated`); this
    run's own histogram is still the one it released there, so it is still counted.
    """
    counts = np.bincount(data.y_train, minlength=len(CLASSES)).astype(float)
    if prior_counts is not None:
        prior_counts = np.asarray(prior_counts, dtype=np.float64)
        if not cfg.logit_adjust:
            raise ConfigError("prior_counts is given but logit_adjust is off: nothing would use it")
        if prior_counts.shape != (len(CLASSES),) or not np.all(np.isfinite(prior_counts)):
            raise ConfigError(f"prior_counts: expected {len(CLASSES)} finite class counts, got "
                              f"{prior_counts.tolist()}")
    if cfg.logit_adjust:
        from .technique import noisy_class_histogram, prior_loss

        prefix: tuple = ()
        released: Dict[str, Any] = {}
        if cfg.dp:
            labels = data.y_train if unit_labels is None else unit_labels
            counts = noisy_class_histogram(labels, cfg.hist_noise,
                                           torch.Generator().manual_seed(_seed(dp_seed, "histogram")))
            prefix = prefix_history(cfg)
            released = {"class_histogram": counts.round(2).tolist(), "hist_noise": cfg.hist_noise,
                        "counts_of": f"{cfg.privacy_unit}s per class"}
        if prior_counts is not None:
            counts = prior_counts
            released["prior"] = {"counts": prior_counts.round(2).tolist(),
                                 "source": "given (e.g. a federation's summed noisy histograms)"}
        return prior_loss(counts, cfg.la_tau).to(device), prefix, released
    if cfg.class_weights != "none":
        from .technique import class_loss_weights

        w = torch.tensor(class_loss_weights(counts, cfg.class_weights), dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=w.to(device)), (), {}
    return nn.CrossEntropyLoss(), (), {}


def prefix_history(cfg: RunConfig) -> Tuple[Tuple[float, float, int], ...]:
    """The releases a DP run makes before training, as accountant steps (each one Gaussian
    release, q = 1): the noisy class histogram of the logit-adjusted loss (sensitivity 1), then
    the noisy feature statistics of a privately standardised head (noise multiplier
    ``stats_noise``; :func:`.technique.noisy_feature_stats`)."""
    if not cfg.dp:
        return ()
    return (((float(cfg.hist_noise), 1.0, 1),) if cfg.logit_adjust else ()) + (
        ((float(cfg.stats_noise), 1.0, 1),) if cfg.feature_norm == "private" else ())


def standardise_features(cfg: RunConfig, model: nn.Module, train_x: torch.Tensor,
                         dp_seed: Optional[int] = None) -> Dict[str, Any]:
    """Set a standardising head's feature statistics (``cfg.feature_norm`` private or exact);
    return the record of the release. Under DP one Gaussian release from the run's DP seed
    (:func:`.technique.noisy_feature_stats`, the step (stats_noise, 1, 1) of
    :func:`prefix_history`); non-private runs read the exact statistics."""
    from .technique import exact_feature_stats, noisy_feature_stats, stats_sensitivity

    train_x = train_x.cpu()
    if cfg.feature_norm == "private":
        bound = FRONT_ENDS.get(cfg.features).norm_bound
        mean, std = noisy_feature_stats(
            train_x, cfg.stats_noise, bound,
            torch.Generator().manual_seed(_seed(dp_seed, "feature-stats")))
        record = {"feature_stats": {
            "noise_multiplier": cfg.stats_noise, "norm_bound": bound,
            "l2_sensitivity": stats_sensitivity(bound),
            "released": "count, sum and sum of squares of the training rows (Gaussian "
                        "mechanism); the head's shift and scale, in the released model"}}
    else:
        (mean, std), record = exact_feature_stats(train_x), {}
    device = next(model.parameters()).device
    _unwrapped(model).standardise(mean.to(device), std.to(device))
    return record


def _calibrated(cfg: RunConfig, n_units: int, total_steps: int, prefix: tuple) -> Tuple[float, float]:
    """(sigma, q): the sample rate of ``cfg``'s expected batch over ``n_units`` units, and the
    noise multiplier reaching its target eps after ``prefix`` and ``total_steps`` steps (the
    one calibration both the run and :func:`planned_history` use)."""
    q = privacy.sample_rate_for(cfg.batch_size, n_units)
    sigma = privacy.noise_multiplier_for(cfg.target_epsilon, cfg.delta, q, total_steps,
                                         cfg.accountant, prefix=tuple(prefix))
    return sigma, q


def planned_history(cfg: RunConfig, n_units: int) -> List[Tuple[float, float, int]]:
    """The accountant history a single-process DP run of ``cfg`` on ``n_units`` privacy units
    will have when it completes (releases before training, then the noisy steps at the
    derived sigma), computed without training: what a private search needs to bound every
    candidate of its space (:mod:`dpskin_core.book.search`)."""
    if not cfg.dp:
        raise ConfigError("planned_history: the config is not DP")
    prefix = prefix_history(cfg)
    total = privacy.steps_per_epoch(cfg.batch_size, n_units) * cfg.epochs
    sigma, q = _calibrated(cfg, n_units, total, prefix)
    return [*prefix, (sigma, q, total)]


def make_private(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: nn.Module, n_images: int, total_steps: int, prefix: tuple,
                 g_sample: torch.Generator, g_noise: torch.Generator,
                 groups: Optional[List[np.ndarray]] = None, world: World = World()):
    """Opacus' ``make_private`` on our Poisson loader, with sigma derived from the target and
    the per-sample gradient engine resolved for the backbone (:mod:`.persample`):
    (engine, model, optimizer, criterion, loader, sigma, q, mode name). The criterion is
    Opacus' two-pass wrapper under ``ghost``, else unchanged.

    Every privacy unit (an image; with ``groups``, a lesion) enters each batch independently
    with probability q = 1/ceil(U/B) (U units, B the expected batch size), and an epoch is
    exactly ceil(U/B) batches (:mod:`.sampling`): the record, the accountant's hook (which
    Opacus sets to 1/len(loader)) and the sampler use the same q. The optimizer averages the
    noisy sum over the expected number of units per batch, U q. Releases made before training
    (``prefix``) are put first in the accountant's history, so the reported eps composes them.

    Distributed (``world``): the model is wrapped in Opacus' DPDDP, each rank samples its own
    units (:class:`.sampling.PoissonSampler`'s ``shard``), Opacus' distributed optimizers add
    the noise on rank 0 only and all-reduce, and each rank divides by U q / world so that the
    reduced update is (sum of clipped gradients + noise) / (U q), as in one process.
    """
    from opacus import PrivacyEngine

    from .sampling import poisson_loader

    n_units = len(groups) if groups is not None else n_images
    steps = privacy.steps_per_epoch(cfg.batch_size, n_units)
    sigma, q = _calibrated(cfg, n_units, total_steps, prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode=False (research use)
        engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.dp_noise == "secure")
        secure = cfg.dp_noise == "secure"
        loader = poisson_loader(n_images, q, steps, engine.secure_rng if secure else g_sample,
                                groups, shard=(world.rank, world.size))
        model = wrap_private(model, world)
        mode = resolve_mode(cfg.grad_sample_mode, model, **grad_sample_settings(cfg))
        own = mode.attach(model, cfg.max_grad_norm)  # this package's engine, or None
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=False,
            noise_generator=None if secure else g_noise, criterion=criterion,
            grad_sample_mode=mode.opacus_mode)
        model, optimizer, loader = out[0], out[1], out[-1]
        criterion = out[2] if len(out) == 4 else criterion  # ghost: the two-pass loss wrapper
        if own is not None:
            own.bind(model)  # the wrapper calls the model's forward past its own hooks
        model.per_sample_engine = own  # e.g. the book-keeping engine's last per-sample norms
        if mode.name == "bk":  # p.grad is the clipped sum: the optimizer of Opacus' ghost mode
            from opacus.optimizers import (DistributedDPOptimizerFastGradientClipping,
                                           DPOptimizerFastGradientClipping)

            dp_opt = optimizer
            optimizer = (DistributedDPOptimizerFastGradientClipping if world.distributed
                         else DPOptimizerFastGradientClipping)(
                dp_opt.original_optimizer, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
                expected_batch_size=dp_opt.expected_batch_size, loss_reduction="mean",
                generator=dp_opt.generator, secure_mode=secure)
            optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=1 / len(loader)))
    # units per batch on average (Opacus: int()), per rank: the all-reduce sums the ranks
    optimizer.expected_batch_size = n_units * q / world.size
    engine.accountant.history = list(prefix)   # e.g. the histogram release, before any step
    if abs(1 / len(loader) - q) > 1e-12:
        raise AssertionError(f"accountant (q = 1/{len(loader)}) and sampler (q = {q}) disagree")
    return engine, model, optimizer, criterion, loader, sigma, q, mode.name


def lr_factor(schedule: str, total_steps: int, warmup_steps: int = 0):
    """The learning-rate multiplier of step s (0-based): a linear warm-up over the first
    ``warmup_steps`` steps ((s + 1) / warmup), then constant or a cosine from 1 to 0 over the
    remaining steps."""
    warm = min(warmup_steps, total_steps)
    rest = max(1, total_steps - warm)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(s - warm, rest) / rest))
    return factor


def setup_training(cfg: RunConfig, data: DataBundle, device: torch.device,
                   dp_seed: Optional[int] = None, world: World = World(),
                   model_factory: Optional[ModelFactory] = None,
                   prior_counts: Optional[np.ndarray] = None,
                   train_x: Optional[torch.Tensor] = None) -> TrainingSetup:
    """Build the model, loss and optimizer; under DP, derive sigma and make them private.

    ``dp_seed`` is the root of the DP randomness (:func:`.checkpoint.dp_seed`); the model's
    initialisation, augmentation and shuffling of non-private runs come from the public seed.
    ``model_factory`` builds the network instead of ``cfg.backbone`` (its own initialisation);
    ``prior_counts`` replaces the logit adjustment's prior (:func:`build_criterion`);
    ``train_x``: the front end's training rows (encoded here when needed and not given).
    """
    n_train = len(data.y_train)
    torch.manual_seed(init_seed(cfg.seed))
    if model_factory is not None:
        model, eval_model = model_factory().to(device), model_factory().to(device)
    else:
        model = build_network(cfg, pretrained=True).to(device)
        eval_model = build_network(cfg).to(device)
    groups, units, unit_labels = None, None, None
    if cfg.dp and cfg.privacy_unit == "lesion":
        from .sampling import lesion_groups, unit_index

        train_ids = data.meta.loc[data.meta["split"] == "train", "lesion_id"].to_numpy()
        groups = lesion_groups(train_ids)
        units = torch.from_numpy(unit_index(groups, n_train))
        # a lesion's class: the majority label of its images (one label per lesion in HAM10000)
        unit_labels = np.array([np.bincount(data.y_train[g]).argmax() for g in groups])
    criterion, prefix, released = build_criterion(cfg, data, device, dp_seed, unit_labels,
                                                  prior_counts)
    logit_shift = None
    if cfg.la_tau_kept > 0:  # validate() allows it only with a DP logit-adjusted loss
        from .technique import kept_prior_shift

        logit_shift = kept_prior_shift(criterion, cfg.la_tau_kept)
        # post-processing of the noisy histogram: the released predictor is the network plus it
        released = records.with_prediction_shift(released, cfg.la_tau_kept,
                                                 logit_shift.cpu().tolist())
    if cfg.feature_norm != "none":
        if train_x is None:
            train_x = FRONT_ENDS.get(cfg.features).rows(data.x_train, cfg)
        released = {**released, **standardise_features(cfg, model, train_x, dp_seed)}
    optimizer = build_optimizer(model.parameters(), cfg)
    g_sample, g_noise, g_aug = torch.Generator(), torch.Generator(device=device), torch.Generator()
    n_units = len(groups) if groups is not None else n_train
    steps_per_epoch = privacy.steps_per_epoch(cfg.batch_size, n_units)
    if not cfg.dp and world.distributed:
        steps_per_epoch = n_train // cfg.batch_size  # full batches only (below)
    total_steps = steps_per_epoch * cfg.epochs
    engine, sigma, q, mode = None, None, None, None
    if cfg.dp:
        engine, model, optimizer, criterion, loader, sigma, q, mode = make_private(
            cfg, model, optimizer, criterion, n_train, total_steps, prefix, g_sample, g_noise,
            groups, world)
    else:  # every rank draws the same shuffled batch and trains on its slice of it
        model = wrap_plain(model, world)
        # distributed: only full batches, so that every rank's slice is non-empty (DDP's
        # all-reduce needs a backward pass on every rank)
        sampler = None
        if cfg.class_weights == "sqrt-resampled":  # n_train draws with replacement an epoch
            from .technique import class_sampling_weights

            sampler = WeightedRandomSampler(
                torch.from_numpy(class_sampling_weights(data.y_train, len(CLASSES))), n_train,
                replacement=True, generator=g_sample)
        loader = DataLoader(TensorDataset(torch.arange(n_train)), batch_size=cfg.batch_size,
                            shuffle=sampler is None, sampler=sampler, generator=g_sample,
                            drop_last=world.distributed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "original_optimizer", optimizer),
        lr_factor(cfg.lr_schedule, total_steps, round(cfg.warmup_epochs * steps_per_epoch)))
    ema = None
    if cfg.ema_decay is not None:
        from .technique import EMA

        ema = EMA(_unwrapped(model), cfg.ema_decay)
    return TrainingSetup(model, optimizer, loader, scheduler, criterion, engine, sigma, q,
                         steps_per_epoch, g_sample, g_noise, g_aug, eval_model, ema, prefix,
                         released, dp_seed, units, n_units, mode, logit_shift)


# --------------------------------------------------------------------------- the session
@dataclass
class Session:
    """A run in progress: config, data, folder, training setup, record and metric rows."""

    cfg: RunConfig
    run_dir: Path
    data: DataBundle
    device: torch.device
    setup: TrainingSetup
    inputs: Inputs
    world: World = World()
    meta: Dict[str, Any] = field(default_factory=dict)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    best: Dict[str, Any] = field(default_factory=lambda: {"score": -1.0, "epoch": 0, "since": 0})
    start_epoch: int = 1
    epoch: int = 0                # last finished epoch
    eps: Optional[float] = None   # eps spent after the last training epoch (None: non-private)
    t_start: float = field(default_factory=time.perf_counter)
    wall_before_s: float = 0.0    # wall time (s) of the run's earlier segments (resumes)

    def wall_time_s(self) -> float:
        """Wall time of the whole run so far (s): earlier segments plus this one."""
        return self.wall_before_s + time.perf_counter() - self.t_start

    @property
    def meta_path(self) -> Path:
        return self.run_dir / "meta.json"

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def eps_now(self) -> Optional[float]:
        engine = self.setup.engine
        return None if engine is None else float(engine.accountant.get_epsilon(self.cfg.delta))

    def log(self, epoch: int, split: str, metrics: Dict[str, float], eps: Optional[float]) -> None:
        cfg = self.cfg
        for k, v in metrics.items():
            self.rows.append({"run": self.run_dir.name, "seed": cfg.seed, "epoch": epoch,
                              "split": split, "metric": k, "value": float(v), "eps": eps,
                              "delta": cfg.delta if cfg.dp else None,
                              "noise_multiplier": self.setup.noise_multiplier})

    def metrics_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=records.METRIC_COLUMNS)

    def write_meta(self) -> None:
        if self.world.main:  # one writer of the record
            write_json(self.meta_path, self.meta)


def start(cfg: RunConfig, data: DataBundle, run_dir: Path, world: World = World(),
          model_factory: Optional[ModelFactory] = None,
          prior_counts: Optional[np.ndarray] = None) -> Session:
    """Step 1: model, loss, optimizer (private under DP, with the run's DP seed: drawn and
    kept in the private checkpoints folder before anything is drawn from it; under torchrun
    rank 0 draws or reads it and hands it to the other ranks)."""
    if world.distributed and not cfg.dp and cfg.batch_size < world.size:
        raise ConfigError(f"batch_size={cfg.batch_size} leaves some of the {world.size} processes "
                          "without images in a batch; use batch_size >= the number of processes")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device, world)
    seed = None
    if cfg.dp:
        seed = dp_seed(run_dir / "checkpoints", cfg.dp_noise, cfg.seed) if world.main else 0
        seed = world.broadcast_int(seed)
    inputs = Inputs(cfg, data, device)
    setup = setup_training(cfg, data, device, seed, world, model_factory, prior_counts,
                           inputs.train_x)
    return Session(cfg, run_dir, data, device, setup, inputs, world)


def resume(s: Session) -> None:
    """Step 2: restore the state of the last finished epoch, if a checkpoint exists; then
    (re)write the config and the record's header."""
    ck = Checkpoint.load(s.ckpt_dir)
    setup, cfg = s.setup, s.cfg
    if ck is not None:
        _unwrapped(setup.model).load_state_dict(ck.model)
        getattr(setup.optimizer, "original_optimizer", setup.optimizer).load_state_dict(ck.optimizer)
        setup.scheduler.load_state_dict(ck.scheduler)
        if setup.engine is not None:
            setup.engine.accountant.load_state_dict(ck.accountant)
        if setup.ema is not None:
            setup.ema.shadow = ck.ema
        s.rows, s.best, s.start_epoch, s.epoch = ck.rows, ck.best, ck.epoch + 1, ck.epoch
        if ck.early_stopped:  # killed after stopping early, before its final record
            s.start_epoch = cfg.epochs + 1
        s.meta = read_json(s.meta_path) if s.meta_path.is_file() else {}
        s.meta.setdefault("resumed_at_epochs", []).append(ck.epoch)
        s.wall_before_s = float(s.meta.get("wall_time_s", 0.0))
    data, device = s.data, s.device
    s.meta.update({
        "run_id": s.run_dir.name, "name": cfg.name, "recipe": cfg.recipe, "method": cfg.method,
        "status": "running", "code_version": records.code_version(), **records.git_commit(),
        "packages": records.package_versions(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "n_train": len(data.y_train), "n_val": len(data.y_val), "n_test": len(data.y_test),
        "data_info": data.info, "steps_per_epoch": setup.steps_per_epoch,
        "noise_multiplier": setup.noise_multiplier, "sample_rate": setup.sample_rate,
        "delta": cfg.delta if cfg.dp else None, "accountant": cfg.accountant if cfg.dp else None,
        "max_grad_norm": cfg.max_grad_norm if cfg.dp else None, "notes": _notes(cfg),
        "grad_sample_mode": setup.grad_sample_mode, "world_size": s.world.size,
        "privacy": privacy_statement(cfg, setup.n_units) if cfg.dp else None,
        records.RELEASED_KEY: setup.released,
        "prefix_history": privacy.history_summary(setup.prefix_history),
    })
    if s.world.main:
        write_json(s.run_dir / "config.json", cfg.to_dict())
    s.write_meta()


def reseed(s: Session, epoch: int) -> None:
    """Re-seed every stream from (seed, epoch): a resumed run draws the same numbers. Batch
    sampling and noise of a DP run come from its DP seed (secret unless ``dp_noise="seeded"``);
    augmentation, dropout and the shuffling of a non-private run from the public seed.

    Under torchrun each rank has its own streams (rank 0 of 1 draws the single-process ones),
    except the shuffling of a non-private run, which all ranks share (each takes a slice):
    Poisson sampling needs independent draws for every unit."""
    seed, st, w = s.cfg.seed, s.setup, s.world
    root = st.dp_seed if st.dp_seed is not None else seed
    rank = (w.rank,) if w.distributed else ()
    st.g_sample.manual_seed(_seed(root, epoch, "sample", *(rank if st.engine is not None else ())))
    st.g_noise.manual_seed(_seed(root, epoch, "noise", *rank))
    st.g_aug.manual_seed(_seed(seed, epoch, "augment", *rank))
    torch.manual_seed(_seed(seed, epoch, "torch", *rank))
    random.seed(_seed(seed, epoch, "python", *rank))


def _batches(loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: RunConfig):
    """Logical batches, split into physical ones of at most max_physical_batch_size under DP."""
    if cfg.dp and cfg.max_physical_batch_size and cfg.max_physical_batch_size < cfg.batch_size:
        from opacus.utils.batch_memory_manager import wrap_data_loader

        return wrap_data_loader(data_loader=loader, max_batch_size=cfg.max_physical_batch_size,
                                optimizer=optimizer)
    return loader


def train_one_epoch(s: Session, epoch: int) -> Dict[str, float]:
    """Step 3: one pass of (Poisson) batches; logs and returns the training metrics.

    Under DP every step is taken, an empty batch too (a noise-only step the accountant
    counts); the loss and accuracy on the private batches are not recorded (they are not
    noised): only the learning rate and the eps spent are.
    """
    cfg, st, inputs = s.cfg, s.setup, s.inputs
    model, optimizer, k, private = st.model, st.optimizer, cfg.aug_mult, st.engine is not None
    y_tr = torch.from_numpy(s.data.y_train.astype(np.int64))
    reseed(s, epoch)
    model.train()
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(_batches(st.loader, optimizer, cfg), total=st.steps_per_epoch,
               desc=f"{cfg.name} epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False)
    for (idx,) in bar:
        if not private and s.world.distributed:
            idx = idx[s.world.rank::s.world.size]  # this rank's slice of the shared batch
        xb = inputs.train_batch(idx, st.g_aug)  # (B*K, ...) augmented views
        yb = y_tr[idx].to(s.device, non_blocking=True).repeat_interleave(k)
        lam, perm = 1.0, None
        if cfg.mixing != "none":  # non-private only (the config refuses it under DP)
            xb, perm, lam = mix_batch(xb, cfg.mixing, cfg.mixing_alpha, st.g_aug)
        optimizer.zero_grad(set_to_none=True)
        if len(idx) > 0 or private:  # Opacus clips an empty batch to zero and adds the noise
            out = model(xb)
            loss = st.criterion(out, yb)
            if perm is not None and lam < 1.0:  # each mixed input carries two labels
                loss = lam * loss + (1.0 - lam) * st.criterion(out, yb[perm])
            loss.backward()
            if private and k > 1:
                from .technique import average_grad_samples

                average_grad_samples(model, k)  # one gradient per image
            if private and st.units is not None:
                from .sampling import aggregate_grad_samples

                aggregate_grad_samples(model, st.units[idx])  # one gradient per lesion
            if len(idx) > 0:
                loss_sum += loss.item() * len(idx)
                pred = out.argmax(1)
                hit = (pred == yb).float()
                if perm is not None:  # a mixed input is right in proportion to its labels
                    hit = lam * hit + (1.0 - lam) * (pred == yb[perm]).float()
                correct += float(hit.sum()) / k
                seen += len(idx)
        optimizer.step()
        if not getattr(optimizer, "_is_last_step_skipped", False):
            st.scheduler.step()  # once per logical batch
            if st.ema is not None:
                st.ema.update(_unwrapped(model))
        if not private:  # the running loss of private batches is not shown either
            bar.set_postfix(loss=loss_sum / max(seen, 1), acc=correct / max(seen, 1))
    s.meta["train_time_s"] = s.meta.get("train_time_s", 0.0) + time.perf_counter() - t0
    if private:  # the realised Poisson batch sizes are not released (the accountant assumes
        # they stay secret): count the expected images, N q per step
        seen = len(s.data.y_train) * st.sample_rate * st.steps_per_epoch
    else:  # the whole batch's (rank 0 records; each rank saw its slice)
        seen, loss_sum, correct = (s.world.sum(v) for v in (seen, loss_sum, correct))
    s.meta["train_images"] = s.meta.get("train_images", 0) + seen
    metrics = {"lr": st.scheduler.get_last_lr()[0]}
    if not private:
        metrics.update(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1))
    s.eps = s.eps_now()
    s.log(epoch, "train", metrics, s.eps)
    return metrics


def _evaluated_state(s: Session) -> StateDict:
    return s.setup.ema.shadow if s.setup.ema is not None else _state_dict(s.setup.model)


def validate(s: Session, epoch: int) -> float:
    """Step 4: evaluate the weights the run would release (EMA when kept) on the validation
    split; keep them as ``best.pt`` when they improve. Returns the balanced accuracy."""
    st = s.setup
    st.eval_model.load_state_dict(_evaluated_state(s))
    eps = s.eps
    val_metrics = evaluate(s.data.y_val, predict_proba(st.eval_model, s.inputs.val_x, s.inputs,
                                                       logit_shift=st.logit_shift))
    s.log(epoch, "val", val_metrics, eps)
    score = val_metrics["balanced_accuracy"]
    if val_metrics["predicted_classes"] <= 1:  # a constant predictor: say so in the record
        s.meta.setdefault("collapsed_at_epochs", []).append(epoch)
        if s.cfg.progress:
            tqdm.write(f"[{s.cfg.name}] epoch {epoch}: the model predicts one class for every "
                       "validation image (collapsed; a learning-rate warm-up may help)")
    if score > s.best["score"]:
        s.best = {"score": score, "epoch": epoch, "since": 0}
        save_best(s.ckpt_dir, _evaluated_state(s), epoch)
    else:
        s.best["since"] += 1
    if s.cfg.progress:
        tqdm.write(f"[{s.cfg.name}] epoch {epoch}: val loss {val_metrics['nll']:.3f} val bacc "
                   f"{score:.3f}" + (f" eps {eps:.2f}" if eps is not None else ""))
    return score


def checkpoint(s: Session, epoch: int, early_stopped: bool = False) -> None:
    """Step 5: write the state after ``epoch`` atomically (and whether training stops there),
    then the record."""
    st = s.setup
    s.epoch = epoch
    Checkpoint(
        epoch=epoch, model=_state_dict(st.model),
        optimizer=getattr(st.optimizer, "original_optimizer", st.optimizer).state_dict(),
        scheduler=st.scheduler.state_dict(),
        accountant=st.engine.accountant.state_dict() if st.engine else None,
        ema=st.ema.shadow if st.ema is not None else None,
        rng={"torch": torch.get_rng_state(), "sample": st.g_sample.get_state(),
             "noise": st.g_noise.get_state(), "augment": st.g_aug.get_state(),
             "numpy": np.random.get_state(), "python": random.getstate()},
        best=s.best, rows=s.rows, early_stopped=early_stopped).save(s.ckpt_dir)
    s.meta["wall_time_s"] = s.wall_time_s()  # so far: a killed run keeps its earlier segments'
    s.write_meta()


def early_stop(s: Session, epoch: int) -> bool:
    """Whether validation has not improved for ``early_stopping_patience`` epochs."""
    patience = s.cfg.early_stopping_patience
    if patience is not None and s.best["since"] >= patience:
        s.meta["early_stopped_at_epoch"] = epoch
        return True
    return False


def finish(s: Session) -> RunResult:
    """Step 6: evaluate the released model (:func:`.checkpoint.released_weights`) on the
    evaluation split; write predictions, metrics and the complete record."""
    cfg, st, data = s.cfg, s.setup, s.data
    weights, ck_epoch, source = released_weights(s.ckpt_dir, cfg.early_stopping_patience is not None)
    st.eval_model.load_state_dict(weights)
    eval_epoch = s.best["epoch"] if source == "best.pt" else s.epoch
    eps = s.eps_now()
    # optimizer steps taken; under DP read from the accountant, which survives resumes
    steps_taken = (int(sum(h[2] for h in st.engine.accountant.history[len(st.prefix_history):]))
                   if st.engine is not None else s.epoch * st.steps_per_epoch)
    y_ev = getattr(data, f"y_{cfg.eval_split}")
    probs = predict_proba(st.eval_model, s.inputs.eval_x, s.inputs, logit_shift=st.logit_shift)
    final = evaluate(y_ev, probs)
    s.log(eval_epoch, cfg.eval_split, final, eps)
    split_meta = data.meta[data.meta["split"] == cfg.eval_split].reset_index(drop=True)
    pred = pd.DataFrame({"image": split_meta["image"], "label": y_ev, "pred": probs.argmax(1)})
    for i, c in enumerate(CLASSES):
        pred[f"prob_{c}"] = probs[:, i]
    write_atomic(s.run_dir / "predictions.csv", pred.to_csv(index=False))
    metrics_df = s.metrics_frame()
    write_atomic(s.run_dir / "metrics.csv", metrics_df.to_csv(index=False))
    train_time = s.meta.get("train_time_s", 0.0)
    s.meta.update({
        "status": "complete", "epsilon": eps, "steps": steps_taken,
        "collapsed": bool(final["predicted_classes"] <= 1),  # the released model predicts one class
        "final_metrics": final, "eval_epoch": eval_epoch, "eval_split": cfg.eval_split,
        "wall_time_s": s.wall_time_s(),
        "train_images_per_s": s.meta.get("train_images", 0) / train_time if train_time else None,
        "seconds_per_step": train_time / max(1, steps_taken),
        "peak_memory_mb": _peak_memory_mb(s.device),
        "privacy_history": privacy.history_summary(st.engine.accountant.history) if st.engine else None,
    })
    s.write_meta()
    return RunResult(s.run_dir.name, s.run_dir, cfg, final, eps, st.noise_multiplier, metrics_df, s.meta)


def run(
    config: Union[RunConfig, Dict[str, Any]],
    runs_root: Optional[Union[str, Path]] = None,
    *,
    data: Optional[DataBundle] = None,
    stop_after_epoch: Optional[int] = None,
    model_factory: Optional[ModelFactory] = None,
) -> RunResult:
    """Train and evaluate one configuration, writing its run record.

    A run whose folder already holds a complete record (same config and code version) is
    not trained again: its record is returned with ``reused=True``. A run with a checkpoint
    resumes after the last finished epoch. ``stop_after_epoch`` ends the call early (status
    "stopped"), as an interruption would; calling ``run`` again resumes it.

    ``model_factory`` (with ``features="given"`` and ``data`` holding the encoded rows) trains
    a network a higher layer builds (MpLe's); the run id does not see the factory, so its
    caller keys ``runs_root`` by what the factory depends on. One process only.
    """
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    run_dir = records.run_dir_for(cfg, runs_root)
    if records.is_complete(run_dir):
        return _load_result(run_dir, cfg)
    # everything that can fail on bad input happens before the run folder is created
    data = data if data is not None else load_data(data_spec(cfg))
    check_against_data(cfg, data, model_factory)
    world = current(cfg.device)
    if model_factory is not None and world.distributed:
        raise ConfigError("run(model_factory=...) trains in one process; not under torchrun")
    # rank 0 holds the lock; the other ranks follow its decisions (broadcast)
    with records.run_lock(run_dir) if world.main else contextlib.nullcontext():
        # finished by another process while this one loaded the data?
        if world.broadcast_int(records.is_complete(run_dir) if world.main else 0):
            return _load_result(run_dir, cfg)
        s = start(cfg, data, run_dir, world, model_factory)
        resume(s)
        try:
            for epoch in range(s.start_epoch, cfg.epochs + 1):
                if stop_after_epoch is not None and epoch > stop_after_epoch:
                    s.meta["status"] = "stopped"
                    s.write_meta()
                    return RunResult(s.run_dir.name, run_dir, cfg, {}, s.eps_now(),
                                     s.setup.noise_multiplier, s.metrics_frame(), s.meta)
                train_one_epoch(s, epoch)
                stop = False
                if world.main:
                    validate(s, epoch)
                    stop = early_stop(s, epoch)
                    checkpoint(s, epoch, early_stopped=stop)
                s.epoch = epoch
                if world.broadcast_int(stop):
                    break
            result = finish(s) if world.main else None
            world.barrier()  # the record is complete before any rank returns
            return result if result is not None else _load_result(run_dir, cfg)
        except BaseException:
            s.meta["status"] = "interrupted"
            s.meta["wall_time_s"] = s.wall_time_s()
            s.write_meta()
            raise


def privacy_statement(cfg: RunConfig, n_units: int) -> Dict[str, Any]:
    """What a DP run's guarantee is, and what it does not count (recorded in meta.json and on
    the privacy card)."""
    unit = cfg.privacy_unit
    return {
        "unit": unit,
        "adjacency": ("add/remove one training image" if unit == "image" else
                      "add/remove one lesion (all of its training images)"),
        "n_units": n_units, "delta": cfg.delta, "accountant": cfg.accountant,
        "mechanism": f"Poisson-subsampled Gaussian mechanism (DP-{cfg.optimizer.upper()} by "
                     f"Opacus, per-{unit} clipping at C = {cfg.max_grad_norm})"
                     + (" composed with a noisy class histogram" if cfg.logit_adjust else "")
                     + (" and noisy feature statistics" if cfg.feature_norm == "private" else ""),
        "dp_noise": cfg.dp_noise,
        "dp_noise_note": {
            "secret": "the DP randomness (sampling, noise) comes from a seed drawn from OS "
                      "entropy and kept only in the run's private checkpoints folder",
            "seeded": "RESEARCH MODE: the DP randomness is derived from the public seed; anyone "
                      "with the config can regenerate the noise, so the guarantee does not hold "
                      "against them",
            "secure": "the DP randomness comes from Opacus' cryptographically secure RNG",
        }[cfg.dp_noise],
        "not_counted": [
            "the choice of hyperparameters and recipe (made on this and earlier runs' "
            "validation results)",
            *(["model selection on the validation split (early stopping, best epoch)"]
              if cfg.early_stopping_patience is not None else []),
            f"the number of training {unit}s N (treated as public; it sets the sampling rate)",
            "the validation and test splits (not protected: their metrics and predictions are "
            "released as any evaluation is)",
        ],
    }


def _notes(cfg: RunConfig) -> List[str]:
    notes = ["Normalisation uses fixed public constants (" + cfg.normalisation + "), no data statistics."]
    if cfg.dp:
        unit = cfg.privacy_unit
        notes.append(
            f"(eps, delta)-DP under add/remove of one training {unit} by DP-{cfg.optimizer.upper()} "
            f"(Opacus, Poisson sampling of {unit}s, per-{unit} clipping C={cfg.max_grad_norm}); "
            f"eps from the {cfg.accountant} accountant.")
        notes.append(privacy_statement(cfg, 0)["dp_noise_note"][0].upper()
                     + privacy_statement(cfg, 0)["dp_noise_note"][1:] + ".")
        notes.append("Model selection on the validation split (early stopping, best epoch) is not "
                     "counted in eps." if cfg.early_stopping_patience is not None else
                     "The final model is the last iterate; no validation-based choice is made.")
        notes.append("Training loss and accuracy on the private batches are not recorded; the "
                     "curves are of the validation split.")
        if cfg.logit_adjust:
            notes.append(
                f"The class prior of the logit-adjusted loss is a histogram of the training "
                f"{unit}s' classes released once with the Gaussian mechanism (L2 sensitivity 1, "
                f"noise std {cfg.hist_noise}); eps is the accountant's composition of that release "
                "(as one step with q = 1) and the DP training steps.")
        if cfg.feature_norm == "private":
            notes.append(
                f"The head standardises its features with their count, sum and sum of squares "
                f"over the training images, released once with the Gaussian mechanism (rows "
                f"clipped to the front end's norm bound; noise multiplier {cfg.stats_noise}), "
                "composed into eps as one more step with q = 1.")
    else:
        notes.append("Non-private: no privacy guarantee.")
    return notes


def _load_result(run_dir: Path, cfg: RunConfig) -> RunResult:
    meta = read_json(run_dir / "meta.json")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return RunResult(run_dir.name, run_dir, cfg, meta.get("final_metrics", {}), meta.get("epsilon"),
                     meta.get("noise_multiplier"), metrics, meta, reused=True)
