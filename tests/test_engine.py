"""The engine's defining properties (ALGORITHMS.md §9): equivalences, hidden-state copies, exact bytes,
the asynchronous system's statistics, sequential SGD, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import FAST, compose_cfg

from qafel.experiment.runner import make_engine, run_experiment, setup_run, timing_options
from qafel.sim.algorithms import ServerOptimizer, StalenessWeight
from qafel.sim.timing import Schedule

SMALL = ("dataset.num_clients=20", "run.server_steps=30", "run.eval_every=10", "timing.rate=10",
         "client.local_steps=2")


def run_engine(*overrides: str):
    s = setup_run(compose_cfg(*FAST, *overrides))
    engine = make_engine(s)
    return engine, engine.run()


def test_qafel_with_identity_quantizers_equals_fedbuff_bit_for_bit():
    qafel, qs = run_engine(*SMALL, "algorithm=qafel", "client_quantizer=identity", "server_quantizer=identity")
    fedbuff, fs = run_engine(*SMALL, "algorithm=fedbuff")
    assert torch.equal(qafel.x, fedbuff.x)
    assert torch.equal(qafel.xhat, qafel.x)
    for a, b in zip(qafel.history, fedbuff.history, strict=True):
        assert (a["accuracy"], a["loss"], a["uploads"], a["mean_staleness"]) == \
            (b["accuracy"], b["loss"], b["uploads"], b["mean_staleness"])
    assert qs["bytes_up"] == fs["bytes_up"] and qs["bytes_broadcast"] == fs["bytes_broadcast"]
    # the comparison can fail: quantizing the uplink changes the trajectory
    quantized, _ = run_engine(*SMALL, "algorithm=qafel", "client_quantizer=qsgd", "server_quantizer=identity")
    assert not torch.equal(quantized.x, fedbuff.x)


@pytest.mark.parametrize("codec", ["simulated", "wire"])
def test_every_client_copy_of_the_hidden_state_equals_the_servers(codec):
    engine, summary = run_engine(*SMALL, "algorithm=qafel", "algorithm.hidden_state_replicas=3",
                                 "client_quantizer=qsgd", "server_quantizer=qsgd", "server_quantizer.bits=2",
                                 f"run.codec={codec}")
    assert summary["status"] == "completed" and summary["server_steps"] == 30
    assert len(engine.replicas) == 3
    for copy in engine.replicas:
        assert torch.equal(copy, engine.xhat)
    assert summary["hidden_state_error"] > 0  # 2-bit broadcasts leave x̂ ≠ x: the copies are a real check


def test_a_client_copy_that_drifts_is_detected(monkeypatch):
    s = setup_run(compose_cfg(*FAST, *SMALL, "algorithm.hidden_state_replicas=2"))
    engine = make_engine(s)
    real_decode = s.server_quantizer.decode
    calls = {"n": 0}

    def flaky_decode(payload):
        calls["n"] += 1
        out = real_decode(payload)
        return out + 1e-3 if calls["n"] == 5 else out

    monkeypatch.setattr(s.server_quantizer, "decode", flaky_decode)
    with pytest.raises(RuntimeError, match="client copy of the hidden state"):
        engine.run()


def test_wire_codec_gives_the_same_run_as_the_simulated_path():
    wire, ws = run_engine(*SMALL, "client_quantizer=qsgd", "server_quantizer=minmax", "run.codec=wire")
    sim, ss = run_engine(*SMALL, "client_quantizer=qsgd", "server_quantizer=minmax", "run.codec=simulated")
    assert torch.equal(wire.x, sim.x)
    assert (ws["bytes_up"], ws["bytes_broadcast"]) == (ss["bytes_up"], ss["bytes_broadcast"])


def test_byte_totals_are_exact_payload_sums():
    engine, s = run_engine(*SMALL, "algorithm=qafel", "client_quantizer=qsgd", "server_quantizer=minmax")
    d = engine.d
    up = engine.qc.payload_bytes()
    assert up is not None and s["bytes_up"] == s["uploads"] * up
    assert s["bytes_broadcast"] == s["server_steps"] * engine.qs.payload_bytes()
    assert s["bytes_up_fp32_equivalent"] == s["uploads"] * 4 * d
    assert s["bytes_broadcast_fp32_equivalent"] == s["server_steps"] * 4 * d
    total = s["bytes_up"] + s["bytes_broadcast"]
    assert s["reduction_vs_fedbuff"] == pytest.approx((s["uploads"] + s["server_steps"]) * 4 * d / total)

    fed, fs = run_engine(*SMALL, "algorithm=fedbuff")
    assert fs["bytes_up"] == fs["uploads"] * 4 * d and fs["bytes_broadcast"] == fs["server_steps"] * 4 * d
    assert fs["reduction_vs_fedbuff"] == pytest.approx(1.0)

    naive, ns = run_engine(*SMALL, "algorithm=naive", "client_quantizer=qsgd", "server_quantizer=qsgd")
    assert ns["bytes_broadcast"] == 0
    assert ns["bytes_down_naive"] == ns["jobs_started"] * naive.qs.payload_bytes()
    assert ns["jobs_started"] >= ns["uploads"]


def test_schedule_statistics_hold_inside_the_engine():
    # open loop λ = 20, half-normal σ = 1: concurrency λ·E[dur] ≈ 15.96, staleness ≈ C/K ≈ 3.19 with K = 5
    _, s = run_engine("model=logreg", "dataset.num_clients=100", "timing.rate=20", "algorithm.buffer_size=5",
                      "client.local_steps=1", "run.server_steps=1500", "run.eval_every=1500")
    expected = 20 * math.sqrt(2 / math.pi)
    assert s["mean_concurrency"] == pytest.approx(expected, rel=0.08)
    assert s["mean_staleness"] == pytest.approx(expected / 5, rel=0.12)


def _one_job_in_flight(restart_model: str):
    """FedBuff, K = 1, one job in flight: the engine's final model, x0, and the clients in arrival order."""
    overrides = ("model=logreg", "algorithm=fedbuff", "algorithm.buffer_size=1", "timing=closed_loop",
                 "timing.concurrency=1", "timing.restart=random_idle", f"timing.restart_model={restart_model}",
                 "client.local_steps=1", "client.batch_size=full", "client.lr=0.5",
                 "server.lr=1.0", "server.reduction=sum", "run.server_steps=40", "run.eval_every=40",
                 "dataset.num_clients=10")
    s = setup_run(compose_cfg(*FAST, *overrides))
    clients = []
    for ev in Schedule(timing_options(s.cfg.timing), s.data.num_clients, s.cfg.seed):
        if ev.kind == "arrival":
            clients.append(ev.job.client)
        if len(clients) == 40:
            break
    engine = make_engine(s)
    engine.run()
    assert len(set(clients)) > 1

    def step(x, c):
        X, y = s.data.client(c)
        w = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(s.model.loss(w, X, y), w)
        return 0.5 * g

    return engine.x, s.x0.clone(), clients, step


