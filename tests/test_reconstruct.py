"""Reconstruction attacks and image metrics: known answers, non-private vs DP gradients."""
import numpy as np
import pytest
import torch
from torch import nn

from dpskin_core import attacks
from dpskin_core.attacks import TrainedModel
from dpskin_core.training.config import RunConfig
from dpskin_core.errors import ConfigError
from dpskin_core.attacks.reconstruct import (dp_gradient, gradient_inversion, invert_classes, psnr, ssim,
                                     total_variation)

torch.set_num_threads(1)
S = 16


def smooth_image(size=S):
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), 0.3 + 0.5 * xx * yy], -1)


def test_psnr_and_ssim_known_answers():
    rng = np.random.default_rng(0)
    x = rng.random((S, S, 3))
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0)
    assert psnr(np.full((8, 8), 0.5), np.full((8, 8), 0.6)) == pytest.approx(20.0)  # MSE 0.01
    # constant images: only the luminance term, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01 ** 2
    assert ssim(np.full((12, 12), 0.2), np.full((12, 12), 0.7)) == pytest.approx(
        (2 * 0.2 * 0.7 + c1) / (0.04 + 0.49 + c1))
    img = smooth_image()
    noisy = [ssim(np.clip(img + rng.normal(0, s, img.shape), 0, 1), img) for s in (0.02, 0.1, 0.3)]
    assert noisy[0] > noisy[1] > noisy[2]
    assert ssim(1 - img, img) < 0 < ssim(img * 0.5 + 0.25, img)  # inverted structure vs contrast
    other = img[::-1].copy()
    assert ssim(img, other) == pytest.approx(ssim(other, img))  # symmetric
    t = torch.zeros(2, 3, 4, 4)
    t[1, :, :, 2:] = 1  # one vertical edge: 1/3 of horizontal neighbour pairs differ by 1
    assert total_variation(t).tolist() == pytest.approx([0.0, 1 / 3])
    with pytest.raises(ConfigError, match="mismatched shapes"):
        psnr(np.zeros((4, 4)), np.zeros((5, 4)))


def test_dp_gradient_clips_then_adds_noise_of_sigma_c():
    g = [torch.full((100,), 1.0), torch.full((300,), 1.0)]  # norm 20
    clipped = dp_gradient(g, 2.0, 0.0)
    assert float(torch.sqrt(sum((c ** 2).sum() for c in clipped))) == pytest.approx(2.0)
    assert torch.allclose(clipped[0], torch.full((100,), 0.1))
    noisy = dp_gradient(g, 2.0, 3.0, torch.Generator().manual_seed(0))
    resid = torch.cat([(n - c) for n, c in zip(noisy, clipped)])
    assert float(resid.std()) == pytest.approx(6.0, rel=0.1)  # sigma * C
    with pytest.raises(ConfigError, match="max_grad_norm > 0"):
        dp_gradient(g, 0.0, 1.0)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return TrainedModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 32), nn.Tanh(), nn.Linear(32, 7)),
                        RunConfig(image_size=S))


def test_gradient_inversion_recovers_the_image_unless_the_gradient_is_private():
    """A first layer with a bias leaks its input exactly (x = dL/dW_i / dL/db_i): the cosine
    attack recovers the image; DP-SGD's clipped + noised gradient (sigma = 1) hides it."""
    model, img = _mlp(), smooth_image()
    clear = gradient_inversion(model, img, 3, steps=200)
    private = gradient_inversion(model, img, 3, max_grad_norm=1.0, noise_multiplier=1.0, steps=200)
    assert clear.psnr > 25 and clear.ssim > 0.9 and clear.cosine > 0.99, clear.summary()
    assert private.psnr < 15 and private.ssim < 0.3, private.summary()
    assert clear.reconstruction.shape == (S, S, 3) and private.dp and not clear.dp
    clipped_only = gradient_inversion(model, img, 3, max_grad_norm=1e-3, steps=200)
    assert clipped_only.psnr > 25  # clipping alone keeps the direction: noise is what protects
    assert not any(p.grad is not None for p in model.model.parameters())  # model untouched


def test_model_inversion_finds_each_class_colour():
    """logit_c = sum over pixels of s_c . x: class c prefers the RGB corner (s_c + 1) / 2."""
    signs = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1],
                          [-1, 1, 1], [1, 1, 1]], dtype=torch.float32)
    net = nn.Sequential(nn.Conv2d(3, 7, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.copy_(5 * signs[:, :, None, None])
    model = TrainedModel(net, RunConfig(image_size=S))
    rng = np.random.default_rng(0)
    corners = ((signs.numpy() + 1) / 2)
    ref_y = np.repeat(np.arange(7), 3)
    ref_x = np.clip(corners[ref_y][:, None, None, :] * 255 + rng.normal(0, 10, (21, S, S, 3)),
                    0, 255).astype(np.uint8)
    out = invert_classes(model, steps=100, reference_x=ref_x, reference_y=ref_y)
    assert out.images.shape == (7, S, S, 3) and (out.class_prob > 0.9).all()
    assert (out.ssim_nearest <= 1).all() and (out.psnr_nearest >= out.psnr_mean - 1).all()
    means = [ref_x[ref_y == k].mean(0) / 255 for k in range(7)]
    for c, img in enumerate(out.images):  # closest to its own class's mean image
        assert np.argmax([psnr(img, m) for m in means]) == c
        assert out.psnr_mean[c] == pytest.approx(psnr(img, means[c]))
    with pytest.raises(ConfigError, match="classes must be"):
        invert_classes(model, classes=[7])
    # a class absent from the references (a rare class in a small training set) scores NaN
    few = invert_classes(model, steps=1, reference_x=ref_x[ref_y != 5], reference_y=ref_y[ref_y != 5])
    assert np.isnan(few.psnr_mean[5]) and np.isfinite(np.delete(few.ssim_nearest, 5)).all()
    assert np.isfinite(few.summary()["psnr_mean"])


def test_attacks_need_a_pixel_model_and_valid_inputs():
    colour = TrainedModel(nn.Linear(128, 7), RunConfig(image_size=S, features="colour",
                                                        backbone="colour_linear"))
    with pytest.raises(ConfigError, match="features='colour'"):
        invert_classes(colour, steps=1)
    with pytest.raises(ConfigError, match="x_true must be one image"):
        gradient_inversion(_mlp(), np.zeros((8, 8, 3)), 0)
    with pytest.raises(ConfigError, match="noise_multiplier needs max_grad_norm"):
        gradient_inversion(_mlp(), smooth_image(), 0, noise_multiplier=1.0)
    assert attacks.run_attack("gradient_inversion", _mlp(), smooth_image(), 1, steps=2).psnr > 0
