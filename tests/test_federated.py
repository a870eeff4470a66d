"""Federated learning (dpskin_core.federated): partitions keep every lesion at one client, the
strategies' arithmetic, the clients' accountants (counted before a round's first step, once
per round), the server's handling of failed clients, the in-process federation, and the
deployment on Flower (SuperLink + four SuperNodes on 127.0.0.1) computing the same model."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpskin_core.data.datasets import DataSpec, load_data
from dpskin_core.errors import ConfigError, DataError, UnknownNameError
from dpskin_core.federated import FLConfig, FederationError, Partition, Strategy, partition, run_federation
from dpskin_core.federated import client as fl_client
from dpskin_core.federated.federation import federation_dir, serve
from dpskin_core.federated.partitions import SYNTHETIC_SITES, class_table
from dpskin_core.federated.strategies import weights
from dpskin_core.training import RunConfig
from dpskin_core.training.records import RELEASED_KEY, prediction_shift
from dpskin_core.training.technique import log_prior


@pytest.fixture(scope="module")
def synth():
    return load_data(DataSpec("synthetic", None, 16, synth_n=400))


def _lesion_clients(clients):
    seen = {}
    for c in clients:
        for les in c.data.meta["lesion_id"].unique():
            assert les not in seen, f"lesion {les} at {seen.get(les)} and {c.name}"
            seen[les] = c.name
    return seen


@pytest.mark.parametrize("p", [Partition("site"), Partition("iid", num_clients=3),
                               Partition("dirichlet", num_clients=5, alpha=0.3)])
def test_partitions_keep_every_lesion_at_one_client(synth, p):
    clients = partition(synth, p)
    _lesion_clients(clients)
    total = sum(len(c.data.y_train) + len(c.data.y_val) + len(c.data.y_test) for c in clients)
    assert total == len(synth.meta)
    for c in clients:  # each client's part of each split is the global split's
        for split in ("train", "val", "test"):
            assert (c.data.meta["split"] == split).sum() == len(getattr(c.data, f"y_{split}"))
    if p.scheme == "site":
        assert [c.name for c in clients] == list(SYNTHETIC_SITES)
    if p.scheme == "iid":
        sizes = [c.data.meta["lesion_id"].nunique() for c in clients]
        assert max(sizes) - min(sizes) <= 1
    assert class_table(clients).to_numpy().sum() == len(synth.y_train)


def test_partition_configs_are_checked():
    with pytest.raises(UnknownNameError, match="unknown partition 'sites'"):
        Partition("sites")
    with pytest.raises(ConfigError, match="num_clients"):
        Partition("iid", num_clients=0)
    with pytest.raises(ConfigError, match="alpha"):
        Partition("dirichlet", alpha=float("nan"))


def test_site_partition_of_the_real_data(shared_data):
    data = load_data(DataSpec("isic2018", str(shared_data), 8))
    clients = partition(data, Partition("site"))
    assert [c.name for c in clients] == ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]
    _lesion_clients(clients)
    sizes = {c.name: len(c.data.meta) for c in clients}
    # the README's counts, but for the 9 lesions seen at both vidir sites (26 images)
    assert sizes["rosendahl"] == 2259 and sizes["vienna_dias"] == 439
    assert abs(sizes["vidir_molemax"] - 3954) + abs(sizes["vidir_modern"] - 3363) <= 26
    assert sum(sizes.values()) == 10015


def test_a_missing_sites_file_names_it(tmp_path, isic_layout):
    root = isic_layout(per_class=4)
    data = load_data(DataSpec("isic2018", str(root), 8, cache_dir=str(tmp_path / "cache"),
                              val_frac=0.25, test_frac=0.25))
    with pytest.raises(DataError, match="HAM10000_sites.csv: not found"):
        partition(data, Partition("site"))


def test_strategies():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(3)}
    s = Strategy("fedavg")
    assert torch.allclose(s.step(a, [a, b], [1, 3])["w"], torch.tensor([3.0, 2.0]))
    assert torch.allclose(s.step(a, [a, b], [None, None])["w"], torch.tensor([2.0, 2.0]))  # DP: equal
    assert list(weights([2, 2, 4])) == [0.25, 0.25, 0.5]
    adam = Strategy("fedadam", server_lr=0.1)
    new = adam.step(a, [b], [1])
    # first step: m = 0.1 d, v = 0.01 d^2 -> lr m / (sqrt v + tau) ~ lr sign(d)
    assert torch.allclose(new["w"], torch.tensor([0.1, 2.0]), atol=1e-3) and int(new["n"]) == 3
    with pytest.raises(UnknownNameError, match="unknown strategy 'fedsgd'"):
        Strategy("fedsgd").step(a, [b], [1])
    with pytest.raises(ConfigError, match="at least one client"):
        s.step(a, [], [])


def _run(dp=False, **kw):
    return RunConfig(backbone="smallcnn_fast", optimizer="sgd", lr=0.5 if dp else 0.05, batch_size=32,
                     synth_n=400, image_size=16, progress=False, num_threads=1, dp=dp,
                     target_epsilon=50.0 if dp else None, delta=1e-4,
                     dp_noise="seeded" if dp else "secret", **kw)


def test_fl_config_round_trip_and_refusals():
    cfg = FLConfig(run=_run(dp=True), rounds=2, strategy="fedadam", server_lr=0.01)
    again = FLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.fl_id() == cfg.fl_id()
    assert cfg.local.epochs == 2 and cfg.local.lr_schedule == "constant"
    assert FLConfig(run=_run(), rounds=3).fl_id() != FLConfig(run=_run(), rounds=2).fl_id()
    with pytest.raises(ConfigError, match="unknown key\\(s\\) round"):
        FLConfig.from_dict({"round": 2})
    with pytest.raises(ConfigError, match="partition: unknown key\\(s\\) clients"):
        FLConfig.from_dict({"partition": {"clients": 2}})
    with pytest.raises(ConfigError, match="rounds must be a positive integer"):
        FLConfig(rounds=0)
    with pytest.raises(ConfigError, match="server_lr must be a finite number"):
        FLConfig(server_lr=float("inf"))
    kept = _run(dp=True, logit_adjust=True, la_tau_kept=0.5)
    assert FLConfig(run=kept).run.la_tau_kept == 0.5  # each client keeps its own noisy prior
    with pytest.raises(ConfigError, match="la_tau_kept=0.5: a client keeps .* privacy_unit='image'"):
        FLConfig(run=kept.replace(privacy_unit="lesion"))
    with pytest.raises(ConfigError, match="groups_per_site > 1: the global model is scored at sites"):
        FLConfig(run=kept, partition=Partition("site", groups_per_site=2))
    assert FLConfig(run=kept, partition=Partition("site", groups_per_site=2), prior="global")


def test_a_client_is_counted_before_its_round_and_once(tmp_path, synth, monkeypatch):
    cfg = FLConfig(run=_run(dp=True), rounds=3)
    c = partition(synth, cfg.partition)[0]
    w = fl_client.initial_weights(cfg.local)
    r1 = fl_client.fit(c, cfg.local, w, 1, 1, tmp_path)
    assert len(r1.history) == 1 and r1.epsilon > 0 and r1.n_examples is None

    def crash(*a, **k):
        raise RuntimeError("killed mid-round")

    monkeypatch.setattr(fl_client, "train_one_epoch", crash)
    with pytest.raises(RuntimeError, match="killed"):
        fl_client.fit(c, cfg.local, r1.weights, 2, 1, tmp_path)
    hist, eps = fl_client.spent(tmp_path, cfg.local)
    assert len(hist) == 2 and eps > r1.epsilon  # the dead round is counted
    monkeypatch.undo()
    r2 = fl_client.fit(c, cfg.local, r1.weights, 2, 1, tmp_path)  # the retry: counted once
    assert len(r2.history) == 2 and r2.epsilon == pytest.approx(eps)
    with pytest.raises(ConfigError, match="beyond the federation's 3 rounds"):
        fl_client.fit(c, cfg.local, w, 4, 1, tmp_path)


def test_the_server_survives_a_failed_client_and_refuses_too_few(tmp_path, synth):
    cfg = FLConfig(run=_run(), rounds=1, min_clients=2)
    clients = partition(synth, cfg.partition)
    names = [c.name for c in clients]
    w0 = fl_client.initial_weights(cfg.local)

    def fit_all(rnd, w, asked, prior, bad=1):
        out = {c.name: fl_client.fit(c, cfg.local, w, rnd, 1, tmp_path / c.name) for c in clients[bad:]}
        out.update({c.name: DataError(f"site {c.name}: images missing") for c in clients[:bad]})
        return out

    res = serve(cfg, tmp_path / "fed", names, fit_all, lambda w, p: {})
    rows = res.rounds.set_index("client")
    assert rows.loc[names[0], "status"] == "failed" and "images missing" in rows.loc[names[0], "error"]
    assert (rows.loc[names[1:], "status"] == "ok").all()
    assert not torch.equal(res.weights["classifier.weight"], w0["classifier.weight"])
    with pytest.raises(FederationError, match="fewer than min_clients=2"):
        serve(cfg, tmp_path / "fed2", names, lambda r, w, a, p: fit_all(r, w, a, p, bad=3), lambda w, p: {})
    assert json.loads((tmp_path / "fed2" / "meta.json").read_text())["status"] == "failed"


def _improved(res, cfg, data):
    clients = partition(data, cfg.partition)
    before = np.mean([fl_client.evaluate(c, cfg.local, fl_client.initial_weights(cfg.local))["nll"]
                      for c in clients])
    last = res.rounds[res.rounds["round"] == cfg.rounds]
    return float(last["nll"].mean()), float(before)


def test_federation_in_one_process_improves_and_resumes(tmp_path, synth):
    cfg = FLConfig(run=_run(), rounds=2)
    res = run_federation(cfg, tmp_path, data=synth, progress=False)
    after, before = _improved(res, cfg, synth)
    assert after < before and res.meta["status"] == "complete" and res.meta["privacy"] is None
    again = run_federation(cfg, tmp_path, data=synth, progress=False)  # read back, nothing trained
    assert all(torch.equal(again.weights[k], res.weights[k]) for k in res.weights)


def test_deployment_on_flower_matches_one_process(tmp_path):
    """Two rounds with four SuperNodes (one per synthetic site): the global model improved,
    every client's eps is recorded, and it is the in-process federation's model."""
    from dpskin_core.federated.deploy import deploy

    cfg = FLConfig(name="ci", run=_run(dp=True), rounds=2)
    data = load_data(DataSpec("synthetic", None, 16, synth_n=400))
    res = deploy(cfg, tmp_path / "deployed", startup_timeout_s=120, run_timeout_s=600, data=data)
    assert res.meta["status"] == "complete" and len(res.meta["clients"]) == 4
    eps = res.meta["privacy"]["client_epsilon"]
    assert set(eps) == set(SYNTHETIC_SITES) and all(0 < e <= 50.0 + 1e-6 for e in eps.values())
    assert res.rounds["epsilon"].notna().all()
    after, before = _improved(res, cfg, data)
    assert after < before
    local = run_federation(cfg, tmp_path / "local", data=data, progress=False)
    for k in res.weights:
        assert torch.allclose(res.weights[k], local.weights[k], atol=1e-5), k


def test_the_summed_prior_over_flower_is_the_in_process_one(tmp_path):
    """prior='global' on four SuperNodes: the histograms asked for over Flower sum to the
    in-process prior, and the clients trained with it give the in-process global model (the
    logit-adjusted loss shifts the test NLL, so no NLL-improvement check here)."""
    from dpskin_core.federated.deploy import deploy

    cfg = FLConfig(name="ci-prior", run=_run(dp=True, logit_adjust=True, la_tau_kept=0.5), rounds=1,
                   prior="global")
    data = load_data(DataSpec("synthetic", None, 16, synth_n=400))
    res = deploy(cfg, tmp_path / "deployed", startup_timeout_s=120, run_timeout_s=600, data=data)
    assert res.meta["status"] == "complete" and res.meta["privacy"]["class_prior"].startswith("the sum")
    local = run_federation(cfg, tmp_path / "local", data=data, progress=False)
    for k in res.weights:
        assert torch.allclose(res.weights[k], local.weights[k], atol=1e-5), k
    # every client scored the global model with the kept share of the summed prior
    cols = ["client", "balanced_accuracy", "nll"]
    pd.testing.assert_frame_equal(res.rounds[cols].sort_values("client").reset_index(drop=True),
                                  local.rounds[cols].sort_values("client").reset_index(drop=True),
                                  atol=1e-4)
    prior = json.loads((res.folder / "prior.json").read_text())
    assert prior["clients"] == sorted(SYNTHETIC_SITES)
    assert prior["counts"] == pytest.approx(json.loads((local.folder / "prior.json").read_text())["counts"])


def test_each_supernode_keeps_its_own_prior_as_in_process(tmp_path):
    """prior='local' with a kept share on four SuperNodes: each scores the global model with
    0.5 x log of its own noisy histogram (read from its own state), as the in-process
    federation scores it, and not by the plain logits."""
    from dpskin_core.federated.deploy import deploy

    cfg = FLConfig(name="ci-local-prior", run=_run(dp=True, logit_adjust=True, la_tau_kept=0.5),
                   rounds=1)
    data = load_data(DataSpec("synthetic", None, 16, synth_n=400))
    res = deploy(cfg, tmp_path / "deployed", startup_timeout_s=120, run_timeout_s=600, data=data)
    local = run_federation(cfg, tmp_path / "local", data=data, progress=False)
    for k in res.weights:
        assert torch.allclose(res.weights[k], local.weights[k], atol=1e-5), k
    cols = ["client", "balanced_accuracy", "nll"]
    deployed = res.rounds[cols].sort_values("client").reset_index(drop=True)
    pd.testing.assert_frame_equal(
        deployed, local.rounds[cols].sort_values("client").reset_index(drop=True), atol=1e-4)
    c = partition(data, cfg.partition)[0]
    plain = fl_client.evaluate(c, cfg.local, res.weights)["nll"]
    assert deployed.set_index("client").loc[c.name, "nll"] != pytest.approx(plain)


def test_a_supernode_computes_its_kept_shift_once(tmp_path, synth, monkeypatch):
    """The ClientApp's evaluate handler keeps its client's kept shift in the node's context
    state: later evaluations read it back (no second computation) and score as the
    in-process federation scores; a message with another prior computes it again."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from dpskin_core.federated import app
    from dpskin_core.files import write_json

    cfg = FLConfig(name="ci-shift-cache", run=_run(dp=True, logit_adjust=True, la_tau_kept=0.5),
                   rounds=1)
    local = run_federation(cfg, tmp_path, data=synth, progress=False)
    write_json(tmp_path / "fl_config.json", cfg.to_dict())
    monkeypatch.setattr(app, "_clients", lambda _: tuple(partition(synth, cfg.partition)))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4},
                      state=RecordDict(), run_config={"fl-config": str(tmp_path / "fl_config.json"),
                                                      "fl-folder": str(local.folder)})
    for k in ("_run_id", "_node_id", "_task_id"):  # what a ClientApp process sets
        monkeypatch.setattr(TaskIdentity, k, 1)
    calls = []
    real = app.kept_shift
    monkeypatch.setattr(app, "kept_shift", lambda *a: calls.append(a[-1]) or real(*a))

    def score(prior=None):
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=local.weights)})
        if prior is not None:
            content["config"] = ConfigRecord({"prior": json.dumps(prior)})
        msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
        return dict(app.evaluate_(msg, context).content["metrics"])

    name = partition(synth, cfg.partition)[0].name
    want = local.rounds.set_index("client").loc[name]
    first, again = score(), score()
    pd.testing.assert_series_equal(pd.Series(first), pd.Series(again))  # NaN: a class absent
    assert len(calls) == 1
    assert first["nll"] == pytest.approx(want["nll"], abs=1e-4)
    assert first["balanced_accuracy"] == pytest.approx(want["balanced_accuracy"], abs=1e-6)
    other = score([100.0] * 7)  # a flat prior: another shift, computed anew
    assert len(calls) == 2 and other["nll"] != pytest.approx(first["nll"])