def test_fedbuff_with_k1_and_one_job_in_flight_is_sequential_sgd():
    got, x, clients, step = _one_job_in_flight("after_step")
    for c in clients:
        x = x - step(x, c)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


def test_restarting_before_the_step_is_sgd_with_one_step_of_delay():
    """The authors' LR code: a client restarts from the model before the server step its own update completes,
    so with K = 1 and one job in flight each update is the gradient at the model one step old."""
    got, x, clients, step = _one_job_in_flight("before_step")
    previous = x.clone()
    for c in clients:
        x, previous = x - step(previous, c), x
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


def test_same_seed_same_run_and_different_seed_different_run():
    a, sa = run_engine(*SMALL, "seed=5")
    b, sb = run_engine(*SMALL, "seed=5")
    c, _ = run_engine(*SMALL, "seed=6")
    assert torch.equal(a.x, b.x)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert sa["bytes_up"] == sb["bytes_up"]
    assert not torch.equal(a.x, c.x)


def test_max_staleness_drops_and_counts_stale_updates():
    engine, s = run_engine(*SMALL, "server.max_staleness=0", "timing.rate=40")
    assert s["dropped_updates"] > 0
    assert s["max_staleness_seen"] == 0
    assert s["uploads"] - s["dropped_updates"] == s["server_steps"] * 10 + engine.k


def test_staleness_weights():
    assert StalenessWeight({"weight": "constant"})(7) == 1.0
    assert StalenessWeight({"weight": "polynomial", "exponent": 0.5})(3) == pytest.approx(0.5)
    assert StalenessWeight({"weight": "polynomial", "exponent": 0.5, "normalize": True})(1) == pytest.approx(1.0)
    w = StalenessWeight({"weight": "threshold", "cutoff": 2, "value": 0.25})
    assert (w(2), w(3)) == (1.0, 0.25)


def test_server_sgd_momentum_and_adam_match_torch_optim():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, generator=gen) for _ in range(5)]
    for cfg, make in [({"optimizer": "sgd", "lr": 0.3, "momentum": 0.9},
                       lambda p: torch.optim.SGD([p], lr=0.3, momentum=0.9)),
                      ({"optimizer": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8},
                       lambda p: torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8))]:
        ours = ServerOptimizer(cfg, 7)
        x = torch.ones(7)
        p = torch.nn.Parameter(torch.ones(7))
        opt = make(p)
        for g in grads:
            x = ours.step(x, g)
            p.grad = g.clone()
            opt.step()
        torch.testing.assert_close(x, p.detach(), rtol=1e-5, atol=1e-6)


def test_uploads_to_target_is_k_times_server_steps_at_first_hit():
    engine, s = run_engine(*SMALL, "run.target_accuracy=0.3")
    first = next(r for r in engine.history if r["accuracy"] >= 0.3)
    assert s["uploads_to_target"] == 10 * first["server_step"]
    assert s["bytes_up_at_target"] == first["bytes_up"]
    assert np.isfinite(s["final_loss"])


def test_with_max_staleness_uploads_and_bytes_at_target_count_the_same_uploads(tmp_path):
    """Dropped stale uploads were sent: uploads_to_target counts them, as bytes_up_at_target does."""
    s = run_experiment(compose_cfg(*FAST, "server.max_staleness=0", "timing.rate=40", "run.target_accuracy=0.5",
                                   "run.server_steps=60", "run.eval_every=5"), tmp_path)
    assert s["dropped_updates"] > 0 and s["uploads_to_target"] is not None
    hit = next(r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if r["accuracy"] >= 0.5)
    assert s["uploads_to_target"] == hit["uploads"] > 10 * hit["server_step"]  # more than K x steps: drops included
    assert s["bytes_up_at_target"] == s["uploads_to_target"] * s["message_bytes_up"]  # fixed-size QSGD uploads
    from qafel.report import uploads_to_target
    assert uploads_to_target([hit], 10, 0.5).uploads == s["uploads_to_target"]  # the report reads them alike


def test_the_record_keys_list_every_key_an_evaluation_writes(tmp_path):
    from qafel.sim.engine import RECORD_KEYS

    run_experiment(compose_cfg(*FAST, "model=logreg", "run.server_steps=10", "run.eval_every=5",
                               "run.compute_optimum=true"), tmp_path)
    keys = set().union(*(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()))
    assert keys == set(RECORD_KEYS) - {"online_fraction"}  # that one under timing=trace only
