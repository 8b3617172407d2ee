"""device=cuda: the batched trainer and whole runs on the GPU agree with the CPU (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, compose_cfg
from test_clients import CASES

from qafel.experiment.runner import local_training, make_engine, setup_run
from qafel.sim.clients import BatchedTrainer, ClientTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_trainer_on_cuda_equals_the_cpu_loop(case):
    cpu = setup_run(compose_cfg(*FAST, *CASES[case]))
    gpu = setup_run(compose_cfg(*FAST, *CASES[case], "device=cuda"))
    assert gpu.data.X.device.type == "cuda" and gpu.x0.device.type == "cuda"
    gen = torch.Generator().manual_seed(1)
    n = 24
    starts = cpu.x0.repeat(n, 1) + 0.05 * torch.randn(n, cpu.model.d, generator=gen)
    clients = [(5 * j) % cpu.data.num_clients for j in range(n)]
    seeds = [1000 + j for j in range(n)]
    ref = ClientTrainer(cpu.model, cpu.data, local_training(cpu.cfg)).train(starts, clients, seeds)
    got = BatchedTrainer(gpu.model, gpu.data, local_training(gpu.cfg)).train(starts.cuda(), clients, seeds)
    assert got.device.type == "cuda"
    # float32 on both sides (TF32 off by default): only summation order differs; the CNN's max-pool can
    # route single coordinates differently after a last-bit difference, so it is judged on the whole update
    assert torch.linalg.vector_norm(got.cpu() - ref) <= 1e-4 * torch.linalg.vector_norm(ref)


def _run(*overrides: str):
    engine = make_engine(setup_run(compose_cfg(*FAST, "run.server_steps=30", "run.eval_every=10", *overrides)))
    engine.run()
    return engine


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_initial_model_does_not_depend_on_the_device(model):
    extra = ("model=cnn", "dataset.as_images=true") if model == "cnn" else ()
    cpu = setup_run(compose_cfg(*FAST, *extra))
    gpu = setup_run(compose_cfg(*FAST, *extra, "device=cuda"))
    assert gpu.x0.device.type == "cuda"
    assert torch.equal(gpu.x0.cpu(), cpu.x0)


def test_fedbuff_on_cuda_equals_the_cpu_run_up_to_float_rounding():
    cpu, gpu = _run("algorithm=fedbuff"), _run("algorithm=fedbuff", "device=cuda")
    assert gpu.x.device.type == "cuda"
    # float32 both ways (TF32 off), only cuBLAS's and MKL's summation orders differ: measured on an H200,
    # 1e-8 relative after one server step and 1e-7 after 30
    assert torch.linalg.vector_norm(gpu.x.cpu() - cpu.x) <= 1e-5 * torch.linalg.vector_norm(cpu.x)
    assert gpu.history[-1]["bytes_up"] == cpu.history[-1]["bytes_up"]


@pytest.mark.parametrize("overrides", [
    ("client_quantizer=qsgd", "server_quantizer=qsgd"),
    ("algorithm=naive", "client_quantizer=qsgd", "server_quantizer=topk"),
])
def test_quantized_runs_on_cuda_follow_the_same_schedule_and_learn(overrides):
    cpu, gpu = _run(*overrides), _run(*overrides, "device=cuda")
    assert gpu.x.device.type == "cuda"
    # the schedule is exogenous and the quantizers draw from CPU generators: same uploads and steps. A float
    # rounding difference can flip a stochastic-rounding level, and the naive baseline amplifies such flips
    # (its accuracy after 30 steps spans 0.49-0.66 over seeds on the CPU), so accuracy is only checked to learn.
    assert gpu.server_step == cpu.server_step == 30
    assert gpu.history[-1]["uploads"] == cpu.history[-1]["uploads"]
    assert gpu.history[-1]["accuracy"] > 0.3


def test_batched_cnn_on_cuda_is_independent_of_the_batch_layout():
    s = setup_run(compose_cfg(*FAST, *CASES["cnn_images"], "device=cuda"))
    trainer = BatchedTrainer(s.model, s.data, local_training(s.cfg))
    n = 12
    starts = s.x0.repeat(n, 1)
    clients, seeds = list(range(n)), [7 + j for j in range(n)]
    together = trainer.train(starts, clients, seeds)
    halves = torch.cat([trainer.train(starts[:6], clients[:6], seeds[:6]),
                        trainer.train(starts[6:], clients[6:], seeds[6:])])
    torch.testing.assert_close(halves, together, rtol=1e-5, atol=1e-6)



def test_a_cuda_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    """Checkpoints are read onto the CPU; the resumed engine moves its state back to the GPU."""
    from qafel.experiment.runner import run_experiment

    cfg = (*FAST, "device=cuda", "dataset.num_clients=20", "run.server_steps=40", "run.eval_every=10",
           "run.checkpoint_every=20", "server.optimizer=adam", "server.lr=0.01")

    class Crash(Exception):
        pass

    def crash(record):
        if record["server_step"] == 30:
            raise Crash

    run_experiment(compose_cfg(*cfg), tmp_path / "full")
    with pytest.raises(Crash):
        run_experiment(compose_cfg(*cfg), tmp_path / "part", on_eval=crash)
    run_experiment(compose_cfg(*cfg), tmp_path / "part", resume=True)
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "part")]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "wall_time_s"} for x in ls] for ls in lines]
    assert strip[0] == strip[1]