def test_the_global_prior_is_the_sum_of_the_releases_already_counted(tmp_path, synth):
    """prior='global': each client's histogram is the noisy release its own logit adjustment
    makes (same secret noise, so one release, counted once in its eps), the server sums them
    once (a resumed federation reads the sum back), and every client trains with the sum."""
    cfg = FLConfig(run=_run(dp=True, logit_adjust=True).replace(dp_noise="secret"), rounds=2, prior="global")
    clients = partition(synth, cfg.partition)
    res = run_federation(cfg, tmp_path, data=synth, progress=False)
    folder = res.folder
    own = {c.name: fl_client.class_histogram(c, cfg.local, folder / "clients" / c.name) for c in clients}
    for c in clients:  # noisy, and the same noise as its release before training
        exact = np.bincount(c.data.y_train, minlength=7)
        assert not np.allclose(own[c.name], exact)
        assert np.allclose(own[c.name], fl_client.class_histogram(c, cfg.local, folder / "clients" / c.name))
        hist, eps = fl_client.spent(folder / "clients" / c.name, cfg.local)
        assert hist[0] == (cfg.run.hist_noise, 1.0, 1) and len(hist) == 3  # histogram + 2 rounds
        assert eps <= cfg.run.target_epsilon + 1e-6
    prior = json.loads((folder / "prior.json").read_text())
    assert prior["counts"] == pytest.approx(np.sum(list(own.values()), axis=0), abs=1e-3)
    assert res.meta["privacy"]["class_prior"].startswith("the sum")
    # the local-prior federation trains each client with its own counts: a different model
    local = run_federation(FLConfig.from_dict({**cfg.to_dict(), "prior": "local"}), tmp_path,
                           data=synth, progress=False)
    assert not torch.equal(local.weights["classifier.weight"], res.weights["classifier.weight"])

    calls = []

    def histograms_all():
        calls.append(1)
        return {c.name: own[c.name] for c in clients}

    fresh = FLConfig.from_dict({**cfg.to_dict(), "rounds": 1})
    names = [c.name for c in clients]
    fit_all = lambda r, w, a, p: {"x": DataError("stop")}  # noqa: E731 (the prior is all we need)
    with pytest.raises(FederationError):
        serve(fresh, tmp_path / "f", names, fit_all, lambda w, p: {}, False, histograms_all)
    with pytest.raises(FederationError):  # resumed: the sum is read back, not asked for again
        serve(fresh, tmp_path / "f", names, fit_all, lambda w, p: {}, False, histograms_all)
    assert len(calls) == 1


