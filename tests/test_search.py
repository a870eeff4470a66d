"""The private hyperparameter search (dpskin_core.book.search) and the planned accountant
history it bounds its space with."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from dpskin_core.book import search as S
from dpskin_core.errors import ConfigError
from dpskin_core.files import read_json
from dpskin_core.training import RunConfig, run, selection
from dpskin_core.training.records import load_runs
from dpskin_core.training.trainer import planned_history

SPACE = dict(expected_trials=2.0, eta=1.0, lr=[0.05, 0.5], batch_size=[32],
             epochs=[1, 2], max_grad_norm=[1.0])
DP = dict(synth_n=240, image_size=16, epochs=1, batch_size=32, lr=0.1, progress=False,
          num_threads=1, dp=True, target_epsilon=8.0, delta=1e-3, accountant="rdp",
          backbone="smallcnn_fast")


@pytest.mark.parametrize("bad, match", [
    (dict(SPACE, lrr=[1.0]), "unknown key.*lrr"),
    ({k: v for k, v in SPACE.items() if k != "epochs"}, "missing key.*epochs"),
    (dict(SPACE, lr=[]), "lr is empty"),
    (dict(SPACE, lr=[float("nan")]), "lr has an invalid value nan"),
    (dict(SPACE, epochs=[1.5]), "epochs has an invalid value 1.5"),
    (dict(SPACE, max_grad_norm=[-1.0]), "max_grad_norm has an invalid value -1.0"),
    (dict(SPACE, expected_trials=1.0), "expected_trials must be"),
    (dict(SPACE, eta=-2.0), "eta must be"),
])
def test_search_space_rejects_bad_values_naming_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        S.SearchSpace.from_mapping(bad)


def test_chapter_spaces_give_each_recipe_its_space():
    """The end-to-end recipes draw from ``search``, the proposed technique from
    ``technique_search`` (one mapping, read by chapter 07 and the benchmark); every profile's
    spaces are valid and name registered recipes; the cpu profile's DP-SGD space holds the
    profile's own hand-chosen schedule, which the chapter compares the winner with."""
    from dpskin_core.book.registry import load_registry, profile_params
    from dpskin_core.training.recipes import RECIPES

    tech = dict(SPACE, lr=[4.0])
    spaces = S.chapter_spaces({"search": SPACE, "search_recipes": ["dp-sgd", "dp-adam"],
                               "technique_search": tech})
    assert set(spaces) == {"dp-sgd", "dp-adam", S.TECHNIQUE_RECIPE}
    assert spaces["dp-adam"].lr == (0.05, 0.5) and spaces[S.TECHNIQUE_RECIPE].lr == (4.0,)
    with pytest.raises(ConfigError, match="missing parameter.*technique_search"):
        S.chapter_spaces({"search": SPACE, "search_recipes": []})
    with pytest.raises(ConfigError, match="search_recipes lists 'proposed'"):
        S.chapter_spaces({"search": SPACE, "search_recipes": ["proposed"], "technique_search": tech})
    with pytest.raises(ConfigError, match="technique_search: unknown key.*lrr"):
        S.chapter_spaces({"search": SPACE, "search_recipes": [],
                          "technique_search": dict(tech, lrr=[1.0])})
    reg = load_registry()
    for profile in reg.profiles:
        for name in S.chapter_spaces(reg.parameters_for("07_tuning", profile)):
            RECIPES.get(name)                      # raises on an unknown recipe
    cpu = S.chapter_spaces(reg.parameters_for("07_tuning", "cpu"))["dp-sgd"]
    P = profile_params("cpu")
    assert (P.lr_dp_sgd in cpu.lr and P.dp_batch_size in cpu.batch_size
            and P.dp_epochs in cpu.epochs and P.max_grad_norm in cpu.max_grad_norm)


def test_candidates_and_plan():
    space = S.SearchSpace.from_mapping(SPACE)
    cands = space.candidates()
    assert len(cands) == 4 and {c["lr"] for c in cands} == {0.05, 0.5}
    assert math.isclose(selection.expected_trials(1.0, space.gamma), 2.0, rel_tol=1e-6)
    # the plan is a function of the secret alone; its length follows D(eta, gamma)
    assert S.draw_plan(space, 123) == S.draw_plan(space, 123)
    ks = [len(S.draw_plan(space, s)) for s in range(400)]
    assert min(ks) >= 1 and abs(np.mean(ks) - 2.0) < 0.3
    assert all(set(t) == {"lr", "batch_size", "epochs", "max_grad_norm", "seed"}
               for t in S.draw_plan(space, 7))


