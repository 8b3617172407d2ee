"""Every experiment config composes, validates, and runs a few server steps on fixtures or real files."""

from __future__ import annotations

import contextlib
import json

import pytest
from conftest import CONF, FAST, compose_cfg, need_data_file

from qafel.data.fixtures import (
    write_celeba_leaf,
    write_cifar10,
    write_fashion_mnist,
    write_plays,
    write_shakespeare_leaf,
)
from qafel.experiment.config import validate
from qafel.experiment.runner import run_experiment

EXPERIMENTS = ("paper_logreg", "paper_celeba", "paper_cifar10", "paper_cifar10_concurrency", "paper_shakespeare",
               "fmnist_bitgrid", "shakespeare_roles", "bandwidth_limited")
QUICK = (*FAST, "run.server_steps=2", "run.eval_every=1", "algorithm.buffer_size=2")


def test_the_experiment_group_holds_exactly_these_configs():
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("algorithm", ["qafel", "fedbuff", "naive"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, algorithm):
    with pytest.warns(UserWarning, match="identity") if algorithm == "fedbuff" else contextlib.nullcontext():
        cfg = validate(compose_cfg(f"experiment={experiment}", f"algorithm={algorithm}"))
    assert cfg.algorithm.name == algorithm
    if algorithm == "fedbuff":
        assert cfg.client_quantizer.name == cfg.server_quantizer.name == "identity"


PAPER_NN = {  # experiment -> (dataset, model, client lr, server lr, momentum, target)
    "paper_celeba": ("celeba", "cnn", 4.7e-6, 1000.0, 0.3, 0.9),
    "paper_cifar10": ("cifar10", "cnn", 1.95e-4, 40.9, 0.0, 0.6),
    "paper_cifar10_concurrency": ("cifar10", "cnn", 1.95e-4, 40.9, 0.0, 0.6),
    "fmnist_bitgrid": ("fashion_mnist", "cnn", 1.95e-4, 40.9, 0.0, 0.6),
}


@pytest.mark.parametrize("experiment", sorted(PAPER_NN))
def test_paper_settings(experiment):
    dataset, model, client_lr, server_lr, momentum, target = PAPER_NN[experiment]
    c = validate(compose_cfg(f"experiment={experiment}"))
    assert (c.dataset.name, c.model.name, c.client.lr, c.server.lr, c.server.momentum) == \
        (dataset, model, client_lr, server_lr, momentum)
    assert c.run.target_accuracy == target and c.server.reduction == "sum" and c.algorithm.buffer_size == 10
    assert c.client.local_epochs == 1 and c.client.local_steps is None
    assert c.client_quantizer.name == c.server_quantizer.name == "minmax" and c.client_quantizer.weights_only
    assert c.timing.name == "open_loop" and c.timing.duration.distribution == "halfnormal"
    if dataset in ("cifar10", "fashion_mnist"):
        assert (c.dataset.partition, c.dataset.alpha, c.dataset.num_clients, c.client.batch_size) == \
            ("power_law", 0.1, 5000, 10)
    assert c.timing.arrival == "constant"  # FLSim's constant training-start distribution, as the authors ran it
    if experiment == "paper_cifar10_concurrency":
        assert c.timing.rate == 125 and c.server.staleness.weight == "polynomial" and c.server.staleness.normalize
    else:
        assert c.timing.rate == 100
    poisson = validate(compose_cfg(f"experiment={experiment}", "timing.arrival=poisson")).timing
    assert (poisson.arrival, poisson.rate) == ("poisson", c.timing.rate)  # Poisson stays selectable


# The authors' budgets (TomasOrtega/FLSim paper_experiments configs: trainer.epochs = passes over the users) and
# the paper's uploads to target (CelebA: FedBuff 26,057; 2-bit clients up to 3.5x that).
@pytest.mark.parametrize("experiment, users, passes, paper_uploads", [
    ("paper_celeba", 7474, 20, 3.5 * 26_057), ("paper_cifar10", 5000, 50, None),
    ("paper_cifar10_concurrency", 5000, 100, None)])
def test_paper_budgets_are_at_least_the_authors(experiment, users, passes, paper_uploads):
    c = validate(compose_cfg(f"experiment={experiment}"))
    uploads = c.run.server_steps * c.algorithm.buffer_size
    assert uploads >= passes * users - c.algorithm.buffer_size
    if paper_uploads is not None:
        assert uploads >= paper_uploads  # every cell of the paper's grid can reach its target


def run(tmp_path, experiment: str, *overrides: str) -> dict:
    cfg = compose_cfg(f"experiment={experiment}", *QUICK, f"paths.data_root={tmp_path / 'data'}", *overrides)
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["server_steps"] == 2 and summary["uploads"] == 4
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2 and 0.0 <= json.loads(lines[-1])["accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_parameters"] == summary["num_parameters"]
    return summary


def test_paper_cifar10_runs_on_a_cifar_fixture(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=8, n_test=10, archive=True)
    summary = run(tmp_path, "paper_cifar10", "dataset.num_clients=12")
    assert summary["num_parameters"] == 31_594
    assert summary["message_bytes_up"] == summary["message_bytes_broadcast"] == 16_564  # min-max 4 bits
    assert summary["partition"]["clients"] == 12 and summary["partition"]["samples_min"] >= 1


def test_paper_cifar10_concurrency_runs_on_a_cifar_fixture(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=8, n_test=10)
    with pytest.warns(UserWarning, match="identity"):  # the experiment's min-max quantizers give way to fp32
        summary = run(tmp_path, "paper_cifar10_concurrency", "dataset.num_clients=12", "algorithm=fedbuff")
    assert summary["num_parameters"] == 31_594 and summary["message_bytes_up"] == 4 * 31_594


def test_paper_celeba_runs_on_a_leaf_fixture(tmp_path):
    write_celeba_leaf(tmp_path / "data", users=5, per_user=6)
    summary = run(tmp_path, "paper_celeba")
    assert summary["num_parameters"] == 29_282 and summary["partition"]["clients"] == 4
    assert summary["message_bytes_up"] == 15_380  # min-max 4 bits: FLSim's count for the CelebA CNN


def test_paper_shakespeare_runs_on_a_leaf_fixture(tmp_path):
    write_shakespeare_leaf(tmp_path / "data", users=3, train=12, test=4)
    summary = run(tmp_path, "paper_shakespeare", "client.batch_size=8")
    assert summary["num_parameters"] == 819_920 and summary["partition"]["clients"] == 3


def test_fmnist_bitgrid_runs_on_an_idx_fixture(tmp_path):
    write_fashion_mnist(tmp_path / "data", n_train=60, n_test=20)
    summary = run(tmp_path, "fmnist_bitgrid", "dataset.num_clients=15", "client_quantizer.bits=2",
                  "server_quantizer.bits=8")
    assert summary["num_parameters"] == 31_018 and summary["partition"]["clients"] == 15


def test_bandwidth_limited_runs_on_an_idx_fixture(tmp_path):
    write_fashion_mnist(tmp_path / "data", n_train=60, n_test=20)
    summary = run(tmp_path, "bandwidth_limited", "dataset.num_clients=15", "timing.concurrency=4")
    assert summary["num_parameters"] == 31_018 and summary["message_bytes_up"] == 16_276  # min-max 4 bits
    assert summary["time_to_target"] is None or summary["time_to_target"] > 0
    assert summary["upload_time_mean"] > 0 and summary["communication_time_total"] > 0


def test_bandwidth_limited_is_the_fmnist_protocol_on_slow_uplinks():
    c = validate(compose_cfg("experiment=bandwidth_limited"))
    base = validate(compose_cfg("experiment=fmnist_bitgrid"))
    assert (c.timing.name, c.timing.loop, c.timing.concurrency, c.timing.trace) == ("trace", "closed_loop", 50,
                                                                                      "synthetic")
    assert c.timing.synthetic.uplink_kbps < c.timing.synthetic.downlink_kbps <= 1000
    for node in ("dataset", "model", "client", "algorithm", "client_quantizer", "server_quantizer"):
        assert c[node] == base[node]
    assert (c.server.staleness.weight, c.server.staleness.exponent, c.server.staleness.normalize) == \
        ("polynomial", 0.5, True)
    assert (c.server.lr, c.server.reduction) == (base.server.lr, base.server.reduction)
    assert (c.run.server_steps, c.run.target_accuracy) == (base.run.server_steps, base.run.target_accuracy)


def test_shakespeare_roles_runs_on_a_plays_fixture(tmp_path):
    write_plays(tmp_path / "data" / "plays", plays=1, roles=2)
    summary = run(tmp_path, "shakespeare_roles", "dataset.file=plays", "dataset.stride=20", "client.batch_size=4",
                  "client.local_epochs=null", "client.local_steps=1")
    assert summary["num_parameters"] == 819_920 and summary["partition"]["clients"] == 2


def test_paper_logreg_runs_on_mushrooms(tmp_path):
    root = need_data_file("mushrooms.libsvm").parent
    cfg = compose_cfg("experiment=paper_logreg", *QUICK, f"paths.data_root={root}")
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["num_parameters"] == 113