def test_each_client_scores_the_released_predictor_of_its_kept_prior(tmp_path, synth):
    """la_tau_kept with each client's own prior: the global model is scored at a client with
    the logits plus la_tau_kept x log(its noisy histogram), the same shift the client's
    training computes; the weights are those of the federation that keeps none (the
    shift is post-processing), and the membership game attacks the same predictor."""
    from dpskin_core.federated.study import global_membership

    kept = FLConfig(run=_run(dp=True, logit_adjust=True, la_tau_kept=0.5), rounds=1)
    plain = FLConfig.from_dict({**kept.to_dict(), "run": {**kept.run.to_dict(), "la_tau_kept": 0.0}})
    res = run_federation(kept, tmp_path, data=synth, progress=False)
    ref = run_federation(plain, tmp_path, data=synth, progress=False)
    for k in res.weights:
        assert torch.equal(res.weights[k], ref.weights[k]), k
    assert res.meta["privacy"]["prediction"].startswith("at each client, the global model's logits plus 0.5")
    rows = res.rounds.set_index("client")
    for c in partition(synth, kept.partition):
        state = res.folder / "clients" / c.name
        shift = fl_client.kept_shift(c, kept.local, state)
        session = fl_client.start(fl_client.for_client(kept.local, c), c.data, state / "run")
        recorded = prediction_shift({RELEASED_KEY: session.setup.released})  # as training keeps it
        np.testing.assert_allclose(shift, recorded, atol=1e-6)
        released = fl_client.class_histogram(c, kept.local, state)  # recorded to 0.01 of a count
        np.testing.assert_allclose(shift, 0.5 * log_prior(released), atol=1e-3)
        with_shift = fl_client.evaluate(c, kept.local, res.weights, shift=shift)
        assert rows.loc[c.name, "nll"] == pytest.approx(with_shift["nll"])
        assert with_shift["nll"] != pytest.approx(fl_client.evaluate(c, kept.local, res.weights)["nll"])
    clients = partition(synth, kept.partition)
    with pytest.raises(ConfigError, match="pass folder"):
        global_membership(res.config, res.weights, clients)
    m, m0 = (global_membership(r.config, r.weights, clients, folder=r.folder) for r in (res, ref))
    assert not np.allclose(m["auc"], m0["auc"])


