"""Private hyperparameter selection (Papernot & Steinke 2022): the trial distribution and the
RDP bound of releasing the best of a random number of DP trials."""
import math

import numpy as np
import pytest

from dpskin_core.errors import ConfigError
from dpskin_core.training import privacy, selection

HISTORY = [(1.0, 0.01, 1000)]  # sigma, q, steps: a DP-SGD run at eps ~ 2 (delta 1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 3.0])
def test_trial_distribution_and_its_mean(eta):
    gamma = selection.gamma_for(10.0, eta)
    assert selection.expected_trials(eta, gamma) == pytest.approx(10.0, rel=1e-6)
    p = selection.trial_probabilities(eta, gamma, 20000)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    assert (p * np.arange(1, len(p) + 1)).sum() == pytest.approx(10.0, rel=1e-4)
    rng = np.random.default_rng(0)
    draws = np.array([selection.draw_trials(eta, gamma, rng) for _ in range(4000)])
    assert draws.min() >= 1 and draws.mean() == pytest.approx(10.0, rel=0.1)


def test_geometric_case_has_its_closed_form():
    # eta = 1: P[K = k] = gamma (1 - gamma)^(k-1), E[K] = 1 / gamma
    p = selection.trial_probabilities(1.0, 0.2, 5)
    np.testing.assert_allclose(p, 0.2 * 0.8 ** np.arange(5))
    assert selection.expected_trials(1.0, 0.2) == pytest.approx(5.0)


def test_selection_costs_more_than_one_run_and_less_than_ten():
    delta = 1e-5
    one = selection.single_run_epsilon(HISTORY, delta)
    # the RDP conversion agrees with the project's RDP accountant on one run
    assert one == pytest.approx(privacy.epsilon(HISTORY, delta, "rdp"), rel=0.02)
    costs = [selection.selection_epsilon(HISTORY, delta, 1.0, selection.gamma_for(m)) for m in (2, 10, 50)]
    assert one < costs[0] < costs[1] < costs[2]
    ten_runs = privacy.epsilon([(1.0, 0.01, 10000)], delta, "rdp")  # ten trials composed
    assert costs[1] < ten_runs


def test_selection_rdp_is_the_theorem():
    orders = (2.0, 4.0, 8.0)
    rdp = np.array([0.1, 0.3, 0.9])
    eta, gamma = 1.0, 0.1
    got = selection.selection_rdp(rdp, eta, gamma, orders)
    second = min([(1 + eta) * (1 - 1 / l2) * e2 + (1 + eta) * math.log(1 / gamma) / l2
                  for l2, e2 in zip(orders, rdp)] + [(1 + eta) * math.log(1 / gamma)])
    want = [e + second + math.log(selection.expected_trials(eta, gamma)) / (l - 1)
            for l, e in zip(orders, rdp)]
    np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("eta,gamma", [(-1.0, 0.5), (1.0, 0.0), (1.0, 1.0), (float("nan"), 0.5)])
def test_bad_parameters_are_refused(eta, gamma):
    with pytest.raises(ConfigError, match="eta|gamma"):
        selection.expected_trials(eta, gamma)
