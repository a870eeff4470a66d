"""Attacks on MpLe's morphing (the scheme's security, measured rather than claimed).

Known plaintext: who holds N (plain, morphed) pairs solves ``X M = Z`` for the key. The padding
is always zero, so only the key's rows of the C H W pixels matter (and can be identified): N >=
C H W pairs of linearly independent images give them exactly (least squares). The images come back
through an inverse regressed directly on the pairs (morphed -> plain, ridge with fewer pairs
than pixels: every other image is then mapped to about its projection onto the known ones'
span); the quality of what comes back is measured by PSNR on the normalised images.

From the model: the service provider holds ``C_ac = M^-1 C_r P`` and knows (or guesses: a
public pretrained first layer) ``C_r``. Every output channel k of C_r is ``sum_t w_k[t] S_t``
over the C k k kernel taps t (S_t fixed shift matrices), so the Cout channel blocks of C_r span
only C k k dimensions, and their linear dependencies are those of the kernel rows ``w_k``.
Left multiplication by M^-1 keeps every linear dependency, so the leverage score of channel j
of C_ac (the diagonal of the projector onto the row space of its channels' Gram matrix) equals
that of kernel ``P(j)``: sorting the scores recovers P whenever they are distinct (Cout > C k k),
and then ``M^-1 = C_ac (C_r P)^+`` by least squares. No image is needed.

Ciphertext only (:func:`second_order`): the morphed samples' first and second moments, matched
to public look-alike images', fix the images up to an orthogonal d x d matrix; measured, not
assumed, by SSIM (:func:`ssim`) as Carlini et al. measure their attack on InstaHide.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .keys import MorphKey
from .morph import flatten_padded, interior, unflatten


def _pairs(x_plain: torch.Tensor, z: torch.Tensor, key: MorphKey, ridge: float):
    key.check_images(tuple(x_plain.shape), "known plaintexts")
    if tuple(z.shape) != (x_plain.shape[0], key.d):
        raise ConfigError(f"known-plaintext attack: {tuple(z.shape)} morphed samples for "
                          f"{x_plain.shape[0]} images of d = {key.d}")
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ConfigError(f"known-plaintext attack: ridge must be finite and >= 0, got {ridge}")
    return (flatten_padded(x_plain.to(torch.float64), key.spec.pad).numpy(),
            z.to(torch.float64).numpy())


def _regress(a: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |a W - b|^2 + lam |W|^2, lam = ridge x the mean eigenvalue of a^T a (so the
    ridge is relative to the data's scale); least squares (minimum norm) when ridge = 0."""
    if ridge == 0:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    g = a.T @ a
    return np.linalg.solve(g + ridge * np.trace(g) / len(g) * np.eye(len(g)), a.T @ b)


def estimate_key(x_plain: torch.Tensor, z: torch.Tensor, key: MorphKey, ridge: float = 0.0) -> np.ndarray:
    """An estimate of M (d, d) from ``x_plain`` (N, C, H, W) normalised images and their
    morphed samples ``z`` (N, d), by least squares (``ridge = 0``) or ridge regression."""
    x, zz = _pairs(x_plain, z, key, ridge)
    return _regress(x, zz, ridge)


def estimate_inverse(x_plain: torch.Tensor, z: torch.Tensor, key: MorphKey, ridge: float = 0.0) -> np.ndarray:
    """A linear inverse W (d, d), morphed sample -> padded flattened image, regressed on the
    known pairs: with N >= C H W pairs it is M^-1 on the images' span; with fewer it maps any
    morphed image to (about) its projection onto the span of the known ones."""
    x, zz = _pairs(x_plain, z, key, ridge)
    return _regress(zz, x, ridge)


def _leverage(blocks: torch.Tensor, rank: int) -> np.ndarray:
    """Leverage scores of the Cout channel blocks (d, Cout, T): diag of the rank-``rank``
    projector onto the row space of their (Cout, Cout) Gram matrix."""
    flat = blocks.permute(1, 0, 2).reshape(blocks.shape[1], -1)
    gram = (flat @ flat.T).numpy()
    vals, vecs = np.linalg.eigh(gram)
    top = vecs[:, np.argsort(vals)[::-1][:rank]]
    return (top ** 2).sum(1)