def test_the_global_prior_shift_reads_no_client_secret(tmp_path, synth):
    """prior='global': the shift a client keeps is la_tau_kept x log of the federation's prior,
    the shift its training with that prior computes, built without reading or creating the
    client's secret seed (a site of virtual clients, scored under this prior, has none)."""
    run = _run(dp=True, logit_adjust=True, la_tau_kept=0.5).replace(dp_noise="secret")
    cfg = FLConfig(run=run, prior="global")
    c = partition(synth, cfg.partition)[0]
    prior = np.array([5.0, 40.0, 3.0, 2.0, 300.0, 1.0, 0.0])  # an empty class floors at 1
    state = tmp_path / "state"
    shift = fl_client.kept_shift(c, cfg.local, state, prior)
    assert not state.exists()
    np.testing.assert_array_equal(shift, (0.5 * log_prior(prior)).astype(np.float32))
    session = fl_client.start(fl_client.for_client(cfg.local, c), c.data, tmp_path / "run",
                              prior_counts=prior)
    np.testing.assert_allclose(shift, prediction_shift({RELEASED_KEY: session.setup.released}),
                               atol=1e-6)


def test_a_global_prior_needs_noisy_histograms():
    with pytest.raises(ConfigError, match="prior: 'pooled' is not one of local, global"):
        FLConfig(prior="pooled")
    with pytest.raises(ConfigError, match="needs record-level DP clients"):
        FLConfig(run=_run(dp=True), prior="global")  # no logit adjustment
    with pytest.raises(ConfigError, match="needs record-level DP clients"):
        FLConfig(run=_run(logit_adjust=True), prior="global")  # non-private clients