def test_planned_history_is_the_recorded_history(tmp_path):
    """What the search bounds (without training) is what a run's accountant records."""
    technique = {"features": "derm", "backbone": "derm_linear", "feature_norm": "private",
                 "colour_constancy": "shades-of-gray", "logit_adjust": True, "lr": 2.0}
    for extra in ({}, {"logit_adjust": True, "hist_noise": 5.0}, technique):
        cfg = RunConfig(**{**DP, **extra})
        res = run(cfg, tmp_path)
        rec = [(h["noise_multiplier"], h["sample_rate"], h["steps"])
               for h in res.meta["privacy_history"]]  # prefix included
        plan = planned_history(cfg, int(res.meta["privacy"]["n_units"]))
        assert len(plan) == len(rec) == 1 + bool(cfg.logit_adjust) + (cfg.feature_norm == "private")
        for a, b in zip(plan, rec):
            assert np.allclose(a, b, rtol=1e-9), (plan, rec)
    with pytest.raises(ConfigError, match="not DP"):
        planned_history(RunConfig(**dict(DP, dp=False, target_epsilon=None)), 100)


def test_space_epsilon_bounds_every_candidate():
    h1, h2 = [(1.0, 0.1, 50)], [(0.8, 0.2, 50)]
    gamma = selection.gamma_for(3.0, 1.0)
    both = selection.space_selection_epsilon([h1, h2], 1e-5, 1.0, gamma)
    assert both >= max(selection.selection_epsilon(h, 1e-5, 1.0, gamma) for h in (h1, h2)) - 1e-9
    assert math.isclose(selection.space_selection_epsilon([h1], 1e-5, 1.0, gamma),
                        selection.selection_epsilon(h1, 1e-5, 1.0, gamma))
    with pytest.raises(ConfigError, match="at least one candidate"):
        selection.space_selection_epsilon([], 1e-5, 1.0, gamma)


def test_private_search_releases_the_best_trial_only(tmp_path, capsys):
    space = S.SearchSpace.from_mapping(SPACE)
    base = RunConfig(**DP, name="dp-sgd", recipe="dp-sgd")
    res = S.private_search(base, space, tmp_path)
    folder = tmp_path / "search" / res.search_id
    trials = [d for d in (folder / "private" / "trials").iterdir() if (d / "meta.json").is_file()]
    assert trials, "no trial trained"
    scores = {d.name: S._val_score(d) for d in trials}
    assert scores[res.winner_dir.name] == max(scores.values())  # the first of ties wins
    assert res.val_score == max(scores.values())
    # eps: the winner's own run, and the search (above any single candidate's, by RDP)
    assert res.epsilon_run <= 8.0 + 1e-9 and res.epsilon_search > res.epsilon_run
    assert res.n_candidates == 4
    # the public record neither lists nor counts the trials; the secret stays private
    rec = read_json(folder / "search.json")
    assert set(rec) == {"search_id", "base", "space", "gamma", "winner_run", "hyperparameters",
                        "val_score", "epsilon_run", "epsilon_search", "delta", "n_candidates",
                        "n_units", "code_version", "privacy"}
    text = json.dumps(rec)
    assert all(d.name not in text for d in trials if d.name != res.winner_dir.name)
    assert "secret" not in {k.lower() for k in rec}
    assert (folder / "private" / "secret.json").is_file()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "the number drawn is secret" in out
    # the runs folder the book reads does not contain the trials
    assert load_runs(tmp_path).empty
    # the winner's row, as the chapter reads it
    won = S.winner_runs([res])
    assert len(won) == 1 and won.iloc[0]["run"] == res.winner_dir.name
    assert won.iloc[0]["search_epsilon_search"] == res.epsilon_search
    # the cost curve: random K below a fixed k = E[K] for large E[K], above one trial
    curve = S.cost_curve(base, space, res.n_units, expected=(2.0, 20.0))
    assert (curve["random K (this search)"] > curve["one trial"]).all()
    assert curve["random K (this search)"].iloc[-1] < curve["best of a fixed k = E[K]"].iloc[-1]
    assert curve["random K (this search)"].iloc[0] == pytest.approx(res.epsilon_search)
    # read back without training; resumed after losing the record: the same secret plan
    again = S.private_search(base, space, tmp_path)
    assert again == res
    (folder / "search.json").unlink()
    resumed = S.private_search(base, space, tmp_path)
    assert resumed.winner_dir == res.winner_dir and resumed.val_score == res.val_score
    assert len([d for d in (folder / "private" / "trials").iterdir()
                if (d / "meta.json").is_file()]) == len(trials)


def test_private_search_refuses_non_dp_and_lesion_level(tmp_path):
    space = S.SearchSpace.from_mapping(SPACE)
    with pytest.raises(ConfigError, match="must be DP"):
        S.private_search(RunConfig(**dict(DP, dp=False, target_epsilon=None)), space, tmp_path)
    with pytest.raises(ConfigError, match="image-level"):
        S.private_search(RunConfig(**DP, privacy_unit="lesion"), space, tmp_path)
    assert not (tmp_path / "search").exists()