def from_model(augmented, conv, key: MorphKey) -> Dict[str, object]:
    """The attack from the model: (``m_inv`` estimate of M^-1, ``perm`` estimate of P,
    ``gap``: the smallest difference of the sorted leverage scores, P's identifiability margin)
    from the augmented layer (:class:`~dpskin_core.mple.layer.AugmentedConv`) and a plain first
    layer ``conv`` believed to be C_r."""
    from .layer import unroll_conv

    cr = unroll_conv(conv, key)                                   # (d, Cout T)
    cout = conv.out_channels
    cac = augmented.weight.to(torch.float64)
    rank = min(cout, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
    lev_plain = _leverage(cr.reshape(key.d, cout, -1), rank)
    lev_aug = _leverage(cac.reshape(key.d, cout, -1), rank)
    order_plain, order_aug = np.argsort(lev_plain), np.argsort(lev_aug)
    perm = np.empty(cout, dtype=int)
    perm[order_aug] = order_plain  # channel j of C_ac is kernel perm[j] of C_r
    gap = float(np.diff(np.sort(lev_plain)).min()) if cout > 1 else float("inf")
    q = cr.reshape(key.d, cout, -1)[:, torch.as_tensor(perm)].reshape(key.d, -1)  # C_r P
    # M^-1 (C_r P) = C_ac  =>  M^-1 = C_ac (C_r P)^T ((C_r P)(C_r P)^T)^-1
    m_inv = np.linalg.solve((q @ q.T).numpy(), (q @ cac.T).numpy()).T
    return {"m_inv": m_inv, "perm": perm, "gap": gap}


def psnr(x: torch.Tensor, x_hat: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, dB (``data_range``: max - min of the images)."""
    mse = ((x - x_hat) ** 2).flatten(1).mean(1).clamp_min(1e-20)
    return 10 * torch.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win: int = 7) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004) of (n, C, H, W) images: a ``win`` x
    ``win`` uniform window, K1 = 0.01, K2 = 0.03, sample covariances (scikit-image's defaults),
    averaged over channels and the window positions inside the image."""
    if x.shape != y.shape or x.dim() != 4:
        raise ConfigError(f"ssim: images of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    c = x.shape[1]
    k = torch.full((c, 1, win, win), 1.0 / win ** 2, dtype=torch.float64)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=c)

    n = win ** 2
    mx, my = mean(x), mean(y)
    vx = (mean(x * x) - mx ** 2) * n / (n - 1)
    vy = (mean(y * y) - my ** 2) * n / (n - 1)
    cxy = (mean(x * y) - mx * my) * n / (n - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def second_order(z: torch.Tensor, x_public: torch.Tensor, key: MorphKey) -> torch.Tensor:
    """Ciphertext only: images guessed from morphed samples ``z`` (n, d) and public look-alike
    images ``x_public`` (m, C, H, W, normalised) by matching first and second moments. The
    morphed samples' covariance is ``M_I^T S M_I`` (I: the pixel rows of M, S: the images'
    covariance), so whitening z and colouring it with the public S recovers the images only up
    to an unknown orthogonal matrix: what these statistics cannot resolve is measured here."""
    key.check_images(tuple(x_public.shape), "public images")
    rows = interior(key)
    xp = flatten_padded(x_public.to(torch.float64), key.spec.pad).numpy()[:, rows]
    zz = z.to(torch.float64).numpy()
    mu_x, mu_z = xp.mean(0), zz.mean(0)
    r = len(rows)
    lam, u = np.linalg.eigh(np.cov(zz, rowvar=False))
    top = np.argsort(lam)[::-1][:r]
    white = u[:, top] / np.sqrt(np.maximum(lam[top], 1e-12))            # (d, r)
    s_val, s_vec = np.linalg.eigh(np.cov(xp, rowvar=False))
    colour = (s_vec * np.sqrt(np.maximum(s_val, 0.0))) @ s_vec.T          # S^(1/2), (r, r)
    x_int = (zz - mu_z) @ white @ colour + mu_x
    flat = np.zeros((len(zz), key.d))
    flat[:, rows] = x_int
    return unflatten(torch.from_numpy(flat).to(torch.float32), key)


def known_plaintext(x_known: torch.Tensor, z_known: torch.Tensor, x_other: torch.Tensor,
                    z_other: torch.Tensor, key: MorphKey, ridge: float = 0.0) -> Dict[str, object]:
    """The attack end to end: regress an inverse on the known pairs, invert the other morphed
    images and score them (PSNR, dB, on the normalised images; ``recovered``: those images); and
    the key's relative error on the rows that can be identified (the padding's rows never meet
    a non-zero input)."""
    from .morph import unmorph

    x, zz = _pairs(x_known, z_known, key, ridge)  # once: both regressions share them
    rec = unmorph(z_other, _regress(zz, x, ridge), key)
    rows = interior(key)
    m_hat = _regress(x, zz, ridge)
    err = np.linalg.norm(m_hat[rows] - key.matrix[rows]) / np.linalg.norm(key.matrix[rows])
    rng = float(x_other.max() - x_other.min())
    return {"pairs": int(x_known.shape[0]), "unknown_rows": len(rows), "ridge": float(ridge),
            "key_rel_error": float(err), "psnr_db": float(psnr(x_other, rec, rng).mean()),
            "recovered": rec}


__all__ = ["estimate_inverse", "estimate_key", "from_model", "known_plaintext", "psnr",
           "second_order", "ssim"]