def test_client_level_dp_on_flower_matches_one_process(tmp_path):
    """DP-FedAvg over four SuperNodes: the server asks only the clients its secret sampled, and
    the deployed global model is the in-process one (same secret: the same clients and noise)."""

    from dpskin_core.federated.client_level import ClientDP, sample_clients
    from dpskin_core.federated.deploy import deploy

    cfg = FLConfig(name="ci-client-dp", run=_run(), rounds=2, client_dp=ClientDP(8.0, sample_rate=0.5))
    data = load_data(DataSpec("synthetic", None, 16, synth_n=400))
    # a server secret (the same for both paths) whose first round leaves a client out
    secret = next(x for x in range(100) if len(sample_clients(SYNTHETIC_SITES, 0.5, x, 1)) < 4)
    for root in ("local", "deployed"):
        private = federation_dir(cfg, tmp_path / root) / "private"
        private.mkdir(parents=True)
        (private / "secret.json").write_text(json.dumps({"secret": secret, "mode": "secret"}))
    local = run_federation(cfg, tmp_path / "local", data=data, progress=False)
    res = deploy(cfg, tmp_path / "deployed", startup_timeout_s=120, run_timeout_s=600, data=data)
    assert res.meta["privacy"]["level"] == "client"
    assert res.meta["privacy"]["global_epsilon"] == pytest.approx(local.meta["privacy"]["global_epsilon"])
    asked = json.loads((res.folder / "private" / "rounds.json").read_text())
    assert asked == json.loads((local.folder / "private" / "rounds.json").read_text())
    assert len(asked["1"]["asked"]) < 4  # only the sampled clients were asked
    for k in res.weights:
        assert torch.allclose(res.weights[k], local.weights[k], atol=1e-5), k


def test_a_supernode_without_a_superlink_fails_in_bounded_time(tmp_path):
    import time

    from dpskin_core.federated.deploy import free_port, processes, start_supernode, write_connection

    home = write_connection(tmp_path, free_port())
    with processes(tmp_path, home) as ps:
        start_supernode(ps, 0, 1, free_port(), max_wait_s=3)
        t0 = time.monotonic()
        with pytest.raises(FederationError, match="supernode-0 exited with 1; its log"):
            while time.monotonic() - t0 < 90:
                ps.check()
                time.sleep(0.5)
        assert time.monotonic() - t0 < 60


def test_a_supernode_killed_mid_round_is_counted_and_comes_back(tmp_path):
    """SuperNode 0 is killed right after its client has counted round 1 (mid-round): the round
    completes with the other three, the dead client's accountant holds the round; restarted, it
    serves round 2, and its eps is then the others'."""
    import time

    from dpskin_core.federated.deploy import Deployment

    cfg = FLConfig(name="faults", run=_run(dp=True), rounds=2, local_epochs=3, min_clients=3,
                   round_timeout_s=40.0)
    data = load_data(DataSpec("synthetic", None, 16, synth_n=400))
    with Deployment(cfg, tmp_path, startup_timeout_s=120, run_timeout_s=600, data=data) as d:
        first = sorted(c.name for c in partition(data, cfg.partition))[0]
        acc = d.folder / "clients" / first / "accountant.json"
        d.submit()
        t0 = time.monotonic()
        while not (acc.is_file() and "1" in json.loads(acc.read_text())["rounds"]):
            assert time.monotonic() - t0 < 300, "round 1 never started"
            assert not (d.meta_path.is_file() and json.loads(d.meta_path.read_text())["status"] == "failed"), \
                d.meta_path.read_text()
            d.ps.check()
            time.sleep(0.02)
        d.kill(0)
        d.restart(0)
        res = d.wait()
    rows = res.rounds.set_index(["round", "client"])
    assert rows.loc[(1, first), "status"] == "no reply"
    assert (rows.loc[1]["status"] == "ok").sum() == 3
    assert rows.loc[(2, first), "status"] == "ok"
    hist, eps = fl_client.spent(d.folder / "clients" / first, cfg.local)
    assert len(hist) == 2  # both rounds (the dead one counted)
    others = [e for n, e in res.meta["client_epsilon"].items() if n != first]
    assert eps == pytest.approx(res.meta["client_epsilon"][first]) and eps == pytest.approx(max(others), rel=0.05)


