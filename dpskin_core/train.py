"""The one entry point: ``run(config) -> RunResult``.

Non-private SGD/Adam, and DP-SGD/DP-Adam through Opacus' ``PrivacyEngine`` with Poisson
sampling and per-sample clipping. The noise multiplier is derived from the target
(eps, delta) before training (:func:`privacy.noise_multiplier_for`) and recorded.

Reproducibility and resume: every random stream (batch sampling, DP noise, augmentation,
dropout) is re-seeded at the start of each epoch from ``(seed, epoch)``, and a checkpoint with
model, optimizer, scheduler, RNG and accountant state is written atomically after each epoch.
A run interrupted after epoch k therefore resumes at epoch k+1 and ends with the same
weights and the same eps as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import math
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import privacy, results
from . import technique  # noqa: F401  (registers the scatter_* heads in BACKBONES)
from .augment import Inputs
from .config import RunConfig
from .constants import CLASSES
from .data import DataBundle, DataSpec, load_data
from .errors import ConfigError
from .metrics import evaluate
from .models import build_backbone
from .registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: RunConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (for "auto"), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available")
    return torch.device(name)


def _seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def data_spec(cfg: RunConfig) -> DataSpec:
    return DataSpec(dataset=cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size,
                    split=cfg.split, val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                    split_seed=cfg.split_seed, cache_dir=cfg.cache_dir, synth_n=cfg.synth_n)


def check_against_data(cfg: RunConfig, data: DataBundle) -> None:
    """Checks that need N: batch size, delta < 1/N, non-empty evaluation split."""
    n = len(data.y_train)
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training set (N = {n})")
    if cfg.dp:
        privacy.check_epsilon_delta(cfg.target_epsilon, cfg.delta, n)
    for split in {"val", cfg.eval_split}:
        if len(getattr(data, f"y_{split}")) == 0:
            raise ConfigError(f"the {split} split is empty; change val_frac/test_frac")


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, inputs: Inputs, batch: int = 512) -> np.ndarray:
    """Softmax probabilities (N, C) of stored rows ``x`` (images or features)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        out.append(torch.softmax(model(inputs.eval(x[i:i + batch])).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)))


def _state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    inner = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the model
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    getattr(model, "_module", model).load_state_dict(state)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


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


def setup_training(cfg: RunConfig, data: DataBundle, device: torch.device) -> TrainingSetup:
    """Build the model and optimizer; under DP, derive sigma and make them private (Opacus).

    Under DP the loader is Opacus' DPDataLoader: every training image enters each batch
    independently with probability q = 1/ceil(N/B) (Poisson sampling, as the accountant
    assumes), ceil(N/B) batches per epoch.
    """
    n_train = len(data.y_train)
    torch.manual_seed(_seed(cfg.seed, "init"))
    model = build_backbone(cfg.backbone, num_classes=len(CLASSES),
                           pretrained_path=cfg.pretrained_path).to(device)
    eval_model = build_backbone(cfg.backbone, num_classes=len(CLASSES)).to(device)
    prefix, released = (), {}
    counts = np.bincount(data.y_train, minlength=len(CLASSES)).astype(float)
    if cfg.logit_adjust:
        from .technique import LogitAdjustedLoss, log_prior, noisy_class_histogram

        if cfg.dp:  # the prior is a Gaussian-mechanism release, composed below
            counts = noisy_class_histogram(data.y_train, cfg.hist_noise,
                                           torch.Generator().manual_seed(_seed(cfg.seed, "histogram")))
            prefix = ((float(cfg.hist_noise), 1.0, 1),)
            released = {"class_histogram": counts.round(2).tolist(), "hist_noise": cfg.hist_noise}
        criterion: nn.Module = LogitAdjustedLoss(log_prior(counts), cfg.la_tau).to(device)
    elif cfg.class_weights == "balanced":  # non-private only (config refuses it under dp)
        w = torch.tensor(counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), dtype=torch.float32)
        criterion = nn.CrossEntropyLoss(weight=w.to(device))
    else:
        criterion = nn.CrossEntropyLoss()
    optimizer = OPTIMIZERS.get(cfg.optimizer)(model.parameters(), cfg)
    g_sample, g_noise, g_aug = torch.Generator(), torch.Generator(device=device), torch.Generator()
    loader = DataLoader(TensorDataset(torch.arange(n_train)), batch_size=cfg.batch_size,
                        shuffle=not cfg.dp, generator=g_sample)
    steps_per_epoch = privacy.steps_per_epoch(cfg.batch_size, n_train)
    total_steps = steps_per_epoch * cfg.epochs
    engine, sigma, q = None, None, None
    if cfg.dp:
        from opacus import PrivacyEngine

        q = privacy.sample_rate_for(cfg.batch_size, n_train)
        sigma = privacy.noise_multiplier_for(cfg.target_epsilon, cfg.delta, q, total_steps,
                                             cfg.accountant, prefix=prefix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode=False (research use)
            engine = PrivacyEngine(accountant=cfg.accountant)
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, noise_generator=g_noise)
        loader.batch_sampler.generator = g_sample  # the Poisson sampler draws from our stream
        engine.accountant.history = list(prefix)   # e.g. the histogram release, before any step
        assert abs(loader.sample_rate - q) < 1e-12, "accountant and sampler disagree on q"
    schedule = (lambda s: 1.0) if cfg.lr_schedule == "constant" else (
        lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        getattr(optimizer, "original_optimizer", optimizer), schedule)
    ema = None
    if cfg.ema_decay is not None:
        from .technique import EMA

        ema = EMA(getattr(model, "_module", model), cfg.ema_decay)
    return TrainingSetup(model, optimizer, loader, scheduler, criterion, engine, sigma, q,
                         steps_per_epoch, g_sample, g_noise, g_aug, eval_model, ema, prefix, released)



