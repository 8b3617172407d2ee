"""Client training: the batched (vmap) trainer equals the one-by-one loop; minibatch plans are what they say."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_cfg

from qafel.data import FederatedData
from qafel.errors import ConfigError
from qafel.experiment.runner import Evaluator, local_training, make_engine, make_trainer, setup_run
from qafel.models.networks import FlatModel, PaperCNN
from qafel.sim import system
from qafel.sim.clients import BatchedTrainer, ClientTrainer, LocalTraining

# Float32 tolerance: the batched path sums a padded, masked loss, the loop an unpadded mean; only summation
# order differs, so the deltas agree to a few ulps of their scale.
RTOL, ATOL = 1e-5, 1e-6

CASES = {
    "mlp_minibatch": ("client.local_steps=5", "client.batch_size=16"),
    "mlp_full_batch_uneven_clients": ("client.local_steps=3", "client.batch_size=full"),
    "logreg_local_epochs_uneven": ("model=logreg", "client.local_steps=null", "client.local_epochs=2",
                                   "client.batch_size=8"),
    "cnn_images": ("model=cnn", "model.dropout=0.0", "dataset.as_images=true", "client.local_steps=2",
                   "client.batch_size=8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_trainer_equals_the_loop(case):
    s = setup_run(compose_cfg(*FAST, *CASES[case]))
    local = local_training(s.cfg)
    gen = torch.Generator().manual_seed(1)
    n = 24
    starts = s.x0.repeat(n, 1) + 0.05 * torch.randn(n, s.model.d, generator=gen)
    clients = [(5 * j) % s.data.num_clients for j in range(n)]
    seeds = [1000 + j for j in range(n)]
    loop = ClientTrainer(s.model, s.data, local).train(starts, clients, seeds)
    batched = BatchedTrainer(s.model, s.data, local).train(starts, clients, seeds)
    assert loop.abs().max() > 0
    if case.startswith("cnn"):
        # max-pool picks the larger of two inputs: a last-bit difference can route a gradient elsewhere, so
        # single coordinates may differ more; the update as a whole agrees to 1e-4 relative
        assert torch.linalg.vector_norm(batched - loop) <= 1e-4 * torch.linalg.vector_norm(loop)
    else:
        torch.testing.assert_close(batched, loop, rtol=RTOL, atol=ATOL)


def test_engine_with_batched_and_loop_trainers_agree():
    runs = {}
    for trainer in ("batched", "loop"):
        s = setup_run(compose_cfg(*FAST, "run.server_steps=20", "run.eval_every=10", "dataset.num_clients=20",
                                  "client_quantizer=identity", "server_quantizer=identity", f"run.trainer={trainer}"))
        engine = make_engine(s)
        engine.run()
        runs[trainer] = engine.x
    torch.testing.assert_close(runs["batched"], runs["loop"], rtol=1e-4, atol=1e-5)


def test_minibatch_plans():
    gen = torch.Generator().manual_seed(0)
    steps = LocalTraining(lr=0.1, local_steps=4, batch_size=3).batches(10, gen)
    assert len(steps) == 4 and all(len(idx) == 3 and len(set(idx.tolist())) == 3 for idx in steps)
    epochs = LocalTraining(lr=0.1, local_epochs=2, batch_size=4).batches(10, gen)
    assert [len(idx) for idx in epochs] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(epochs[:3]).tolist()) == list(range(10))
    assert LocalTraining(lr=0.1, local_steps=2, batch_size=None).batches(10, gen) == [None, None]
    assert LocalTraining(lr=0.1, local_epochs=1, batch_size=4).steps_for(10) == 3


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_job_threads_give_bit_identical_updates(dropout):
    # 16x16 images, batch 32: the CNN's channels-last fast path; with dropout each job draws its own masks
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12 * 40, 3, 16, 16, generator=gen)
    y = torch.randint(0, 4, (12 * 40,), generator=gen)
    data = FederatedData.from_partition("synthetic", X, y, [np.arange(40 * i, 40 * (i + 1)) for i in range(12)],
                                        X[:8], y[:8], 4)
    model = FlatModel(PaperCNN(3, 16, 4, dropout=dropout))
    local = LocalTraining(lr=0.05, local_epochs=1, batch_size=32)
    n = 9
    starts = model.initial_vector(0).repeat(n, 1) + 0.01 * torch.randn(n, model.d, generator=gen)
    clients, seeds = [(7 * j) % 12 for j in range(n)], [500 + j for j in range(n)]
    one = ClientTrainer(model, data, local).train(starts, clients, seeds)
    three = ClientTrainer(model, data, local, job_threads=3).train(starts, clients, seeds)
    assert torch.equal(one, three) and one.abs().max() > 0
    again = ClientTrainer(model, data, local, job_threads=3).train(starts, clients, seeds)
    assert torch.equal(again, three)
    # a job's masks are those the global generator gave before jobs could run in threads
    for j in (0, 4):
        torch.manual_seed(seeds[j])
        with torch.no_grad():
            net = copy.deepcopy(model.module).train()
            torch.nn.utils.vector_to_parameters(starts[j].clone(), net.parameters())
        Xj, yj = data.client(clients[j])
        batches = local.batches(len(yj), torch.Generator().manual_seed(seeds[j]))
        w = starts[j]
        for idx in batches:
            leaf = w.detach().requires_grad_(True)
            torch.nn.utils.vector_to_parameters(leaf, net.parameters())  # params become views of leaf
            grads = torch.autograd.grad(F.cross_entropy(net.functional_forward(dict(net.named_parameters()),
                                                                               Xj[idx]), yj[idx]),
                                        list(net.parameters()))
            w = w - local.lr * torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(starts[j] - w, one[j], rtol=0, atol=0)


def test_job_threads_errors_and_auto(monkeypatch):
    s = setup_run(compose_cfg(*FAST, "model=cnn", "dataset.as_images=true"))
    local = local_training(s.cfg)
    with pytest.raises(ValueError, match="job_threads"):
        ClientTrainer(s.model, s.data, local, job_threads=0)
    with pytest.raises(ConfigError, match="run.job_threads"):
        setup_run(compose_cfg(*FAST, "run.job_threads=0"))
    monkeypatch.setattr(system, "_core_budget", None)
    system.set_core_budget(3)
    assert system.available_cores() <= 3
    monkeypatch.setattr(system, "available_cores", lambda: 4)
    assert make_trainer("auto", s.model, s.data, local, torch.device("cpu")).job_threads == 4  # one torch thread
    assert make_trainer("auto", s.model, s.data, local, torch.device("cpu"), 2).job_threads == 2
    assert make_trainer("loop", s.model, s.data, local, torch.device("meta")).job_threads == 1  # not the CPU
    assert isinstance(make_trainer("batched", s.model, s.data, local, torch.device("cpu")), BatchedTrainer)


def test_engine_results_do_not_depend_on_job_threads():
    finals = {}
    for threads in (1, 2):
        s = setup_run(compose_cfg(*FAST, "model=cnn", "dataset.as_images=true", "run.server_steps=6",
                                  "run.eval_every=3", "dataset.num_clients=20", f"run.job_threads={threads}"))
        engine = make_engine(s)
        assert engine.trainer.job_threads == threads
        engine.run()
        finals[threads] = engine.x
    assert torch.equal(finals[1], finals[2])


def test_jobs_in_threads_start_longest_first_and_come_back_in_call_order(monkeypatch):
    s = setup_run(compose_cfg(*FAST, "model=cnn", "dataset.as_images=true", "dataset.num_clients=20",
                              "client.local_steps=null", "client.local_epochs=1", "client.batch_size=8"))
    sizes = s.data.client_sizes.tolist()
    clients = sorted(range(20), key=lambda c: sizes[c])[:3] + sorted(range(20), key=lambda c: -sizes[c])[:3]
    assert len({sizes[c] for c in clients}) > 2  # unequal jobs, the shortest first in the call
    starts = s.x0.repeat(len(clients), 1) + 0.01 * torch.randn(len(clients), s.model.d,
                                                               generator=torch.Generator().manual_seed(2))
    seeds = [100 + j for j in range(len(clients))]
    submitted = []
    real = system.map_in_threads

    def spy(threads, fn, starts_, clients_, seeds_):
        submitted.append(list(clients_))
        return real(threads, fn, starts_, clients_, seeds_)

    monkeypatch.setattr("qafel.sim.clients.map_in_threads", spy)
    trainer = ClientTrainer(s.model, s.data, local_training(s.cfg), job_threads=2)
    got = trainer.train(starts, clients, seeds)
    assert [sizes[c] for c in submitted[0]] == sorted((sizes[c] for c in clients), reverse=True)
    one_by_one = torch.stack([trainer.train_one(starts[j], clients[j], seeds[j]) for j in range(len(clients))])
    assert torch.equal(got, one_by_one)


def test_evaluation_does_not_depend_on_threads_or_chunks():
    s = setup_run(compose_cfg(*FAST, "model=cnn", "dataset.as_images=true", "run.job_threads=2"))
    assert s.evaluator.threads == 2
    x = s.x0 + 0.05 * torch.randn(s.model.d, generator=torch.Generator().manual_seed(3))
    n = len(s.data.y_test)
    one = Evaluator(s.model, s.data, None, chunk=64, threads=1)(x)
    assert Evaluator(s.model, s.data, None, chunk=64, threads=3)(x) == one  # same chunks, summed in order
    whole = Evaluator(s.model, s.data, None, chunk=n)(x)
    assert whole["accuracy"] == one["accuracy"] and n > 64
    assert abs(whole["loss"] - one["loss"]) < 1e-6 * whole["loss"]