def test_federated_recipes_build_for_every_profile():
    from dpskin_core.book.registry import load_registry
    from dpskin_core.federated.recipes import FL_RECIPES, FLPlan

    reg = load_registry()
    assert FL_RECIPES.names() == ["fedadam", "fedavg", "fedavg-client-dp", "fedavg-client-dp-sites",
                                  "fedavg-dp", "fedavg-proposed-client-dp", "fedavg-proposed-dp",
                                  "fedavg-proposed-dp-local-prior"]
    for profile in reg.profiles:
        p = reg.params(profile)
        for name in FL_RECIPES:
            r = FL_RECIPES.get(name)
            cfg = r.config(p, FLPlan(rounds=2), seed=1, target_epsilon=3.0 if r.private else None)
            assert cfg.run.dp == (r.level == "record") and cfg.run.seed == 1 and cfg.rounds == 2
            assert cfg.run.target_epsilon == (3.0 if r.level == "record" else None)
            assert (cfg.client_dp.target_epsilon if r.level == "client" else None) == (
                3.0 if r.level == "client" else None)
            assert (cfg.client_dp is None) == (r.level != "client")
            assert cfg.partition.scheme == "site" and cfg.local.lr_schedule == "constant"
            assert cfg.prior == ("global" if name == "fedavg-proposed-dp" else "local")


def test_membership_inference_on_the_global_model(tmp_path, synth):
    from dpskin_core.federated.study import global_membership

    cfg = FLConfig(run=_run(), rounds=1)
    res = run_federation(cfg, tmp_path, data=synth, progress=False)
    clients = partition(synth, cfg.partition)
    m = global_membership(res.config, res.weights, clients)
    assert set(m["client"]) == {c.name for c in clients if len(c.data.y_test)}
    assert m["auc"].between(0, 1).all() and (m["n_members"] > 0).all()
    assert (m["n_members"] == [min(len(c.data.y_train), len(c.data.y_test))
                               for c in clients if len(c.data.y_test)]).all()


# --------------------------------------------------------------------------- client-level DP
def test_virtual_clients_split_each_site_and_keep_lesions_whole(synth):
    from dpskin_core.federated.partitions import site_of

    sites = {c.name: c for c in partition(synth, Partition("site"))}
    virtual = partition(synth, Partition("site", groups_per_site=3))
    _lesion_clients(virtual)
    assert len(virtual) == 12 and {site_of(c.name) for c in virtual} == set(SYNTHETIC_SITES)
    for s, c in sites.items():  # the groups of a site hold exactly its images
        mine = [v for v in virtual if site_of(v.name) == s]
        assert sorted(np.concatenate([v.data.meta["image"] for v in mine])) == sorted(c.data.meta["image"])
    assert Partition("site", groups_per_site=3).by_site == Partition("site")
    with pytest.raises(ConfigError, match="groups_per_site"):
        Partition("site", groups_per_site=0)
    with pytest.raises(ConfigError, match="needs scheme 'site'"):
        Partition("iid", groups_per_site=2)


def test_client_sampling_is_poisson_and_secret():
    from dpskin_core.federated.client_level import sample_clients

    names = [f"c{i:04d}" for i in range(2000)]
    a = sample_clients(names, 0.25, secret=123, rnd=1)
    assert a == sample_clients(names, 0.25, secret=123, rnd=1)  # a resumed round repeats it
    assert a != sample_clients(names, 0.25, secret=124, rnd=1) != sample_clients(names, 0.25, 123, 2)
    assert abs(len(a) - 500) < 4 * np.sqrt(2000 * 0.25 * 0.75)
    assert sample_clients(names, 1.0, 5, 1) == names


def test_dp_fedavg_clips_noises_and_divides_by_the_expected_count():
    from dpskin_core.federated.client_level import ClientDP, aggregate

    w = {"a": torch.zeros(3), "b": torch.ones(2)}
    ups = [{"a": torch.tensor([3.0, 0, 0]), "b": torch.tensor([5.0, 1])},  # update norm 5 -> 1
           {"a": torch.tensor([0.1, 0, 0]), "b": torch.tensor([1.0, 1])}]  # norm 0.1: kept
    dp = ClientDP(8.0, clipping_norm=1.0, sample_rate=0.5)
    out = aggregate(w, ups, dp, sigma=0.0, n_clients=8, secret=1, rnd=1)
    expected = (torch.tensor([0.6, 0, 0, 0.8, 0]) + torch.tensor([0.1, 0, 0, 0, 0])) / 4  # q N = 4
    assert torch.allclose(torch.cat([out["a"], out["b"] - 1]), expected, atol=1e-6)
    # the noise: Flower's, drawn from the secret (not NumPy's global state), std sigma C / (q N)
    big = {"a": torch.zeros(20000)}
    state = np.random.get_state()
    n1 = aggregate(big, [big], dp, 2.0, 8, secret=7, rnd=3)["a"]
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(n1, aggregate(big, [big], dp, 2.0, 8, secret=7, rnd=3)["a"])
    assert not torch.equal(n1, aggregate(big, [big], dp, 2.0, 8, secret=8, rnd=3)["a"])
    np.random.seed(0)
    a0 = aggregate(big, [big], dp, 2.0, 8, secret=7, rnd=3)["a"]
    assert torch.equal(a0, n1)  # seeding NumPy's global generator publicly changes nothing
    assert float(n1.std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.03)
    none = aggregate(big, [], dp, 2.0, 8, secret=7, rnd=4)["a"]  # nobody sampled: noise alone
    assert float(none.std()) == pytest.approx(0.5, rel=0.03)


