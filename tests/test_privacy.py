"""Privacy math: accountants against Google dp-accounting's PLD, budget checks."""
import math

import pytest

from dpskin_core.training import privacy
from dpskin_core.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("sigma,q,steps", [(0.8, 256 / 7000, 300), (1.5, 0.01, 1000), (0.6, 0.05, 100)])
def test_prv_is_upper_bound_close_to_pld(sigma, q, steps):
    h = [(sigma, q, steps)]
    ref = privacy.epsilon(h, 1e-5, "pld")
    prv = privacy.epsilon(h, 1e-5, "prv")
    rdp = privacy.epsilon(h, 1e-5, "rdp")
    assert prv >= ref * (1 - 1e-3)  # PLD itself carries discretisation error ~1e-4
    assert prv <= ref * 1.10
    assert rdp >= ref  # RDP is a looser (never tighter) bound


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_noise_multiplier_meets_target(accountant):
    q, steps = privacy.sample_rate_for(128, 5000), privacy.steps_per_epoch(128, 5000) * 5
    sigma = privacy.noise_multiplier_for(3.0, 1e-5, q, steps, accountant)
    eps = privacy.epsilon([(sigma, q, steps)], 1e-5, accountant)
    assert eps <= 3.0
    assert eps >= 3.0 * 0.97  # not wastefully noisy
    # less noise would overshoot the target
    assert privacy.epsilon([(sigma * 0.9, q, steps)], 1e-5, accountant) > 3.0


def test_sample_rate_matches_opacus_loader():
    # Opacus' DPDataLoader uses q = 1 / len(loader) = 1 / ceil(N / B)
    assert privacy.steps_per_epoch(100, 1000) == 10
    assert privacy.steps_per_epoch(128, 1000) == 8
    assert math.isclose(privacy.sample_rate_for(128, 1000), 1 / 8)


@pytest.mark.parametrize("eps", [0, -1, float("inf"), float("nan"), "8"])
def test_bad_epsilon(eps):
    with pytest.raises(ConfigError, match="target_epsilon"):
        privacy.check_epsilon_delta(eps, 1e-5)


@pytest.mark.parametrize("delta", [0, 1, -0.1, None])
def test_bad_delta(delta):
    with pytest.raises(ConfigError, match="delta"):
        privacy.check_epsilon_delta(1.0, delta)


def test_delta_must_be_below_one_over_n():
    privacy.check_epsilon_delta(1.0, 1e-5, n=1000)
    with pytest.raises(ConfigError, match="1/N"):
        privacy.check_epsilon_delta(1.0, 1e-3, n=1000)


def test_batch_larger_than_data():
    with pytest.raises(ConfigError, match="batch_size"):
        privacy.sample_rate_for(2000, 1000)


def test_unknown_accountant():
    with pytest.raises(UnknownNameError, match="accountant"):
        privacy.epsilon([(1.0, 0.01, 10)], 1e-5, "nope")


def test_zero_steps_spend_nothing():
    assert privacy.epsilon([], 1e-5) == 0.0
