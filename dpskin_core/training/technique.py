"""The proposed technique: DP training aimed at *balanced* accuracy on small, skewed data.

Four levers, each switched by a config field and ablated in the book (the front ends are
in :mod:`.frontends`, their heads in :mod:`.backbones`; the losses and averages here):

1. ``features="colour"`` (or ``"scatter"``) -- a data-independent front end. ``colour``
   replaces each image by RGB colour histograms (4x4x4 bins, whole image and centre
   crop, square-rooted: 128 numbers), a classical dermoscopy cue (lesion colours are a
   diagnostic criterion: the ABCD rule's "C") that needs no learning at all. ``scatter``: Images are replaced once by
   their wavelet scattering coefficients (Mallat 2012; J=2, L=8, per colour channel: 243
   channels at S/4 x S/4), then a small head is trained. The transform has no parameters
   and sees no labels, so it costs no privacy; it removes most of the parameters DP noise
   has to fight (Tramer & Boneh 2021, "Differentially private learning needs better
   features").
2. ``logit_adjust=True`` -- balance through the loss, not the weights. Per-sample clipping
   undoes class weights (a clipped gradient has norm C whatever its weight), but it keeps
   the *direction* of a logit-adjusted loss, CE(f(x) + tau log pi, y) (Menon et al. 2021),
   whose minimiser is the balanced-error Bayes classifier when f is evaluated unadjusted.
   The class prior pi comes from a class histogram released once with the Gaussian
   mechanism (L2 sensitivity 1 under add/remove of one image, noise std ``hist_noise``);
   that release is composed with DP-SGD in the accountant as the step (hist_noise, q=1, 1).
   ``la_tau_kept`` keeps part of the prior in the released predictor's logits
   (:func:`kept_prior_shift`; post-processing of the histogram).
3. ``ema_decay`` -- an exponential moving average of the iterates (post-processing: free),
   which averages out DP noise in the final model.
4. ``aug_mult=K`` -- augmentation multiplicity (De et al. 2022): each sample's gradient is
   the average over K augmented views *before* clipping, so augmentation adds signal
   without adding sensitivity.

5. ``feature_norm="private"`` -- standardised features for the linear head (Tramer & Boneh
   2021 normalise their ScatterNet features privately too): the count, sum and sum of
   squares of the training rows, released once with the Gaussian mechanism
   (:func:`noisy_feature_stats`; every row has L2 norm at most R, the front end's bound, so
   the released vector's L2 sensitivity is sqrt(1 + R^2 + R^4); noise std ``stats_noise``
   times that), composed as the step (stats_noise, q=1, 1). Without it the head sees raw
   features whose scales differ by orders of magnitude, and clipping favours the large ones.

Privacy: the released objects are the noisy histogram, the noisy feature statistics and the
DP-SGD iterates; everything else (front ends, EMA, evaluation) is post-processing. Total eps
is the accountant's composition of [(hist_noise, 1, 1), (stats_noise, 1, 1), (sigma, q, T)]
at delta (each release only when its lever is on), and sigma is derived so that this total
meets the target.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from torch import nn

from ..constants import NUM_CLASSES
from ..errors import ConfigError
from .sampling import grad_samples


def noisy_class_histogram(labels: np.ndarray, noise_std: float, generator: torch.Generator,
                          num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class counts + N(0, noise_std^2) per bin: the Gaussian mechanism, L2 sensitivity 1.

    Adding or removing one image changes one bin by 1, so the L2 sensitivity is 1 and this
    release is the Gaussian mechanism with noise multiplier ``noise_std``.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    noise = torch.randn(num_classes, generator=generator, dtype=torch.float64).numpy() * noise_std
    return counts + noise


#: floor of a released feature variance, in squared units of the features (rows of norm 2
#: spread over hundreds of features: 1e-3 keeps a feature that the noise leaves at variance
#: ~0 from being scaled up by 1/sqrt(noise); chosen on the validation split)
VAR_FLOOR = 1e-3


def stats_sensitivity(norm_bound: float) -> float:
    """L2 sensitivity of the vector (count, sum of rows, sum of squared rows) under add/remove
    of one row of L2 norm at most R: ||(1, x, x*x)|| <= sqrt(1 + R^2 + R^4)."""
    r2 = float(norm_bound) ** 2
    return math.sqrt(1.0 + r2 + r2 * r2)


def noisy_feature_stats(x: torch.Tensor, noise_std: float, norm_bound: float,
                        generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the rows of ``x`` (N, D), by one Gaussian release.

    Rows are first clipped to L2 norm ``norm_bound`` (a no-op for a front end that guarantees
    it), then (N, sum x, sum x^2) gets N(0, (noise_std * sensitivity)^2) per coordinate; the
    mean and variance are computed from the noisy sums (post-processing), the variance floored
    at :data:`VAR_FLOOR`. ``noise_std`` is the noise multiplier of the accountant's step
    (noise_std, 1, 1).
    """
    x = x.double().flatten(1)
    norms = x.norm(dim=1, keepdim=True)
    x = x * torch.clamp(norm_bound / norms.clamp_min(1e-12), max=1.0)
    d = x.shape[1]
    released = torch.cat([torch.tensor([float(len(x))], dtype=torch.float64), x.sum(0),
                          (x * x).sum(0)])
    released += torch.randn(1 + 2 * d, generator=generator, dtype=torch.float64) * (
        noise_std * stats_sensitivity(norm_bound))
    n = max(float(released[0]), 1.0)
    mean = released[1:1 + d] / n
    var = (released[1 + d:] / n - mean * mean).clamp_min(VAR_FLOOR)
    return mean.float(), var.sqrt().float()