def test_client_dp_config_is_checked_and_round_trips():
    from dpskin_core.federated.client_level import ClientDP

    cfg = FLConfig(run=_run(), rounds=2, partition=Partition("site", groups_per_site=2),
                   client_dp=ClientDP(3.0, sample_rate=0.5))
    back = FLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.fl_id() == cfg.fl_id()
    assert FLConfig.from_dict({**cfg.to_dict(), "client_dp": {**cfg.to_dict()["client_dp"],
                                                              "target_epsilon": 8.0}}).fl_id() != cfg.fl_id()
    with pytest.raises(ConfigError, match="choose one"):
        FLConfig(run=_run(dp=True), client_dp=ClientDP(3.0))
    for bad in ({"sample_rate": 1.5}, {"clipping_norm": float("inf")}, {"target_epsilon": 0.0}):
        with pytest.raises(ConfigError):
            ClientDP(**{"target_epsilon": 3.0, **bad})
    with pytest.raises(UnknownNameError):
        ClientDP(3.0, accountant="moments")
    with pytest.raises(ConfigError, match="unknown key"):
        FLConfig.from_dict({**cfg.to_dict(), "client_dp": {"target_epsilon": 3.0, "q": 0.5}})


def test_dp_fedavg_over_virtual_clients_records_its_guarantee_not_its_sampling(tmp_path, synth):
    from dpskin_core.federated.client_level import ClientDP, epsilon

    cfg = FLConfig(run=_run(), rounds=3, partition=Partition("site", groups_per_site=3),
                   client_dp=ClientDP(8.0, sample_rate=0.5))
    res = run_federation(cfg, tmp_path, data=synth, progress=False)
    g = res.meta["privacy"]
    assert g["level"] == "client" and g["unit"].startswith("one client") and g["clients"] == 12
    assert g["global_epsilon"] == pytest.approx(epsilon(cfg.client_dp, g["noise_multiplier"], 3))
    assert g["global_epsilon"] <= 8.0 and g["expected_clients_per_round"] == 6
    eps = res.rounds.groupby("round")["epsilon"].first()
    assert eps.is_monotonic_increasing and eps.iloc[-1] == pytest.approx(g["global_epsilon"])
    # scored at the four sites; who trained when stays private
    assert set(res.rounds["client"]) == set(SYNTHETIC_SITES) and (res.rounds["status"] == "secret").all()
    published = (res.folder / "rounds.csv").read_text() + (res.folder / "meta.json").read_text()
    assert "asked" not in published  # who was asked stays private, and no virtual client is named
    assert not re.search(r"synth_[a-d]\.\d{3}", published)
    private = json.loads((res.folder / "private" / "rounds.json").read_text())
    assert set(private) == {"1", "2", "3"} and (res.folder / "private" / "secret.json").is_file()
    w0 = fl_client.initial_weights(cfg.local)
    assert not torch.equal(res.weights["classifier.weight"], w0["classifier.weight"])
    again = run_federation(cfg, tmp_path, data=synth, progress=False)
    assert all(torch.equal(again.weights[k], res.weights[k]) for k in res.weights)


def test_virtual_clients_are_not_deployed(tmp_path, synth):
    from dpskin_core.federated.client_level import ClientDP
    from dpskin_core.federated.deploy import Deployment

    cfg = FLConfig(run=_run(), partition=Partition("site", groups_per_site=2), client_dp=ClientDP(3.0))
    with pytest.raises(ConfigError, match="run it in one process"):
        Deployment(cfg, tmp_path, data=synth)


def test_the_server_inverts_an_update_unless_record_level_dp_noised_it(synth):
    from dpskin_core.federated.study import update_inversion

    cfg = FLConfig(run=_run(), rounds=1)
    client = partition(synth, cfg.partition)[0]
    inv = update_inversion(cfg, fl_client.initial_weights(cfg.local), client, record_sigma=2.0,
                           client_clipping_norm=0.1, images=2, steps=60)
    assert list(inv["mode"].unique()) == ["no DP", "record-level DP-SGD", "client-level DP-FedAvg"]
    by = inv.groupby("mode")[["cosine", "ssim"]].mean()
    # clipping scales the update, which the cosine loss ignores: the server sees it as sent
    assert by.loc["no DP", "cosine"] > 0.5 and by.loc["client-level DP-FedAvg", "cosine"] > 0.5
    assert by.loc["record-level DP-SGD", "cosine"] < 0.2
    assert inv["reconstruction"].iloc[0].shape == (16, 16, 3)


