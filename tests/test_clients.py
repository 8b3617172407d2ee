"""Client training: the batched (vmap) trainer equals the one-by-one loop; minibatch plans are what they say."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_cfg

from qafel.api import local_training, make_engine, setup_run
from qafel.clients import BatchedTrainer, ClientTrainer, LocalTraining

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