def exact_feature_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the rows of ``x``, std floored as in :func:`noisy_feature_stats`: the
    non-private runs' normalisation (it reads the private data exactly)."""
    x = x.double().flatten(1)
    return x.mean(0).float(), x.var(0, unbiased=False).clamp_min(VAR_FLOOR).sqrt().float()


def log_prior(counts: np.ndarray, floor: float = 1.0) -> np.ndarray:
    """log of the class prior from (noisy) counts, each count floored at ``floor``."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), floor)
    return np.log(c / c.sum())


def balanced_weights(counts: np.ndarray, floor: float = 1.0) -> np.ndarray:
    """Inverse-frequency ("balanced") class weights ``N / (K n_c)`` from class counts, each count
    floored at ``floor`` (an empty class gets a large weight, not a division by zero)."""
    c = np.asarray(counts, dtype=np.float64)
    return c.sum() / (len(c) * np.maximum(c, floor))


def class_loss_weights(counts: np.ndarray, kind: str) -> np.ndarray:
    """The loss's class weights of ``RunConfig.class_weights`` (non-private: exact counts):
    ``balanced``, N / (K n_c); ``sqrt-resampled``, their square root, for batches drawn in
    proportion to n_c^-1/2 (:func:`class_sampling_weights`): each class's expected share of
    the loss is then the same, as with ``balanced``, but from more of its images and smaller
    weights (a rare class is seen sqrt(N / (K n_c)) times as often, not weighted that much
    more)."""
    w = balanced_weights(counts)
    if kind == "balanced":
        return w
    if kind == "sqrt-resampled":
        return np.sqrt(w)
    raise ConfigError(f"class_weights={kind!r}: no loss weights (known: balanced, sqrt-resampled)")


def class_sampling_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-image draw probabilities (float64, summing to 1) of ``sqrt-resampled`` batches:
    proportional to n_c^-1/2 for an image of class c, so that class c is drawn in proportion
    to sqrt(n_c)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    p = class_loss_weights(counts, "sqrt-resampled")[labels]  # the loss weights, n_c^-1/2
    return p / p.sum()


class LogitAdjustedLoss(nn.Module):
    """CE(logits + tau * log_prior, y) (Menon et al. 2021); predict with plain logits, or with
    logits + tau_kept * log_prior (:func:`kept_prior_shift`)."""

    def __init__(self, log_prior_: np.ndarray, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        # float64, the prior's own precision: each shift is rounded to the logits' dtype once
        self.register_buffer("log_prior", torch.tensor(np.asarray(log_prior_), dtype=torch.float64))

    @property
    def shift(self) -> torch.Tensor:
        """The training shift ``tau * log_prior`` (C,), float32."""
        return (self.tau * self.log_prior).float()

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + self.shift.to(logits.dtype), y)


def prior_loss(counts: np.ndarray, tau: float) -> LogitAdjustedLoss:
    """The logit-adjusted loss at strength ``tau`` of the class prior of ``counts`` (noisy
    under DP; floored at one as :func:`log_prior`): the one place a prior becomes a loss, so
    a run's training and a federation's kept shift build the same one."""
    return LogitAdjustedLoss(log_prior(np.asarray(counts, dtype=np.float64)), tau)


def kept_prior_shift(loss: LogitAdjustedLoss, tau_kept: float) -> torch.Tensor:
    """The shift (C,) added to the logits of a model trained by ``loss`` at prediction:
    ``tau_kept * log_prior``, a post-hoc logit adjustment (Menon et al. 2021, Sec. 4) on top of
    the loss's. ``tau_kept = 0`` predicts with the plain logits (the balanced-error rule when
    the loss's tau is 1); ``tau_kept = tau`` with the adjusted logits the loss was fitted to.
    A model trained at tau > 1 over-predicts the rare classes; keeping part of the prior
    trades some of that back. Under DP the prior is the released noisy histogram, so the shift
    is post-processing: it costs no privacy."""
    return (float(tau_kept) * loss.log_prior).float()


class EMA:
    """Exponential moving average of parameters (post-processing of DP iterates: free)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def average_grad_samples(model: nn.Module, k: int) -> None:
    """Augmentation multiplicity: average Opacus' per-sample gradients over groups of k views.

    The batch was laid out as B images x k views (view-major within an image), so
    ``grad_sample`` (B*k, ...) becomes (B, ...) before the optimizer clips per sample.
    """
    for p, gs in grad_samples(model):
        p.grad_sample = gs.view(-1, k, *gs.shape[1:]).mean(dim=1)