def test_federated_version_ignores_the_analysis_modules_only(tmp_path):
    """Editing the chapter's analysis (references, attacks) keeps every federation's id;
    editing a module that makes a federation changes it."""
    import shutil
    from pathlib import Path

    from dpskin_core.federated import federation as fed

    for p in Path(fed.__file__).parent.glob("*.py"):
        shutil.copy(p, tmp_path / p.name)
    v0 = fed.federated_version(tmp_path)
    assert v0 == fed.federated_version()
    assert fed.ANALYSIS_MODULES == ("study.py",)
    with open(tmp_path / "study.py", "a") as f:
        f.write("\n# an analysis edit\n")
    assert fed.federated_version(tmp_path) == v0
    with open(tmp_path / "client.py", "a") as f:
        f.write("\n# a client edit\n")
    assert fed.federated_version(tmp_path) != v0


def test_pooled_converged_scores_the_released_reference_at_every_site(tmp_path):
    """The converged central reference is the profile's nonprivate-adam run (cached: the same
    run chapter 01 trains) and scores its released (best validation) weights at each client."""
    from dpskin_core import run
    from dpskin_core.book.registry import profile_params
    from dpskin_core.federated.federation import load_clients
    from dpskin_core.federated.recipes import FL_RECIPES, FLPlan
    from dpskin_core.federated.study import pooled_converged, references
    from dpskin_core.training.checkpoint import released_weights
    from dpskin_core.training.recipes import RECIPES

    P = profile_params("smoke", {"synth_n": 400, "image_size": 16, "epochs": 3, "num_threads": 1})
    clients = load_clients(FL_RECIPES.get("fedavg").config(P, FLPlan(rounds=1)))
    rows = pooled_converged(P, clients, [0, 1], tmp_path)
    assert len(rows) == 2 * len(clients)
    assert set(rows["training"]) == {"pooled, converged"} and set(rows["budget"]) == {"∞"}
    cfg = RECIPES.get("nonprivate-adam").config(P, seed=1)
    assert cfg.backbone == P.backbones[0] and cfg.early_stopping_patience is not None
    res = run(cfg, tmp_path)
    assert res.reused
    # the best validation epoch's file, not the last: mark it (every weight of the head zeroed,
    # bias set to predict class 0 everywhere) and read the reference again from the cached run
    best = res.run_dir / "checkpoints" / "best.pt"
    state = torch.load(best, map_location="cpu", weights_only=False)
    head = [k for k in state["model"] if state["model"][k].ndim == 2][-1]
    state["model"][head].zero_()
    bias = head.replace("weight", "bias")
    state["model"][bias].copy_(torch.tensor([1.0] + [0.0] * (state["model"][bias].numel() - 1)))
    torch.save(state, best)
    again = pooled_converged(P, clients, [1], tmp_path)
    w = released_weights(res.run_dir / "checkpoints", True)[0]
    for c in clients:
        got = again[again["client"] == c.name].iloc[0]
        present = set(np.unique(c.data.y_test).tolist())  # balanced accuracy's classes at the site
        assert got["balanced_accuracy"] == pytest.approx(1 / len(present) if 0 in present else 0.0)
        assert got["balanced_accuracy"] == pytest.approx(fl_client.evaluate(c, cfg, w)["balanced_accuracy"])
    # what the chapter and the benchmark judge the federations against: one call, the converged
    # rows the same as pooled_converged's
    refs = references(lambda s: FL_RECIPES.get("fedavg").config(P, FLPlan(rounds=1), seed=s),
                      clients, [1], tmp_path, converged=P)
    assert set(refs["training"]) == {"pooled", "local only", "pooled, converged"}
    conv = refs[refs["training"] == "pooled, converged"].reset_index(drop=True)
    pd.testing.assert_frame_equal(conv, again.reset_index(drop=True), check_like=True)
    assert set(references(lambda s: FL_RECIPES.get("fedavg").config(P, FLPlan(rounds=1), seed=s),
                          clients, [1], tmp_path)["training"]) == {"pooled", "local only"}


def test_the_chapter_parameters_map_onto_every_field_of_the_plan():
    """Every FLPlan field is a parameter of chapter 09 (fl_<field>), with the plan's default as
    its default, and from_chapter reads the registry's values for every profile, so the chapter
    and its benchmark build the same plan."""
    from dataclasses import fields

    from dpskin_core.book.registry import load_registry
    from dpskin_core.book.runner import notebook_parameters
    from dpskin_core.federated.recipes import FLPlan

    declared = notebook_parameters(Path(__file__).parents[1] / "notebooks" / "09_federated.py")
    default = FLPlan()
    for f in fields(FLPlan):
        assert declared[FLPlan.PREFIX + f.name] == getattr(default, f.name), f.name
    assert FLPlan.from_chapter(declared) == default
    reg = load_registry()
    for profile in reg.profiles:
        m = reg.parameters_for("09_federated", profile)
        plan = FLPlan.from_chapter(m)
        assert plan.rounds == m.get("fl_rounds", default.rounds)
        assert all(getattr(plan, f.name) == m.get(FLPlan.PREFIX + f.name, getattr(default, f.name))
                   for f in fields(FLPlan))
    assert FLPlan.from_chapter({"fl_rounds": 7, "fl_epsilons": [1.0]}) == FLPlan(rounds=7)