def run(
    config: Union[RunConfig, Dict[str, Any]],
    runs_root: Optional[Union[str, Path]] = None,
    *,
    data: Optional[DataBundle] = None,
    stop_after_epoch: Optional[int] = None,
) -> RunResult:
    """Train and evaluate one configuration, writing its run record.

    A run whose folder already holds a complete record (same config and code version) is
    not trained again: its record is returned with ``reused=True``. A run with a checkpoint
    resumes after the last finished epoch. ``stop_after_epoch`` ends the call early (status
    "stopped"), as an interruption would; calling ``run`` again resumes it.
    """
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    run_dir = results.run_dir_for(cfg, runs_root)
    run_id = run_dir.name
    meta_path = run_dir / "meta.json"
    if meta_path.is_file() and results.read_json(meta_path).get("status") == "complete":
        return _load_result(run_dir, cfg)

    # ---- everything that can fail on bad input happens before training ---------------
    data = data if data is not None else load_data(data_spec(cfg))
    check_against_data(cfg, data)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    setup = setup_training(cfg, data, device)
    model, optimizer, loader, engine = setup.model, setup.optimizer, setup.loader, setup.engine
    scheduler, criterion, sigma, q = setup.scheduler, setup.criterion, setup.noise_multiplier, setup.sample_rate
    g_sample, g_noise, g_aug = setup.g_sample, setup.g_noise, setup.g_aug
    steps_per_epoch, n_train = setup.steps_per_epoch, len(data.y_train)
    inputs = Inputs(cfg, data, device)
    x_tr, y_tr = inputs.train_x, torch.from_numpy(data.y_train.astype(np.int64))
    x_val, x_ev = inputs.val_x, inputs.eval_x
    y_ev = getattr(data, f"y_{cfg.eval_split}")
    ema, eval_model, k = setup.ema, setup.eval_model, cfg.aug_mult

    def eval_state() -> Dict[str, torch.Tensor]:
        return ema.shadow if ema is not None else _state_dict(model)

    # ---- resume -------------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    rows: List[Dict[str, Any]] = []
    start_epoch, best = 1, {"score": -1.0, "epoch": 0, "since": 0}
    meta: Dict[str, Any] = {}
    if (ckpt_dir / "last.pt").is_file():
        ck = results.load_checkpoint(ckpt_dir / "last.pt")
        _load_state(model, ck["model"])
        getattr(optimizer, "original_optimizer", optimizer).load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if engine is not None:
            engine.accountant.load_state_dict(ck["accountant"])
        if ema is not None:
            ema.shadow = ck["ema"]
        rows, best, start_epoch = ck["rows"], ck["best"], ck["epoch"] + 1
        meta = results.read_json(meta_path) if meta_path.is_file() else {}
        meta.setdefault("resumed_at_epochs", []).append(ck["epoch"])
    meta.update({
        "run_id": run_id, "name": cfg.name, "method": cfg.method, "status": "running",
        "code_version": results.code_version(), **results.git_commit(),
        "packages": results.package_versions(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "n_train": n_train, "n_val": len(data.y_val), "n_test": len(data.y_test),
        "data_info": data.info, "steps_per_epoch": steps_per_epoch,
        "noise_multiplier": sigma, "sample_rate": q, "delta": cfg.delta if cfg.dp else None,
        "accountant": cfg.accountant if cfg.dp else None, "max_grad_norm": cfg.max_grad_norm,
        "notes": _notes(cfg), "released_before_training": setup.released,
        "prefix_history": privacy.history_summary(setup.prefix_history),
    })
    results.write_json(run_dir / "config.json", cfg.to_dict())
    results.write_json(meta_path, meta)

    def eps_now() -> Optional[float]:
        return None if engine is None else float(engine.accountant.get_epsilon(cfg.delta))

    def log(epoch: int, split: str, metrics: Dict[str, float], eps: Optional[float]) -> None:
        for k, v in metrics.items():
            rows.append({"run": run_id, "seed": cfg.seed, "epoch": epoch, "split": split,
                         "metric": k, "value": float(v), "eps": eps,
                         "delta": cfg.delta if cfg.dp else None, "noise_multiplier": sigma})

    train_time, train_images = meta.get("train_time_s", 0.0), meta.get("train_images", 0)
    t_start = time.perf_counter()
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stop_after_epoch is not None and epoch > stop_after_epoch:
                meta["status"] = "stopped"
                results.write_json(meta_path, meta)
                return RunResult(run_id, run_dir, cfg, {}, eps_now(), sigma,
                                 pd.DataFrame(rows, columns=results.METRIC_COLUMNS), meta)
            # re-seed every stream from (seed, epoch): a resumed run draws the same numbers
            g_sample.manual_seed(_seed(cfg.seed, epoch, "sample"))
            g_noise.manual_seed(_seed(cfg.seed, epoch, "noise"))
            g_aug.manual_seed(_seed(cfg.seed, epoch, "augment"))
            torch.manual_seed(_seed(cfg.seed, epoch, "torch"))
            random.seed(_seed(cfg.seed, epoch, "python"))
            model.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            batches = _batches(loader, optimizer, cfg)
            bar = tqdm(batches, total=steps_per_epoch, desc=f"{cfg.name} epoch {epoch}/{cfg.epochs}",
                       disable=not cfg.progress, leave=False)
            last_eps = rows[-1]["eps"] if rows else (0.0 if engine else None)
            for (idx,) in bar:
                xb = inputs.train(x_tr[idx], g_aug)  # (B*K, ...) augmented views
                yb = y_tr[idx].to(device, non_blocking=True).repeat_interleave(k)
                optimizer.zero_grad(set_to_none=True)
                if len(idx) > 0:
                    out = model(xb)
                    loss = criterion(out, yb)
                    loss.backward()
                    if engine is not None and k > 1:
                        from .technique import average_grad_samples

                        average_grad_samples(model, k)  # one clipped gradient per image
                    loss_sum += loss.item() * len(idx)
                    correct += int((out.argmax(1) == yb).sum()) / k
                    seen += len(idx)
                optimizer.step()
                if not getattr(optimizer, "_is_last_step_skipped", False):
                    scheduler.step()  # once per logical batch
                    if ema is not None:
                        ema.update(getattr(model, "_module", model))
                bar.set_postfix(loss=loss_sum / max(seen, 1), acc=correct / max(seen, 1),
                                eps=last_eps)
            train_time += time.perf_counter() - t0
            train_images += seen
            eps = eps_now()
            log(epoch, "train", {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                                 "lr": scheduler.get_last_lr()[0]}, eps)
            eval_model.load_state_dict(eval_state())
            probs = predict_proba(eval_model, x_val, inputs)
            val_metrics = evaluate(data.y_val, probs)
            log(epoch, "val", val_metrics, eps)
            score = val_metrics["balanced_accuracy"]
            if score > best["score"]:
                best = {"score": score, "epoch": epoch, "since": 0}
                results.save_checkpoint(ckpt_dir / "best.pt", {"model": eval_state(), "epoch": epoch})
            else:
                best["since"] += 1
            if cfg.progress:
                tqdm.write(f"[{cfg.name}] epoch {epoch}: train loss {loss_sum / max(seen, 1):.3f} "
                           f"val bacc {score:.3f}" + (f" eps {eps:.2f}" if eps is not None else ""))
            meta.update(train_time_s=train_time, train_images=train_images)
            results.save_checkpoint(ckpt_dir / "last.pt", {
                "epoch": epoch, "model": _state_dict(model),
                "optimizer": getattr(optimizer, "original_optimizer", optimizer).state_dict(),
                "scheduler": scheduler.state_dict(),
                "accountant": engine.accountant.state_dict() if engine else None,
                "ema": ema.shadow if ema is not None else None,
                "rng": {"torch": torch.get_rng_state(), "sample": g_sample.get_state(),
                        "noise": g_noise.get_state(), "augment": g_aug.get_state(),
                        "numpy": np.random.get_state(), "python": random.getstate()},
                "best": best, "rows": rows})
            results.write_json(meta_path, meta)
            if cfg.early_stopping_patience is not None and best["since"] >= cfg.early_stopping_patience:
                meta["early_stopped_at_epoch"] = epoch
                break
    except BaseException:
        meta["status"] = "interrupted"
        results.write_json(meta_path, meta)
        raise

    # ---- final evaluation -----------------------------------------------------------------
    if cfg.early_stopping_patience is not None and (ckpt_dir / "best.pt").is_file():
        eval_model.load_state_dict(results.load_checkpoint(ckpt_dir / "best.pt")["model"])
        eval_epoch = best["epoch"]
    else:
        eval_model.load_state_dict(eval_state())
        eval_epoch = epoch
    eps = eps_now()
    # optimizer steps taken; under DP read from the accountant, which survives resumes
    steps_taken = (int(sum(h[2] for h in engine.accountant.history[len(setup.prefix_history):]))
                   if engine is not None else epoch * steps_per_epoch)
    probs = predict_proba(eval_model, x_ev, inputs)
    final = evaluate(y_ev, probs)
    log(eval_epoch, cfg.eval_split, final, eps)
    split_meta = data.meta[data.meta["split"] == cfg.eval_split].reset_index(drop=True)
    pred = pd.DataFrame({"image": split_meta["image"], "label": y_ev, "pred": probs.argmax(1)})
    for i, c in enumerate(CLASSES):
        pred[f"prob_{c}"] = probs[:, i]
    results.write_atomic(run_dir / "predictions.csv", pred.to_csv(index=False))
    metrics_df = pd.DataFrame(rows, columns=results.METRIC_COLUMNS)
    results.write_atomic(run_dir / "metrics.csv", metrics_df.to_csv(index=False))
    meta.update({
        "status": "complete", "epsilon": eps, "steps": steps_taken,
        "final_metrics": final, "eval_epoch": eval_epoch, "eval_split": cfg.eval_split,
        "wall_time_s": meta.get("wall_time_s", 0.0) + time.perf_counter() - t_start,
        "train_images_per_s": train_images / train_time if train_time else None,
        "seconds_per_step": train_time / max(1, steps_taken),
        "peak_memory_mb": _peak_memory_mb(device),
        "privacy_history": privacy.history_summary(engine.accountant.history) if engine else None,
    })
    results.write_json(meta_path, meta)
    return RunResult(run_id, run_dir, cfg, final, eps, sigma, metrics_df, meta)


def _batches(loader, optimizer, cfg: RunConfig):
    """Logical batches, split into physical ones of at most max_physical_batch_size under DP."""
    if cfg.dp and cfg.max_physical_batch_size and cfg.max_physical_batch_size < cfg.batch_size:
        from opacus.utils.batch_memory_manager import wrap_data_loader

        return wrap_data_loader(data_loader=loader, max_batch_size=cfg.max_physical_batch_size,
                                optimizer=optimizer)
    return loader


def _notes(cfg: RunConfig) -> List[str]:
    notes = ["Normalisation uses fixed public constants (" + cfg.normalisation + "), no data statistics."]
    if cfg.dp:
        notes.append(
            f"(eps, delta)-DP for the training split by DP-{cfg.optimizer.upper()} (Opacus, Poisson "
            f"sampling, per-sample clipping C={cfg.max_grad_norm}); eps from the {cfg.accountant} "
            "accountant. Opacus secure_mode is off (seeded PRNG noise): fine for research, not for "
            "deployment.")
        notes.append("Model selection on the validation split (early stopping, best epoch) is not "
                     "counted in eps." if cfg.early_stopping_patience is not None else
                     "The final model is the last iterate; no validation-based choice is made.")
        if cfg.logit_adjust:
            notes.append(
                f"The class prior of the logit-adjusted loss is a class histogram released once "
                f"with the Gaussian mechanism (L2 sensitivity 1, noise std {cfg.hist_noise}); eps "
                "is the accountant's composition of that release (as one step with q = 1) and "
                "the DP training steps.")
    else:
        notes.append("Non-private: no privacy guarantee.")
    return notes


def _load_result(run_dir: Path, cfg: RunConfig) -> RunResult:
    meta = results.read_json(run_dir / "meta.json")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return RunResult(run_dir.name, run_dir, cfg, meta.get("final_metrics", {}), meta.get("epsilon"),
                     meta.get("noise_multiplier"), metrics, meta, reused=True)
