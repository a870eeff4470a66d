"""One-run privacy audit (Steinke, Nasr & Jagielski 2023): the bound's known answers, its
validity on mechanisms of known eps, and real DP / non-private training runs."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from dpskin_core.attacks import audit
from dpskin_core.training.config import RunConfig
from dpskin_core.errors import ConfigError

from test_train import random_bundle

torch.set_num_threads(1)


def test_bound_known_answers():
    # all r guesses right, delta = 0: P[Bin(r, q) >= r] = q^r = beta  =>  eps = logit(beta^(1/r))
    for r in (10, 100, 1000):
        assert audit.eps_lower_bound(5000, r, r, 0.0, 0.05) == pytest.approx(
            audit.max_lower_bound(r, 0.05), abs=1e-5)
    assert audit.max_lower_bound(100, 0.05) == pytest.approx(3.4930, abs=1e-3)
    assert audit.eps_lower_bound(1000, 100, 50) == 0.0      # coin flipping proves nothing
    # p-value at eps = 0 is the fair-coin tail
    assert audit.p_value_one_run(10, 10, 8, 0.0) == pytest.approx(56 / 1024)
    # delta only weakens the bound, and by more with more canaries
    base = audit.eps_lower_bound(1000, 200, 180, 0.0)
    with_delta = audit.eps_lower_bound(1000, 200, 180, 1e-4)
    more = audit.eps_lower_bound(100000, 200, 180, 1e-4)
    assert more < with_delta < base
    # large r at the randomized-response accuracy of eps = 2: the bound approaches 2
    v = round(10000 / (1 + math.exp(-2)))
    assert 1.9 < audit.eps_lower_bound(10000, 10000, v) < 2.0


def test_bound_is_valid_for_randomized_response_of_known_eps():
    """Each canary's bit goes through eps-randomized response; the auditor guesses the
    output. The bound may exceed eps with probability <= beta = 5 %, and must be useful."""
    rng = np.random.default_rng(0)
    eps, m, reps = 1.0, 1000, 200
    q = 1 / (1 + math.exp(-eps))
    v = rng.binomial(m, q, reps)  # correct guesses
    bounds = np.array([audit.eps_lower_bound(m, m, int(k), 0.0, 0.05) for k in v])
    assert np.mean(bounds > eps) <= 0.08          # 5 % allowed (+ sampling slack)
    assert np.median(bounds) > 0.75               # and close to eps (not trivially 0)


def test_bound_is_valid_for_gaussian_mechanism_with_delta():
    """score_i = mu * S_i + N(0, 1) is mu-GDP in S_i, i.e. (eps(delta), delta)-DP for every
    delta (Dong et al. 2019). Guess the top/bottom 100 of m = 1000; bound at delta = 1e-5."""
    mu, delta = 0.5, 1e-5                           # eps(delta) = 1.99
    eps_true = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2)
                      - delta, 0, 50)
    rng = np.random.default_rng(1)
    bounds = []
    for _ in range(40):
        s = rng.random(1000) < 0.5
        scores = mu * np.where(s, 1, -1) + rng.normal(size=1000)
        bounds.append(audit.audit_scores(scores, s, 100, 100, delta, 0.05).eps_lower_bound)
    bounds = np.array(bounds)
    assert np.mean(bounds > eps_true) <= 0.1
    assert np.mean(bounds) > 0.5 * eps_true       # the attack is informative (~0.77 eps)


def test_guesses_and_bonferroni():
    g = audit.guesses(np.array([5.0, 1.0, 3.0, 0.0, 4.0]), 2, 1)
    assert g.tolist() == [1, 0, 0, -1, 1]
    s = np.linspace(0, 1, 200)
    inc = s > 0.5                                   # a perfect score
    one = audit.audit_scores(s, inc, 50, 50)
    many = audit.audit_scores(s, inc, [10, 50], [10, 50])
    assert one.v == one.r == 100 and many.n_tried == 4
    assert many.eps_lower_bound < one.eps_lower_bound  # same best pair, tested at beta / 4
    assert many.eps_lower_bound == pytest.approx(audit.eps_lower_bound(200, 100, 100, 0, 0.05 / 4),
                                                 abs=1e-5)


@pytest.mark.parametrize("call, field", [
    (lambda: audit.eps_lower_bound(10, 5, 6), "need 0 <= v <= r <= m"),
    (lambda: audit.eps_lower_bound(10, 5, 2, beta=1.5), "beta must be in"),
    (lambda: audit.p_value_one_run(10, 5, 2, 1.0, delta=-1), "delta must be in"),
    (lambda: audit.guesses(np.zeros(5), 4, 2), "k_pos \\+ k_neg = 6"),
    (lambda: audit.guesses(np.zeros(5), -1, 2), "k_pos must be"),
    (lambda: audit.guesses(np.array([]), 1, 1), "scores must be a non-empty"),
    (lambda: audit.audit_scores(np.zeros(4), np.zeros(3, bool), 1, 1), "mismatched lengths"),
    (lambda: audit.audit_scores(np.zeros(4), [], 1, 1), "included must be a non-empty"),
    (lambda: audit.make_canaries(1, 16), "m \\(number of canaries\\)"),
    (lambda: audit.make_canaries(10, 16, kind="mislabel"), "needs pool_x"),
    (lambda: audit.make_canaries(10, 16, kind="gold"), "kind='gold'"),
])
def test_bad_input_raises_config_error(call, field):
    with pytest.raises(ConfigError, match=field):
        call()


def test_canaries():
    x, y = audit.make_canaries(20, 18)
    assert x.shape == (20, 18, 18, 3) and x.dtype == np.uint8 and set(y) <= set(range(7))
    pool = random_bundle(n_train=30, size=16)
    xm, ym = audit.make_canaries(20, 16, "mislabel", pool_x=pool.x_train, pool_y=pool.y_train)
    true = {im.tobytes(): lab for im, lab in zip(pool.x_train, pool.y_train)}
    assert all(true[im.tobytes()] != lab for im, lab in zip(xm, ym))  # always a wrong label


AUDIT = dict(image_size=16, batch_size=32, progress=False, num_threads=1, backbone="smallcnn_fast",
             augment_flips=False, augment_rot90=False)


@pytest.mark.slow  # trains 3 small models (~6-10 s)
def test_real_runs_nonprivate_leaks_dp_stays_below_its_eps(tmp_path):
    data = random_bundle(n_train=100, n_val=35, n_test=35, size=16)
    leaky = audit.canary_audit(RunConfig(**AUDIT, epochs=15, optimizer="adam", lr=3e-3), data,
                               tmp_path, m=100, k_pos=20, k_neg=20)
    assert leaky.audit.theoretical_epsilon is None
    assert leaky.audit.eps_lower_bound > 1.5, leaky.audit   # max possible with r = 40: 2.56
    assert leaky.run_result.meta["n_train"] == 100 + leaky.included.sum()
    for seed in (0, 1):  # repeated: the bound is a (1 - beta)-confidence statement
        cfg = RunConfig(**AUDIT, epochs=5, seed=seed, dp=True, target_epsilon=2.0, delta=1e-3,
                        lr=2.0, accountant="rdp")
        dp = audit.canary_audit(cfg, data, tmp_path, m=100, k_pos=20, k_neg=20, seed=seed)
        assert dp.audit.eps_lower_bound <= dp.audit.theoretical_epsilon <= 2.0, dp.audit
